# Sourced by the medsyn Slurm scripts: where the toolkit is and how a command runs.
#   APPTAINER       a .sif image: run medsyn inside it (apptainer exec --nv, binds below); unset: the local install
#   IMAGE           same as APPTAINER (either name works)
#   MEDSYN_BINDS    extra comma-separated bind mounts for the container (the working folders are bound already)
#   MEDSYN_VENV     a venv whose bin/medsyn to use (default: medsyn on PATH, else the repository's .venv)
#   MEDSYN_REPO     the repository (default: the folder above slurm/)
# sbatch runs a copy of the script from its spool, so each script finds this file through
# `scontrol show job` (the submitted script's path) or MEDSYN_REPO.
set -euo pipefail

MEDSYN_REPO="${MEDSYN_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export MEDSYN_REPO
SLURM_DIR="$MEDSYN_REPO/slurm"
image="${APPTAINER:-${IMAGE:-}}"

# The medsyn command: in the container when one is configured, else the local install.
if [ -n "$image" ]; then
  MEDSYN_CMD=(apptainer exec --nv --cleanenv --bind "$PWD${MEDSYN_BINDS:+,$MEDSYN_BINDS}"
              --env "MEDSYN_SITE_KEY=${MEDSYN_SITE_KEY:-}" "$image" medsyn)
elif [ -n "${MEDSYN_VENV:-}" ]; then
  MEDSYN_CMD=("$MEDSYN_VENV/bin/medsyn")
  export PATH="$MEDSYN_VENV/bin:$PATH"  # the venv's other tools too (flower-superlink, nnUNetv2_*)
elif command -v medsyn >/dev/null; then
  MEDSYN_CMD=("$(command -v medsyn)")
else
  MEDSYN_CMD=("$MEDSYN_REPO/.venv/bin/medsyn")
  export PATH="$MEDSYN_REPO/.venv/bin:$PATH"
fi
medsyn() { "${MEDSYN_CMD[@]}" "$@"; }

say() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}] $*"; }

# Submit a job that runs after this array job: only from the array's first task, once.
submit_after_array() {  # submit_after_array NAME COMMAND...
  local name="$1"; shift
  if [ "${SLURM_ARRAY_TASK_ID}" = "${SLURM_ARRAY_TASK_MIN:-0}" ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    sbatch --parsable --job-name="$name" --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --kill-on-invalid-dep=yes \
      --ntasks=1 --cpus-per-task=1 --output="${MEDSYN_LOG_DIR:-.}/%x-%j.out" \
      --export=ALL,MEDSYN_REPO="$MEDSYN_REPO" --wrap "$*" > "${MEDSYN_LOG_DIR:-.}/$name.jobid"
    say "submitted $name (job $(cat "${MEDSYN_LOG_DIR:-.}/$name.jobid")) to run after every task of ${SLURM_ARRAY_JOB_ID} succeeds"
  fi
}
