#!/usr/bin/env bash
# Device smoke check: the three trainers on CUDA, DPO and SPO under `accelerate launch
# --mixed_precision bf16` (the launcher's precision must reach training), a rerun of a finished
# run (nothing to do). STEPS=2 for a CPU dry run.
set -euo pipefail
if [ -d .whl ] && [ -z "${NOINSTALL:-}" ]; then  # packages carried as wheels (device notes)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p $OUT
PY=${PY:-python3}; STEPS=${STEPS:-40}
S="$PY -m spo.cli"; L="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no -m spo.cli"
(nvidia-smi --query-gpu=name,memory.total --format=csv || true) | tee $OUT/gpu.txt
W=/tmp/gw; rm -rf $W /tmp/gspm /tmp/gdpo /tmp/gspo
$S toy-world --out $W train_pairs=300 validation_pairs=64 grid_prompts=1 grid_images_per_prompt=1 > $OUT/world.log 2>&1
time_it() { local t0=$(date +%s.%N); "$@"; echo "$(echo "$(date +%s.%N) - $t0" | bc) s: ${*: -3}" >> $OUT/times.txt; }
time_it $S train-preference-model --config configs/toy/spm.yaml --out /tmp/gspm base_model=$W/base_model \
  pairs.train=$W/pairs/train.parquet pairs.validation=$W/pairs/validation.parquet max_steps=$STEPS > $OUT/spm.log 2>&1
D="--config configs/toy/dpo.yaml --out /tmp/gdpo base_model=$W/base_model pairs.train=$W/pairs/train.parquet max_steps=$STEPS validation_images.scorers=[toy_pickscore,oracle] validation_images.select_by=toy_pickscore validation_images.every=20"
time_it $L train-dpo $D > $OUT/dpo.log 2>&1
time_it $L train-dpo $D > $OUT/dpo_rerun.log 2>&1
time_it $L train-spo --config configs/toy/spo.yaml --out /tmp/gspo base_model=$W/base_model spm=/tmp/gspm/final \
  prompts=$W/prompts/train.txt max_prompts=40 max_epochs=2 > $OUT/spo.log 2>&1
cp /tmp/gdpo/final/train_summary.json $OUT/dpo_summary.json
cp /tmp/gspo/final/train_summary.json $OUT/spo_summary.json
cp /tmp/gspm/eval.json $OUT/spm_eval.json
grep -h "already finished\|mixed_precision" $OUT/dpo_rerun.log $OUT/dpo_summary.json $OUT/spo_summary.json || true
cat $OUT/times.txt
