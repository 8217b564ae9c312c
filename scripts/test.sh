#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the whole test suite.
#   bash scripts/test.sh [pytest args]
#   bash scripts/test.sh --fast [pytest args]   # the fast tier: every module's unit behaviour, no
#                                                # real-service integration (pytest -m "not slow")
# System tools the tests use for real (not mocked): dicom3tools (dciodvfy validates DICOM output).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
if ! command -v dciodvfy >/dev/null; then
  echo "[test] installing dicom3tools (dciodvfy)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends dicom3tools >/dev/null
fi
cd "$root"
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow" "$@"
fi
exec "${MEDSYN_VENV:-$root/.venv}/bin/python" -m pytest -ra --durations=25 "$@"  # the 25 slowest: where the suite's time goes
