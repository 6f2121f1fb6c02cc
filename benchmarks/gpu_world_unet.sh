#!/usr/bin/env bash
# The world UNet continued on one GPU (issue: the miniature world, pattern fidelity >= 90%).
#
# On the 2-core CPU a step of the shipped UNet (attention at 16x16) costs 2-5 s, so v3 saw
# about 5,500 steps of 96 latents in 5.4 h, and the caption levers' arm only 800 of them.
# A GPU runs the same recipe at a far larger scale in minutes. Three arms continue the
# shipped UNet side by side on the one device, each capped at SECONDS_PER_ARM of training
# (the learning rate's cosine follows that time), with the gpu preset's batch of 256 and EMA
# 0.9995 and a latent pool of POOL renders:
#   levers         the shipped UNet's own recipe (the caption levers), continued
#   checkered      the same with checkered drawn twice as often (v3's weakest pattern)
#   checkered_lr2  the same at twice the peak learning rate (2e-4)
# Then the base and each arm are measured with the fidelity command of docs/world.md (240 captions,
# DDIM 30, guidance 5, seed 0) on the same device, and caption_levers.sh prints one table.
# The numbers the README and the model card quote are measured on the CPU afterwards: a GPU
# samples with other kernels, so its fidelity run is a guide, not the record.
#
#     bash benchmarks/gpu_world_unet.sh                                     # on a CUDA machine
#     MODEL=/tmp/tw DEVICE=cpu SECONDS_PER_ARM=5 POOL=64 CAPTIONS=4 PRESET=tiny \
#         bash benchmarks/gpu_world_unet.sh                                 # a dry run
#
# Writes $OUT (the runs, resumable) and, under $RESULTS, one ARM-unet.tar per arm (its
# unet/ folder and world.json: what would replace checkpoints/world/unet/) as soon as the
# arms finish, then table.md and logs.tar (logs, fidelity reports, training logs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-world-unet}
RESULTS=${RESULTS:-$OUT/results}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-gpu}
SECONDS_PER_ARM=${SECONDS_PER_ARM:-300}
POOL=${POOL:-60000}
CAPTIONS=${CAPTIONS:-240}
mkdir -p "$OUT" "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)

# Fail in seconds, not after the training, when the machine lacks a package or the device.
"$PYTHON" - "$DEVICE" <<'PY' | tee "$RESULTS/device.txt"
import sys, torch, diffusers, transformers
import oneword.world.fidelity  # noqa: F401
from oneword.cli.world import load_train_script
assert load_train_script() is not None, "no train_world.py beside the oneword package"
device = torch.device(sys.argv[1])
if device.type == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, {name}")
PY

levers="--unet-omit-solid 0 --unet-unnamed-pattern-weight 0.25"
export PYTHON OUT DEVICE PRESET POOL CAPTIONS
export MODEL=${MODEL:-checkpoints/world} STEPS=1000000 LR=1e-4 THREADS=2 FIDELITY_EVERY=1000
export LEVERS="$levers"
export ARMS="levers checkered checkered_lr2"
export ARM_checkered="$levers --unet-pattern-weight checkered=2"
export ARM_checkered_lr2="$levers --unet-pattern-weight checkered=2 --unet-lr 2e-4"
export COMMON="--stage-seconds unet=$SECONDS_PER_ARM"

start=$(date +%s)
FIDELITY=0 bash benchmarks/caption_levers.sh
echo "arms trained in $(( $(date +%s) - start )) s" | tee "$RESULTS/times.txt"
for arm in $ARMS; do
    tar -cf "$RESULTS/$arm-unet.tar" -C "$OUT/$arm/world" unet world.json
done
bash benchmarks/caption_levers.sh | tee "$RESULTS/table.md"
echo "measured in $(( $(date +%s) - start )) s" | tee -a "$RESULTS/times.txt"
(cd "$OUT" && tar -cf "$RESULTS/logs.tar" ./*.log ./*/fidelity.json ./*/work/log.jsonl)
