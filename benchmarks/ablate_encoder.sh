#!/usr/bin/env bash
# The ablation behind train_encoder.py's loss weights, on the miniature world.
#
# 1. Distillation targets: classic inversion (500 steps, batched, 8 concepts per UNet
#    batch) of every 7th training identity (100 concepts; none of them held out).
# 2. Encoders with the same seed, data stream and 1,500 steps, differing only in the loss
#    and in how far from the class word c their rows may go (--offset-scale alpha:
#    ||v - c|| <= alpha ||c||): the denoising loss alone (+ the 1e-3 offset regulariser) at
#    alpha 1 (the old default) and 6, and with the distillation term toward the targets
#    (weight 0.1) at alpha 6, there also with the offset regulariser at 0 and 1e-2, and
#    trained on to 3,500 steps (the last --steps wins; resuming the 1,500-step arm with
#    --resume --steps 3500 gives the same weights). The targets lie 4-6 ||c|| from c
#    (train_encoder.py logs it as "distill_targets"), out of reach at alpha 1.
# 3. Each encoder alone on the held-out suite with `oneword eval --methods encoder`
#    (identity, editability, CLIP-I by the oracle and the world's CLIP; DDIM 30, g5).
#
# Writes $OUT/distill/, $OUT/arm-*/ (encoders, logs) and $OUT/eval-*/results.md, and prints
# one table. Steps 1-2 skip what is already finished, so an interrupted run continues.
# Settings: MODEL, SUITE, OUT, STEPS, PYTHON environment variables. The arms are independent:
# on 2 cores, two of them side by side at one thread each take ~20 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-checkpoints/world}
SUITE=${SUITE:-runs/world-suite}
OUT=${OUT:-runs/ablate-encoder}
STEPS=${STEPS:-1500}

# 1. Targets.
if [ ! -f "$OUT/train-suite/suite.json" ]; then
    "$PYTHON" -c "import sys; from oneword.datasets.suite import write_world_suite as w; \
from oneword.datasets.world import training_identities as t; w(sys.argv[1], identities=t()[::7])" \
        "$OUT/train-suite"
fi
if [ ! -f "$OUT/distill/done" ]; then
    "$PYTHON" -m oneword.cli invert --model "$MODEL" --concepts "$OUT/train-suite" \
        --init object --steps 500 --no-samples --seed 0 --out "$OUT/distill"
    touch "$OUT/distill/done"
fi

# 2. The arms: name and extra options.
arms=("distill0.1-offset6:--offset-scale 6 --distill $OUT/distill --distill-weight 0.1"
      "denoise-offset6:--offset-scale 6" "denoise-offset1:--offset-scale 1"
      "distill0.1-offset6-reg0:--offset-scale 6 --distill $OUT/distill --reg-weight 0"
      "distill0.1-offset6-reg1e-2:--offset-scale 6 --distill $OUT/distill --reg-weight 1e-2"
      "distill0.1-offset6-3500:--offset-scale 6 --distill $OUT/distill --steps 3500")
for arm in "${arms[@]}"; do
    name=${arm%%:*}
    # shellcheck disable=SC2086  # the options are meant to split
    [ -f "$OUT/arm-$name/encoder.safetensors" ] || \
        "$PYTHON" train_encoder.py --preset world-cpu --model "$MODEL" --steps "$STEPS" \
            --seed 0 --out "$OUT/arm-$name" ${arm#*:}
done

# 3. Each encoder alone on the held-out concepts.
for arm in "${arms[@]}"; do
    name=${arm%%:*}
    [ -f "$OUT/eval-$name/results.json" ] || \
        "$PYTHON" -m oneword.cli eval --model "$MODEL" --suite "$SUITE" --methods encoder \
            --encoder "$OUT/arm-$name/encoder.safetensors" --samples 4 --seed 0 --steps 30 \
            --guidance 5 --clip world --concepts 12 --no-check-score --out "$OUT/eval-$name"
done
for arm in "${arms[@]}"; do
    name=${arm%%:*}
    echo "## $name"
    grep '^| encoder |' "$OUT/eval-$name/results.md"
done
