#!/usr/bin/env bash
# A site's Flower SuperNode as a long-running job on one GPU: `medsyn fl supernode` connects to the
# federation's SuperLink (TLS, authenticated with the site's key unless MEDSYN_FL_INSECURE=1) and
# trains on this site's cohort whenever the server asks; only weights leave the site. It runs until
# cancelled; a requeued job (node failure, preemption) simply reconnects.
#
#   medsyn fl site-key --out ~/.config/medsyn/fl-node       # once; send fl-node.pub to the operator
#   MEDSYN_SUPERLINK=fl.example.org:9100 sbatch slurm/supernode.sh
#   MEDSYN_SUPERLINK=fl.example.org:9100 MEDSYN_FL_CA=ca.pem MEDSYN_COHORT=cohorts/site sbatch slurm/supernode.sh
#
# Variables (defaults in brackets; paths relative to the folder you submit from):
#   MEDSYN_SUPERLINK       HOST:PORT of the federation's SuperLink [read from MEDSYN_FL_ADDRESS_FILE]
#   MEDSYN_FL_ADDRESS_FILE the file slurm/superlink.sh writes (same cluster) [superlink.address]
#   MEDSYN_FL_CA           the federation's ca.pem [ca.pem]
#   MEDSYN_FL_KEY          this site's SuperNode private key [~/.config/medsyn/fl-node]
#   MEDSYN_COHORT          this site's cohort (its train split is used) [cohorts/site]
#   MEDSYN_FL_WORK         the site's local run dir and round files [fl-work]
#   MEDSYN_FL_NODE_PORT    local port of the SuperNode's own API (127.0.0.1) [9200]
#   MEDSYN_DEVICE          auto | cpu | cuda [auto: a GPU if there is one];  MEDSYN_PRECISION fp32 | bf16 | fp16 [the server's config]
#   MEDSYN_THREADS         CPU threads of the trainer [the job's --cpus-per-task]
#   MEDSYN_FL_INSECURE     1: NO TLS and NO authentication (closed test networks only) [0]
#   FLWR_HOME              Flower's own folder (installed app bundles) [MEDSYN_FL_WORK/flwr-home]
#   APPTAINER/IMAGE, MEDSYN_BINDS, MEDSYN_VENV, MEDSYN_REPO: see slurm/common.sh
#SBATCH --job-name=medsyn-supernode
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=7-00:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
here="${MEDSYN_REPO:+$MEDSYN_REPO/slurm}"
[ -n "$here" ] || here="$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")"
source "$here/common.sh"

superlink="${MEDSYN_SUPERLINK:-}"
address_file="${MEDSYN_FL_ADDRESS_FILE:-superlink.address}"
if [ -z "$superlink" ] && [ -f "$address_file" ]; then superlink="$(cat "$address_file")"; fi
if [ -z "$superlink" ]; then
  echo "supernode.sh: set MEDSYN_SUPERLINK=HOST:PORT (the federation's SuperLink), or run slurm/superlink.sh first ($address_file not found)" >&2
  exit 1
fi
work="${MEDSYN_FL_WORK:-fl-work}"
mkdir -p "$work"
export FLWR_HOME="${FLWR_HOME:-$(cd "$work" && pwd)/flwr-home}"
export APPTAINERENV_FLWR_HOME="$FLWR_HOME"  # into the container too (apptainer --cleanenv passes these on)
threads="${MEDSYN_THREADS:-${SLURM_CPUS_PER_TASK:-}}"
args=(fl supernode --superlink "$superlink" --cohort "${MEDSYN_COHORT:-cohorts/site}" --work-dir "$work"
      --port "${MEDSYN_FL_NODE_PORT:-9200}" ${MEDSYN_DEVICE:+--device "$MEDSYN_DEVICE"}
      ${MEDSYN_PRECISION:+--precision "$MEDSYN_PRECISION"} ${threads:+--threads "$threads"})
if [ "${MEDSYN_FL_INSECURE:-0}" = 1 ]; then
  args+=(--insecure)
else
  args+=(--ca "${MEDSYN_FL_CA:-ca.pem}" --key "${MEDSYN_FL_KEY:-$HOME/.config/medsyn/fl-node}")
fi
say "medsyn ${args[*]} (restart ${SLURM_RESTART_COUNT:-0})"
exec "${MEDSYN_CMD[@]}" "${args[@]}"
