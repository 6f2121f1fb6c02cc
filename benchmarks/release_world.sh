#!/usr/bin/env bash
# Everything that has to be measured again before a new world model replaces
# checkpoints/world: its numbers are the yardstick of every quality claim, and the shipped
# encoder's distillation targets come from the world's UNet.
#
# 1. Prompt fidelity: 240 captions (the model card's table, with the VAE ceiling and the
#    per-pattern confusion) and the caption -> samples grid.
# 2. Distillation targets on the candidate's UNet (classic inversion, 500 steps, of every
#    7th training identity) and the encoder retrained with the shipped recipe
#    (checkpoints/README.md, "the world encoder").
# 3. The held-out suite, all 24 concepts, 4 samples per prompt: the class word, the new
#    encoder alone and with 50 refinement steps, and classic inversion at 3,000 steps with
#    snapshots at 50/150/500/1,500 (one run per concept), with the fallback check's scores.
#    Concepts 1-12 and 13-24 run as two jobs side by side (one thread each) and are merged.
# 4. `oneword demo` on the candidate and its encoder (the README's first command), timed.
#
# Writes $OUT/fidelity.json, fidelity-grid.png, distill/, encoder/, eval-1-12/,
# eval-13-24/, eval/ (merged report) and demo/. Every step skips what is already finished,
# so an interrupted run continues; the distillation and the encoder resume from their
# checkpoints, an interrupted evaluation half continues from its finished concepts
# (`oneword eval --resume`). Measured cost on the 2-core CPU with the v2-sized UNet:
# step 2 ~45 min, step 3 ~1.5 h per half at one thread (classic:3000 is 220 s per
# concept); a UNet with 16x16 attention takes about twice that.
# Settings: MODEL (the candidate's pipeline folder, required), SUITE, OUT, PYTHON; for a
# quick dry run of the script itself: CAPTIONS, DISTILL_EVERY, DISTILL_STEPS, ENCODER_STEPS,
# METHODS, HALVES (NAME:START:END ...), SAMPLES, e.g.
#   MODEL=checkpoints/world OUT=/tmp/release CAPTIONS=4 DISTILL_EVERY=300 DISTILL_STEPS=2 \
#   ENCODER_STEPS=2 METHODS=classword,encoder+refine:2,classic:2 HALVES="a:0:1 b:1:2" \
#   SAMPLES=1 bash benchmarks/release_world.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:?set MODEL to the candidate world folder, e.g. MODEL=runs/world5a}
SUITE=${SUITE:-runs/world-suite}
OUT=${OUT:-runs/release-$(basename "$MODEL")}
CAPTIONS=${CAPTIONS:-240}
DISTILL_EVERY=${DISTILL_EVERY:-7}
DISTILL_STEPS=${DISTILL_STEPS:-500}
ENCODER_STEPS=${ENCODER_STEPS:-1500}
# Methods run in this order over all concepts. classic:50 learns every classic row (one
# 3,000-step run per concept with snapshots); the later classic labels only sample, so
# classic:3000, the reference the README compares against, comes right after it.
METHODS=${METHODS:-classword,encoder,encoder+refine:50,classic:50,classic:3000,classic:1500,classic:500,classic:150}
HALVES=${HALVES:-1-12:0:12 13-24:12:24}
SAMPLES=${SAMPLES:-4}
mkdir -p "$OUT"

# 1. Fidelity (README defaults: DDIM 30, guidance 5).
if [ ! -f "$OUT/fidelity.json" ]; then
    "$PYTHON" -m oneword.cli world fidelity --model "$MODEL" --captions "$CAPTIONS" --samples 1 \
        --steps 30 --guidance 5 --seed 0 --ceiling --json "$OUT/fidelity.json"
fi
if [ ! -f "$OUT/fidelity-grid.png" ]; then
    "$PYTHON" -m oneword.cli world fidelity --model "$MODEL" --captions 8 --samples 4 \
        --steps 30 --guidance 5 --seed 0 --grid "$OUT/fidelity-grid.png"
fi

# 2. Distillation targets and the encoder.
if [ ! -f "$OUT/train-suite/suite.json" ]; then
    "$PYTHON" -c "import sys; from oneword.datasets.suite import write_world_suite as w; \
from oneword.datasets.world import training_identities as t; w(sys.argv[1], identities=t()[::int(sys.argv[2])])" \
        "$OUT/train-suite" "$DISTILL_EVERY"
fi
# An interrupted run of either continues from its checkpoints (finished concepts are kept).
has_checkpoints() { [ -n "$(ls -A "$1/checkpoints" 2>/dev/null)" ]; }
if [ ! -f "$OUT/distill/done" ]; then
    resume=()
    has_checkpoints "$OUT/distill" && resume=(--resume)
    "$PYTHON" -m oneword.cli invert --model "$MODEL" --concepts "$OUT/train-suite" \
        --init object --steps "$DISTILL_STEPS" --no-samples --seed 0 --out "$OUT/distill" \
        "${resume[@]}"
    touch "$OUT/distill/done"
fi
if [ ! -f "$OUT/encoder/encoder.safetensors" ]; then
    resume=()
    has_checkpoints "$OUT/encoder" && resume=(--resume)
    "$PYTHON" train_encoder.py --preset world-cpu --model "$MODEL" --steps "$ENCODER_STEPS" \
        --seed 0 --offset-scale 6 --distill "$OUT/distill" --distill-weight 0.1 \
        --out "$OUT/encoder" "${resume[@]}"
fi

# 3. The held-out suite, two halves side by side.
if [ ! -f "$SUITE/suite.json" ]; then
    "$PYTHON" -m oneword.cli world suite --out "$SUITE" --images 5 --seed 0
fi
# results.json is rewritten after every method, so only `done` says a half is finished.
pids=()
evals=()
for half in $HALVES; do
    name=${half%%:*}
    evals+=("$OUT/eval-$name")
    if [ ! -f "$OUT/eval-$name/done" ]; then
        OMP_NUM_THREADS=1 "$PYTHON" -m oneword.cli eval --model "$MODEL" --suite "$SUITE" \
            --methods "$METHODS" --concepts "${half#*:}" --samples "$SAMPLES" --seed 0 --steps 30 \
            --guidance 5 --clip world --check clip --encoder "$OUT/encoder/encoder.safetensors" \
            --quiet --resume --out "$OUT/eval-$name" >> "$OUT/eval-$name.log" 2>&1 &
        pids+=($!)
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "an evaluation half failed: see $OUT/eval-*.log" >&2; exit 1; }
done
for folder in "${evals[@]}"; do touch "$folder/done"; done
# Merged again whenever a half ran, so the report never lags its halves.
if [ ! -f "$OUT/eval/results.json" ] || [ ${#pids[@]} -gt 0 ]; then
    "$PYTHON" benchmarks/merge_eval.py --pool "$OUT/eval" "${evals[@]}"
fi

# 4. The README's first command on the candidate, timed.
"$PYTHON" -m oneword.cli demo --model "$MODEL" --encoder "$OUT/encoder/encoder.safetensors" \
    --out "$OUT/demo"
echo "release measurements in $OUT: fidelity.json, eval/results.md, demo/demo.png"
