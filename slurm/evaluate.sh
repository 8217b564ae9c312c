#!/usr/bin/env bash
# The nnU-Net utility evaluation as an array job: one task per (arm, seed) trains, predicts and
# scores one nnU-Net; when every task has succeeded a dependent job writes the report. A failed
# task leaves the report unrun (resubmit the failed task; finished trainings are kept).
# The workspace must be prepared first (minutes, one CPU):
#   medsyn evaluate prepare --ws eval/site --real cohorts/site --synthetic release/site/nifti --seeds 5
#   sbatch --array=0-14 slurm/evaluate.sh                  # 3 arms x 5 seeds (the default)
#   MEDSYN_ARMS="real real+targeted" MEDSYN_SEEDS=5 sbatch --array=0-9 slurm/evaluate.sh
#   # the low-data curve (prepared with --real-sizes 4 --real-sizes 8):
#   MEDSYN_ARMS="real@4 real+synthetic@4 real@8 real+synthetic@8" sbatch --array=0-19 slurm/evaluate.sh
#
# Variables (defaults in brackets):
#   MEDSYN_WS          the prepared evaluation workspace [eval/site]
#   MEDSYN_ARMS        space-separated arms [real synthetic real+synthetic]; task I runs arm I / SEEDS
#   MEDSYN_SEEDS       trainings per arm [5]; the array must be 0..ARMS*SEEDS-1
#   MEDSYN_TRAINER     nnU-Net trainer [nnUNetTrainer];  MEDSYN_DEVICE cpu | cuda [cuda]
#   MEDSYN_EPOCHS, MEDSYN_ITERATIONS  for nnUNetTrainer_medsyn (short CPU runs) [2, 5]
#   MEDSYN_BATCH       replaces the plans' batch size (nnUNetTrainer_medsyn) [the plans']
#   MEDSYN_LOG_DIR     where the report job's log goes [.]
#   APPTAINER/IMAGE, MEDSYN_BINDS, MEDSYN_VENV, MEDSYN_REPO: see slurm/common.sh
#SBATCH --job-name=medsyn-evaluate
#SBATCH --array=0-14
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
here="${MEDSYN_REPO:+$MEDSYN_REPO/slurm}"
[ -n "$here" ] || here="$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")"
source "$here/common.sh"

ws="${MEDSYN_WS:-eval/site}"
if [ "${1:-}" = report ]; then
  say "writing the report of $ws"
  medsyn evaluate report --ws "$ws"
  exit 0
fi

read -r -a arms <<< "${MEDSYN_ARMS:-real synthetic real+synthetic}"
seeds="${MEDSYN_SEEDS:-5}"
n=$(( ${#arms[@]} * seeds ))
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ "${SLURM_ARRAY_TASK_COUNT}" != "$n" ] || [ "${SLURM_ARRAY_TASK_MIN}" != 0 ]; then
  echo "evaluate.sh: ${#arms[@]} arm(s) x $seeds seed(s): submit with sbatch --array=0-$((n - 1)) slurm/evaluate.sh" >&2
  exit 1
fi
submit_after_array medsyn-evaluate-report "bash $SLURM_DIR/evaluate.sh report"

task="$SLURM_ARRAY_TASK_ID"
arm="${arms[$((task / seeds))]}"
seed=$((task % seeds))
args=(evaluate train --ws "$ws" --arm "$arm" --seed "$seed" --trainer "${MEDSYN_TRAINER:-nnUNetTrainer}"
      --device "${MEDSYN_DEVICE:-cuda}" --epochs "${MEDSYN_EPOCHS:-2}" --iterations "${MEDSYN_ITERATIONS:-5}")
if [ -n "${MEDSYN_BATCH:-}" ]; then args+=(--batch-size "$MEDSYN_BATCH"); fi
# A requeued task continues nnU-Net's latest checkpoint.
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then args+=(--resume); fi
say "medsyn ${args[*]}"
medsyn "${args[@]}"
