#!/usr/bin/env bash
# Sample a synthetic cohort as an array job: task I of N samples shard I/N of the volumes into
# MEDSYN_OUT.shards/I (resumable: a requeued task skips finished volumes); when every task has
# succeeded, a dependent job merges the shards into MEDSYN_OUT (one cohort, one signed
# provenance.json) that `medsyn publish` accepts. A failed task leaves the merge unrun.
#
#   sbatch slurm/sample.sh                                  # 4 shards, the defaults below
#   sbatch --array=0-15 slurm/sample.sh                     # 16 shards
#   MEDSYN_RUN=runs/site MEDSYN_MASKS=relocate:cohorts/site MEDSYN_OUT=synth/site sbatch slurm/sample.sh
#
# Variables (defaults in brackets; paths relative to the folder you submit from):
#   MEDSYN_RUN        run dir or EMA weights file [runs/site]
#   MEDSYN_MASKS      mask source: relocate:DIR, cohort:DIR or request:FILE [relocate:cohorts/site]
#   MEDSYN_OUT        the merged synthetic cohort [synth/site]
#   MEDSYN_SAMPLER    ddpm | ddim | dpm++ | sde-dpm++;  MEDSYN_STEPS  [the config's sample section]
#   MEDSYN_PER_MASK [1];  MEDSYN_SEED [0]
#   MEDSYN_REQUEST_COHORT  the cohort holding a request's cases (with MEDSYN_MASKS=request:FILE)
#   MEDSYN_MAX_VOLUMES     the most volumes a request may ask for [the config's sample.max_volumes]
#   MEDSYN_PRECISION  fp32 | bf16 | fp16 [fp32];  MEDSYN_DEVICE auto | cpu | cuda [auto]
#   MEDSYN_STREAM_GB  z-slab streaming budget in GiB for volumes too large for the GPU [off]
#   MEDSYN_WINDOW     patch (network on windows of its training patch) | whole [the config's sample.window]
#   MEDSYN_SITE_KEY   the site key (must exist: it signs the provenance) [~/.config/medsyn/site.key]
#   MEDSYN_KEEP_SHARDS  1 keeps MEDSYN_OUT.shards after the merge [0]
#   MEDSYN_LOG_DIR    where the merge job's log goes [.]
#   APPTAINER/IMAGE, MEDSYN_BINDS, MEDSYN_VENV, MEDSYN_REPO: see slurm/common.sh
#SBATCH --job-name=medsyn-sample
#SBATCH --array=0-3
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
here="${MEDSYN_REPO:+$MEDSYN_REPO/slurm}"
[ -n "$here" ] || here="$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")"
source "$here/common.sh"

out="${MEDSYN_OUT:-synth/site}"
shards="$out.shards"
key="${MEDSYN_SITE_KEY:-$HOME/.config/medsyn/site.key}"
if [ ! -f "$key" ]; then
  echo "sample.sh: site key $key not found: the key that made the cohort must sign the provenance (set MEDSYN_SITE_KEY)" >&2
  exit 1
fi

if [ "${1:-}" = merge ]; then
  n="${MEDSYN_SHARDS:?MEDSYN_SHARDS (the number of shards) is set by the array job}"
  dirs=()
  for ((i = 0; i < n; i++)); do dirs+=("$shards/$i"); done
  say "merging $n shard(s) into $out"
  medsyn sample-merge "${dirs[@]}" --out "$out" --site-key "$key"
  [ "${MEDSYN_KEEP_SHARDS:-0}" = 1 ] || rm -rf "$shards"
  exit 0
fi

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "sample.sh: submit it as an array job (sbatch slurm/sample.sh, or sbatch --array=0-N slurm/sample.sh)" >&2
  exit 1
fi
task="$SLURM_ARRAY_TASK_ID"
count="$SLURM_ARRAY_TASK_COUNT"
if [ "${SLURM_ARRAY_TASK_MIN}" != 0 ] || [ "${SLURM_ARRAY_TASK_MAX}" != $((count - 1)) ]; then
  echo "sample.sh: the array must be 0..N-1 (got ${SLURM_ARRAY_TASK_MIN}-${SLURM_ARRAY_TASK_MAX} for $count tasks)" >&2
  exit 1
fi
submit_after_array medsyn-sample-merge "MEDSYN_SHARDS=$count bash $SLURM_DIR/sample.sh merge"

args=(sample --run "${MEDSYN_RUN:-runs/site}" --masks "${MEDSYN_MASKS:-relocate:cohorts/site}"
      --out "$shards/$task" --shard "$task/$count" --site-key "$key"
      ${MEDSYN_SAMPLER:+--sampler "$MEDSYN_SAMPLER"} ${MEDSYN_STEPS:+--steps "$MEDSYN_STEPS"} --per-mask "${MEDSYN_PER_MASK:-1}"
      ${MEDSYN_REQUEST_COHORT:+--request-cohort "$MEDSYN_REQUEST_COHORT"} ${MEDSYN_MAX_VOLUMES:+--max-volumes "$MEDSYN_MAX_VOLUMES"}
      --seed "${MEDSYN_SEED:-0}" --precision "${MEDSYN_PRECISION:-fp32}" --device "${MEDSYN_DEVICE:-auto}"
      ${MEDSYN_STREAM_GB:+--stream-gb "$MEDSYN_STREAM_GB"} ${MEDSYN_WINDOW:+--window "$MEDSYN_WINDOW"})
say "medsyn ${args[*]}"
medsyn "${args[@]}"
