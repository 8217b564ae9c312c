#!/usr/bin/env bash
# The federation's Flower SuperLink as a long-running job (no GPU: the averaging is light). It runs
# `medsyn fl superlink` (TLS + SuperNode authentication unless MEDSYN_FL_INSECURE=1) until the job is
# cancelled or reaches its time limit, and writes HOST:PORT to MEDSYN_FL_ADDRESS_FILE once it listens,
# for the sites' SuperNodes (slurm/supernode.sh) and the operator's `medsyn fl connect`.
#
#   medsyn fl init --out pki --host "$(hostname -f)"        # once: the CA and the SuperLink certificate
#   sbatch slurm/superlink.sh                               # the defaults below
#   MEDSYN_PKI=pki MEDSYN_FL_PORT=9100 MEDSYN_FL_DATABASE=fl/superlink.db sbatch slurm/superlink.sh
#
# Variables (defaults in brackets; paths relative to the folder you submit from):
#   MEDSYN_PKI              the folder from `medsyn fl init` [pki]
#   MEDSYN_FL_PORT          the one port sites, ServerApp and flwr CLI use [9100]
#   MEDSYN_FL_HOST          the address to listen on [0.0.0.0]
#   MEDSYN_FL_DATABASE      SuperLink state file: registered sites survive a restart [in memory]
#   MEDSYN_FL_ADDRESS_FILE  where the job writes HOST:PORT once the SuperLink listens [superlink.address]
#   MEDSYN_FL_INSECURE      1: NO TLS and NO SuperNode authentication (closed test networks only) [0]
#   APPTAINER/IMAGE, MEDSYN_BINDS, MEDSYN_VENV, MEDSYN_REPO: see slurm/common.sh
#SBATCH --job-name=medsyn-superlink
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=7-00:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
here="${MEDSYN_REPO:+$MEDSYN_REPO/slurm}"
[ -n "$here" ] || here="$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")"
source "$here/common.sh"

port="${MEDSYN_FL_PORT:-9100}"
address_file="${MEDSYN_FL_ADDRESS_FILE:-superlink.address}"
args=(fl superlink --port "$port" --host "${MEDSYN_FL_HOST:-0.0.0.0}"
      ${MEDSYN_FL_DATABASE:+--database "$MEDSYN_FL_DATABASE"})
if [ "${MEDSYN_FL_INSECURE:-0}" = 1 ]; then
  args+=(--insecure)
else
  args+=(--pki "${MEDSYN_PKI:-pki}")
fi
# The address the sites use: this node's name, or the one address it listens on.
listen="${MEDSYN_FL_HOST:-0.0.0.0}"
probe="$listen" advertised="$listen"
if [ "$listen" = 0.0.0.0 ]; then probe=127.0.0.1 advertised="$(hostname -f 2>/dev/null || hostname)"; fi
rm -f "$address_file"
say "medsyn ${args[*]}"
"${MEDSYN_CMD[@]}" "${args[@]}" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
# Publish the address once the port accepts connections (bash's /dev/tcp: no extra tool needed).
for _ in $(seq 600); do
  kill -0 "$pid" 2>/dev/null || break
  if (exec 3<>"/dev/tcp/$probe/$port") 2>/dev/null; then
    echo "$advertised:$port" > "$address_file.tmp" && mv "$address_file.tmp" "$address_file"
    say "SuperLink listening on $(cat "$address_file") (written to $address_file)"
    break
  fi
  sleep 1
done
status=0
while true; do
  wait "$pid" && status=0 || status=$?
  kill -0 "$pid" 2>/dev/null || break  # wait returned because of a trapped signal: wait again
done
rm -f "$address_file"
say "SuperLink exited with status $status"
exit "$status"
