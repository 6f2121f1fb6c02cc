#!/usr/bin/env bash
# The benchmark behind every quality and speed claim on the miniature world.
#
# 1. Write the world's held-out suite: 24 concepts (18 with a shape, colour or pattern the
#    captions never name), 5 images each, with ground truth and >= 8 edit prompts each.
# 2. Evaluate: the class word (no learning, the floor); the shipped encoder alone and with
#    50 refinement steps; classic textual inversion (Gal et al.) at 50, 150, 500 and 1,500
#    steps (one 1,500-step run per concept with snapshots: the identity-vs-steps curve and
#    the reconstruction-vs-editability trade-off in tradeoff.png). Identity/editability by
#    the world's oracle, CLIP-I/CLIP-T by the world's own CLIP; every token also gets the
#    fallback check's score (check.png, and the fallback rates in results.md). 8 samples
#    per prompt, DDIM 30 steps, guidance 5, seed 0 (the same sample seeds for every method).
#
# Writes $OUT/results.json, results.md, tradeoff.png, check.png, grids/<method>.png,
# embeddings/.
# Extra arguments go to `oneword eval` and win over the ones below, e.g. a quick look:
#   bash benchmarks/eval_world.sh --concepts 2 --samples 2
# Settings: MODEL, SUITE, OUT, PYTHON environment variables. On a CPU shared with other
# jobs, set OMP_NUM_THREADS (two 2-thread jobs on 2 cores run 10x slower).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-checkpoints/world}
SUITE=${SUITE:-runs/world-suite}
OUT=${OUT:-runs/eval-world}

# 1. The suite (written once; an existing one is reused as it is).
if [ ! -f "$SUITE/suite.json" ]; then
    "$PYTHON" -m oneword.cli world suite --out "$SUITE" --images 5 --seed 0
fi

# 2. The evaluation.
"$PYTHON" -m oneword.cli eval \
    --model "$MODEL" \
    --suite "$SUITE" \
    --methods classword,encoder,encoder+refine:50,classic:50,classic:150,classic:500,classic:1500 \
    --samples 8 \
    --seed 0 \
    --steps 30 \
    --guidance 5 \
    --clip world \
    --out "$OUT" \
    "$@"
