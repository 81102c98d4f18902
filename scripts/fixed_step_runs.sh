#!/usr/bin/env bash
# Fixed-step runs of the three trainers on the toy configs (SPM; DPO LoRA and full; SPO and
# its multi-step variant, with accumulation, checkpoints and scored validation images), then a
# digest of every final weights file and of the metrics. Run it before and after a change that
# must not change what is trained; the two outputs must be equal.
# Usage: scripts/fixed_step_runs.sh OUT   (WORLD=folder reuses a toy world; PYTHON=interpreter;
# DPO_ARGS / SPO_ARGS: extra overrides, e.g. SPO_ARGS=speed.share_start=false)
set -euo pipefail
OUT=$(realpath -m "$1"); REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-$REPO/.venv/bin/python}
SPO="env PYTHONPATH=$REPO $PY -m spo.cli"
export OMP_NUM_THREADS=2
W=$(realpath -m "${WORLD:-$OUT/../world}")
if [ ! -f $W/pairs/train.parquet ]; then
  $SPO toy-world --out $W train_pairs=300 validation_pairs=64 grid_prompts=2 grid_images_per_prompt=2 > /dev/null 2>&1
fi
rm -rf $OUT; mkdir -p $OUT
C="base_model=$W/base_model pairs.train=$W/pairs/train.parquet"
$SPO train-preference-model --config configs/toy/spm.yaml --out $OUT/spm $C pairs.validation=$W/pairs/validation.parquet \
  max_steps=6 batch_size=8 validation_every=3 validation_pairs_periodic=16 checkpoint_every=3 gradient_accumulation_steps=2 >$OUT/spm.log 2>&1
$SPO train-dpo --config configs/toy/dpo.yaml --out $OUT/dpo $C max_steps=6 batch_size=4 checkpoint_every=3 \
  gradient_accumulation_steps=2 validation_images.every=3 validation_images.scorers=[toy_pickscore,oracle] validation_images.select_by=toy_pickscore ${DPO_ARGS:-} >$OUT/dpo.log 2>&1
$SPO train-dpo --config configs/toy/dpo.yaml --out $OUT/dpo_full $C max_steps=3 batch_size=2 checkpoint_every=2 \
  policy.mode=full loss=dpo validation_images.prompts=[] ${DPO_ARGS:-} >$OUT/dpo_full.log 2>&1
$SPO train-spo --config configs/toy/spo.yaml --out $OUT/spo base_model=$W/base_model spm=$OUT/spm/final \
  prompts=$W/prompts/train.txt max_prompts=8 sample_batch_size=4 batch_size=2 max_epochs=2 gradient_accumulation_steps=2 \
  sampler.threshold=0.05 validation_images.every=2 validation_images.scorers=[toy_pickscore,oracle] validation_images.select_by=toy_pickscore ${SPO_ARGS:-} >$OUT/spo.log 2>&1
$SPO train-spo --config configs/toy/spo.yaml --out $OUT/spo_seg base_model=$W/base_model spm=$OUT/spm/final \
  prompts=$W/prompts/train.txt max_prompts=4 sample_batch_size=4 batch_size=2 max_epochs=1 \
  sampler.threshold=0.0 sampler.inner_steps=1 sampler.k=2 validation_images.prompts=[] ${SPO_ARGS:-} >$OUT/spo_seg.log 2>&1
$PY "$REPO/scripts/weights_digest.py" "$OUT"
(cd "$OUT" && sha256sum spm/eval.json | cut -c1-16,65-)
for f in "$OUT"/*/metrics.jsonl; do
  # metrics without their wall-clock fields: equal runs give equal lines
  echo "$($PY - "$f" <<'PYEOF'
import hashlib, json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    for k in ("time", "elapsed_s", "val/train_seconds"):
        r.pop(k, None)
print(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16], len(rows), end=" ")
PYEOF
)${f#$OUT/}"
done
