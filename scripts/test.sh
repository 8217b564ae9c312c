#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
exec "${MEDSYN_VENV:-$root/.venv}/bin/python" -m pytest -ra "$@"
