#!/usr/bin/env bash
# The encoder's next round on one GPU (about 10 minutes on an H100-class GPU): the steps the
# 2-core CPU cannot afford (docs/encoder-plan.md, "Round 2", what is left to try).
#
# 1. The full target set: every training identity (672) x 2 image sets x 100 classic steps,
#    64 targets per UNet batch; the factory's log has its throughput (concept-steps/s).
# 2. Regression onto it (the head alone, no UNet): seconds.
# 3. From the regressed head, the denoising loss through the frozen UNet (E4T-style) at a GPU
#    batch for DENOISE_STEPS steps: on the CPU only 300-1,000 steps of batch 8 were affordable.
# 4. Both encoders, and classic:10 / classic:100 from the class word, on all 24 VALIDATION
#    concepts at 4 samples per prompt, merged into one table (the test split is not read).
#
#     bash benchmarks/gpu_encoder_round.sh             # on the GPU machine
#     DEVICE=cpu IDENTITIES=4 TARGET_STEPS=2 REGRESS_STEPS=4 DENOISE_STEPS=2 DENOISE_BATCH=2 \
#         CONCEPTS=1 SAMPLES=1 EVAL_STEPS=2 bash benchmarks/gpu_encoder_round.sh   # a dry run
#
# Writes $OUT/targets/ (the factory), $OUT/regress/ and $OUT/denoise/ (train_encoder.py
# runs), $OUT/eval-*/ and the merged table $OUT/validation/results.md, and $OUT/times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-encoder}
DEVICE=${DEVICE:-cuda}
IDENTITIES=${IDENTITIES:-672}
TARGET_STEPS=${TARGET_STEPS:-100}
BATCH_CONCEPTS=${BATCH_CONCEPTS:-64}
REGRESS_STEPS=${REGRESS_STEPS:-4000}
DENOISE_STEPS=${DENOISE_STEPS:-2000}
DENOISE_BATCH=${DENOISE_BATCH:-32}
# The offset term pulls a regressed start back to the class word under the denoising loss;
# validation chose none (docs/encoder-plan.md, round 5).
REG_WEIGHT=${REG_WEIGHT:-0}
CONCEPTS=${CONCEPTS:-24}
SAMPLES=${SAMPLES:-4}
EVAL_STEPS=${EVAL_STEPS:-30}
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
timed() {  # timed NAME COMMAND...: runs it and appends its wall seconds to times.txt
    local name=$1 start
    shift
    start=$(date +%s)
    "$@"
    echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
}
resume=()
if [ -f "$OUT/targets/factory.json" ]; then resume=(--resume); fi

# 1. Targets.
timed factory "$PYTHON" make_targets.py --model checkpoints/world --out "$OUT/targets" \
    --steps "$TARGET_STEPS" --identities "$IDENTITIES" --image-sets 2 \
    --batch-concepts "$BATCH_CONCEPTS" --device "$DEVICE" --quiet "${resume[@]}"

# 2. Regression (round 1's recipe); 3. the denoising loss from it.
common=(--preset world-cpu --model checkpoints/world --device "$DEVICE" --threads 4
    --val-suite none --quiet)
rm -rf "$OUT/regress" "$OUT/denoise"
timed regress "$PYTHON" train_encoder.py "${common[@]}" --out "$OUT/regress" \
    --objective regress --target-table "$OUT/targets" --steps "$REGRESS_STEPS" \
    --warmup 200 --lr 1e-3
timed denoise "$PYTHON" train_encoder.py "${common[@]}" --out "$OUT/denoise" \
    --init-encoder "$OUT/regress/encoder.safetensors" --steps "$DENOISE_STEPS" \
    --batch "$DENOISE_BATCH" --warmup 50 --lr 1e-4 --reg-weight "$REG_WEIGHT"

# 4. Validation.
SUITE=$OUT/suite-validation
if [ ! -f "$SUITE/suite.json" ]; then
    "$PYTHON" -m oneword.cli world suite --split validation --out "$SUITE"
fi
evaluate() {  # evaluate NAME METHODS [ENCODER]
    local encoder=()
    if [ -n "${3:-}" ]; then encoder=(--encoder "$3"); fi
    timed "eval $1" "$PYTHON" -m oneword.cli eval --suite "$SUITE" --methods "$2" \
        --device "$DEVICE" --samples "$SAMPLES" --seed 0 --steps "$EVAL_STEPS" \
        --concepts "$CONCEPTS" --quiet --out "$OUT/eval-$1" "${encoder[@]}"
}
evaluate classic classword,classic:10,classic:100
evaluate shipped encoder,encoder+refine:10 checkpoints/world-encoder.safetensors
evaluate regress encoder,encoder+refine:10 "$OUT/regress/encoder.safetensors"
evaluate denoise encoder,encoder+refine:10 "$OUT/denoise/encoder.safetensors"
"$PYTHON" benchmarks/merge_eval.py "$OUT/validation" "$OUT/eval-classic" \
    "$OUT/eval-shipped=shipped" "$OUT/eval-regress=regress" "$OUT/eval-denoise=denoise"
echo "validation table: $OUT/validation/results.md; times: $OUT/times.txt"
