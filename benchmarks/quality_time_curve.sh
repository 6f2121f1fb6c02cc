#!/usr/bin/env bash
# The quality-time curve: the benchmark that judges the encoder (docs/encoder-plan.md, step 6).
#
# On one suite (the test split by default): classic inversion from the class word at 10 to
# 1,000 steps (one 1,000-step run per concept with snapshots), the shipped encoder alone and
# with 5, 10, 25 and 50 refinement steps; 4 samples per prompt, standard errors over concepts.
# The 24 concepts run as two halves side by side, one thread each (the 2-core CPU), each
# resumable: run the script again after a stop and only the missing rows are scored. When
# both halves are done, they are pooled into $REPORT (results.md: the quality-time table,
# classic's plateau and the seconds it first needed to reach it; quality_time.png).
#
# Settings (environment): SPLIT (test|validation), SEED (the suite's scenes and the
# samples), THRESHOLD (the fallback check's threshold, chosen on validation), METHODS,
# SAMPLES, ENCODER, OUT (working folders), REPORT (the pooled report), PYTHON.
#   SPLIT=test SEED=0 THRESHOLD=0.78 bash benchmarks/quality_time_curve.sh
# Extra arguments go to both halves' `oneword eval`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
SPLIT=${SPLIT:-test}
SEED=${SEED:-0}
SAMPLES=${SAMPLES:-4}
ENCODER=${ENCODER:-checkpoints/world-encoder.safetensors}
METHODS=${METHODS:-classword,classic:10,classic:25,classic:50,classic:100,classic:150,classic:300,classic:1000,encoder,encoder+refine:5,encoder+refine:10,encoder+refine:25,encoder+refine:50}
SUITE=${SUITE:-runs/suite-$SPLIT-seed$SEED}
OUT=${OUT:-runs/curve-$SPLIT-seed$SEED}
REPORT=${REPORT:-$OUT/pooled}
THRESHOLD_ARGS=()
if [ -n "${THRESHOLD:-}" ]; then THRESHOLD_ARGS=(--check-threshold "$THRESHOLD"); fi

if [ ! -f "$SUITE/suite.json" ]; then
    "$PYTHON" -m oneword.cli world suite --split "$SPLIT" --seed "$SEED" --out "$SUITE"
fi

half() {  # half NAME CONCEPTS
    local out="$OUT/$1" resume=()
    if [ -f "$out/progress/run.json" ]; then resume=(--resume); fi
    OMP_NUM_THREADS=1 "$PYTHON" -m oneword.cli eval --suite "$SUITE" --methods "$METHODS" \
        --encoder "$ENCODER" --samples "$SAMPLES" --seed "$SEED" --concepts "$2" \
        --quiet --out "$out" "${THRESHOLD_ARGS[@]}" "${resume[@]}" "${@:3}" \
        > "$OUT/$1.log" 2>&1
}

mkdir -p "$OUT"
half a 0:12 "$@" &
half b 12:24 "$@" &
status=0
wait %1 || status=1
wait %2 || status=1
if [ "$status" != 0 ]; then
    echo "quality_time_curve.sh: a half failed; see $OUT/a.log and $OUT/b.log" >&2
    exit 1
fi
"$PYTHON" benchmarks/merge_eval.py --pool "$REPORT" "$OUT/a" "$OUT/b"
echo "quality-time report: $REPORT/results.md"
