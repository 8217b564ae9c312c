#!/usr/bin/env bash
# Set everything up on a fresh machine, then run `medsyn demo` on the built-in phantom cohort.
#   bash scripts/demo.sh [OUT]    (default OUT: medsyn-demo; an earlier demo there is replaced)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
exec "${MEDSYN_VENV:-$root/.venv}/bin/medsyn" -v demo --out "${1:-$root/medsyn-demo}" --force
