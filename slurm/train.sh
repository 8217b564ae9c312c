#!/usr/bin/env bash
# Train the site DDPM on one GPU (DeepSpeed, one process). Near the time limit Slurm sends USR1:
# medsyn writes a checkpoint and exits with status 3, this script requeues the job, and the requeued
# job continues with --resume (same step, schedule, RNG and data order).
#
#   sbatch slurm/train.sh                                   # the defaults below
#   MEDSYN_CONFIG=gpu24 MEDSYN_COHORT=cohorts/site MEDSYN_OUT=runs/site sbatch slurm/train.sh
#
# Variables (defaults in brackets; paths relative to the folder you submit from):
#   MEDSYN_CONFIG   a shipped config name or a YAML file [gpu24]
#   MEDSYN_COHORT   the cohort to train on [cohorts/site]
#   MEDSYN_OUT      the run dir [runs/site]
#   MEDSYN_STEPS    total steps (overrides the config) [config's]
#   MEDSYN_ARGS     more `medsyn train` options, e.g. "--precision bf16"
#   APPTAINER/IMAGE, MEDSYN_BINDS, MEDSYN_VENV, MEDSYN_REPO: see slurm/common.sh
# Several GPUs on one node: the DeepSpeed or torchrun launcher inside the allocation, e.g.
#   srun torchrun --nproc-per-node=4 -m medsyn_site.cli train ...   (see the README).
#SBATCH --job-name=medsyn-train
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
here="${MEDSYN_REPO:+$MEDSYN_REPO/slurm}"
[ -n "$here" ] || here="$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")"
source "$here/common.sh"

config="${MEDSYN_CONFIG:-gpu24}"
cohort="${MEDSYN_COHORT:-cohorts/site}"
out="${MEDSYN_OUT:-runs/site}"
args=(train --config "$config" --cohort "$cohort" --out "$out" ${MEDSYN_STEPS:+--steps "$MEDSYN_STEPS"})
# A run dir with a checkpoint (this job was requeued, or resubmitted): continue it.
if [ -f "$out/checkpoints/latest" ]; then args+=(--resume); fi
# shellcheck disable=SC2206
args+=(${MEDSYN_ARGS:-})

say "medsyn ${args[*]} (restart ${SLURM_RESTART_COUNT:-0})"
"${MEDSYN_CMD[@]}" "${args[@]}" &  # the trainer itself is the child: the signal reaches it
pid=$!
# Slurm signals this shell (B:USR1); pass it on to the trainer, which checkpoints and exits 3.
trap 'say "USR1: asking the trainer to checkpoint"; kill -USR1 "$pid" 2>/dev/null || true' USR1
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
status=0
while true; do
  wait "$pid" && status=0 || status=$?
  kill -0 "$pid" 2>/dev/null || break  # wait returned because of a trapped signal: wait again
done
if [ "$status" = 3 ]; then
  say "checkpoint written; requeueing job $SLURM_JOB_ID (it resumes with --resume)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
say "medsyn train exited with status $status"
exit "$status"
