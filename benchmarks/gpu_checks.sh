#!/usr/bin/env bash
# The GPU measurements the issues ask for, as one short run on a CUDA machine
# (budget: under 10 minutes on one H100-class GPU; each step prints its own table):
#
# 1. Inversion (issue: classic inversion): our loop against the reference loop on the world
#    model and on a tiny SD1, frozen parts in bf16, with steps/s at batch 1, 4 and 8 and the
#    fraction of the UNet's own forward+backward rate that a step reaches.
# 2. Encoder pretraining throughput (issue: encoder): STEPS steps of the world recipe at a
#    GPU batch, no validation; train_encoder.py logs images/s, UNet samples/s and the data
#    loader's own rate in $OUT/encoder/log.jsonl.
# 3. World UNet training speed (issue: the miniature world): UNET_STEPS steps of the gpu
#    preset's UNet stage (batch 256) on the shipped CLIP and VAE, to size a GPU world run.
#
#     bash benchmarks/gpu_checks.sh                    # on the GPU machine
#     DEVICE=cpu STEPS=2 UNET_STEPS=2 BENCH_STEPS=6 ENC_BATCH=2 UNET_BATCH=4 \
#         FID_CAPTIONS=4 bash benchmarks/gpu_checks.sh # a dry run of the same commands
#
# Writes $OUT/*.md (tables), $OUT/encoder/log.jsonl and $OUT/world-unet.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-checks}
DEVICE=${DEVICE:-cuda}
BENCH_STEPS=${BENCH_STEPS:-50}
STEPS=${STEPS:-200}
ENC_BATCH=${ENC_BATCH:-32}
UNET_STEPS=${UNET_STEPS:-300}
UNET_BATCH=${UNET_BATCH:-256}
FID_CAPTIONS=${FID_CAPTIONS:-256}
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"

# 1. Inversion loop.
"$PYTHON" benchmarks/bench_inversion.py --model checkpoints/world --device "$DEVICE" \
    --steps "$BENCH_STEPS" | tee "$OUT/bench-inversion-world.md"
"$PYTHON" benchmarks/bench_inversion.py --model tiny --device "$DEVICE" --steps "$BENCH_STEPS" \
    | tee "$OUT/bench-inversion-tiny.md"

# 2. Encoder throughput (the shipped recipe's loss; the distillation targets are not carried).
rm -rf "$OUT/encoder"
"$PYTHON" train_encoder.py --preset world-cpu --model checkpoints/world --device "$DEVICE" \
    --steps "$STEPS" --batch "$ENC_BATCH" --threads 4 --val-every 100000 \
    --checkpoint-every 100000 --quiet --out "$OUT/encoder"
grep '"event": "end"' "$OUT/encoder/log.jsonl" | tee "$OUT/encoder-throughput.md"

# 3. World UNet steps/s: a copy of the shipped world as the stage's output folder, so the
#    stage reads the world's own CLIP and VAE; the UNet starts from scratch in a fresh work
#    folder and its weights are thrown away.
rm -rf "$OUT/world" "$OUT/world-work"
cp -r checkpoints/world "$OUT/world"
mkdir -p "$OUT/world-work"
start=$(date +%s)
"$PYTHON" -m oneword.cli world train --preset gpu --stages unet --device "$DEVICE" \
    --work "$OUT/world-work" --out "$OUT/world" --unet-steps "$UNET_STEPS" \
    --unet-batch "$UNET_BATCH" --unet-pool 4096 --fidelity-every 0 \
    --fidelity-captions "$FID_CAPTIONS" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]$" | tail -20 > "$OUT/world-unet.log"
echo "world UNet: $UNET_STEPS steps x $UNET_BATCH in $(( $(date +%s) - start )) s (pool encoding included)" \
    | tee -a "$OUT/world-unet.log"
grep '"stage": "unet"' "$OUT/world-work/log.jsonl" | tail -2 | tee -a "$OUT/world-unet.log"
