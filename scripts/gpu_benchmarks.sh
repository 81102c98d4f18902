#!/usr/bin/env bash
# The real-size figures of docs/benchmarks.md in one run (issue 26): `spo benchmark
# --baseline released` for every real preset (random weights, nothing downloaded), eager and
# with `speed.compile=regional`, each preset's JSON and table under $OUT. Ordered so that
# the most wanted figures come first: a run cut short by its time limit still returns them.
#   PRESETS="tiny tiny_flow" REPEATS=1 bash scripts/gpu_benchmarks.sh   # a CPU dry run
# On the device machine carry the missing packages as wheels in .whl/ (scripts/device_check.sh).
set -uo pipefail  # not -e: one preset that fails (e.g. out of memory) must not stop the rest
if [ -d .whl ] && [ -z "${NOINSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_bench}; mkdir -p "$OUT"
PY=${PY:-python3}; REPEATS=${REPEATS:-3}
PRESETS=${PRESETS:-"sd15 sdxl sd35m flux"}
COMPILE=${COMPILE:-"none regional"}
(nvidia-smi --query-gpu=name,memory.total --format=csv || true) > "$OUT/gpu.txt"
for preset in $PRESETS; do
  extra=""
  # full fine-tuning of the big denoisers does not fit one GPU beside the rest: LoRA only
  case $preset in sdxl|sd35m|flux) extra="dpo_modes=[lora]";; esac
  for compile in $COMPILE; do
    name="${preset}_${compile}"
    rm -rf "/tmp/bench_$name"; start=$(date +%s)
    $PY -m spo.cli benchmark --preset "$preset" --baseline released --out "/tmp/bench_$name" \
      repeats="$REPEATS" speed.compile="$compile" $extra > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
    cp "/tmp/bench_$name/benchmark.json" "$OUT/$name.json" 2>/dev/null || true
    cp "/tmp/bench_$name/benchmark.md" "$OUT/$name.md" 2>/dev/null || true
  done
done
cat "$OUT/times.txt"
