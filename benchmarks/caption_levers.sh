#!/usr/bin/env bash
# Do the caption-side levers lift the world UNet's pattern fidelity? (checkpoints/README.md,
# "Where the pattern errors go": over half of the pattern errors draw an unnamed pattern,
# split or concentric, for a named one.)
#
# Arms continue the same UNet ($MODEL/unet) for the same steps, seed, data and learning
# rate schedule, side by side at THREADS threads each, and differ only in the UNet's captions
# (by default two; ARMS below adds more):
#   control  the shipped recipe: "solid" left out 60% of the time, unnamed patterns on a
#            third of the images
#   levers   $LEVERS (default: --unet-omit-solid 0 --unet-unnamed-pattern-weight 0.25,
#            i.e. "solid" written wherever a template has room, unnamed patterns on 11%)
# With CONTROL set (flags of the control arm; default none, the shipped recipe), the same
# script compares a new lever against an earlier one, e.g. CONTROL="--unet-omit-solid 0
# --unet-unnamed-pattern-weight 0.25" LEVERS="$CONTROL --unet-pattern-weight checkered=2".
# The control arm is what makes the comparison fair: a re-warmed learning rate and more
# steps move fidelity by themselves. Then each arm, and $MODEL itself, is measured with the
# fidelity command of docs/world.md (240 captions, DDIM 30, guidance 5, seed 0), and one table is
# printed: per attribute, per pattern, and how many pattern errors are unnamed patterns.
#
# Writes $OUT/ARM/world (pipeline folders), $OUT/ARM/work,
# $OUT/{base,ARM}/fidelity.json and logs; every step skips what is finished and
# the UNet runs resume, so an interrupted run continues. Measured cost on the 2-core CPU for
# the v3 UNet (attention at 16x16): about 4 s per step per arm at one thread, so ~70 min for
# 1,000 steps, plus ~6 min per fidelity run.
# Settings: MODEL, OUT, STEPS, LR, POOL (latent pool size), POOL_CACHE (a pool.safetensors of
# an earlier run with the same VAE, renderer, size and seed: copied instead of re-encoding),
# LEVERS, CONTROL, CAPTIONS, PRESET, PYTHON; THREADS (per arm, default 1), DEVICE (default
# auto), FIDELITY_EVERY (quick checks, default 500), COMMON (flags every arm gets, e.g.
# "--stage-seconds unet=300 --unet-batch 256"), and ARMS (default "control levers"): an arm
# named other than those two takes its flags from ARM_<name> (after COMMON and LR, so they
# override them). FIDELITY=0 stops after the UNet runs (a second call measures them). On a
# GPU the arms share the device, e.g. (benchmarks/gpu_world_unet.sh does this):
#   DEVICE=cuda PRESET=gpu COMMON="--stage-seconds unet=300" ARMS="levers checkered" \
#   ARM_checkered="--unet-omit-solid 0 --unet-unnamed-pattern-weight 0.25 \
#   --unet-pattern-weight checkered=2" bash benchmarks/caption_levers.sh
# A dry run of the script itself on a tiny world:
#   .venv/bin/oneword world train --preset tiny --out /tmp/tw --work /tmp/tw-work
#   MODEL=/tmp/tw OUT=/tmp/levers PRESET=tiny STEPS=2 POOL=64 CAPTIONS=4 \
#   bash benchmarks/caption_levers.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-checkpoints/world}
OUT=${OUT:-runs/caption-levers}
STEPS=${STEPS:-1000}
LR=${LR:-1e-4}
POOL=${POOL:-20000}
POOL_CACHE=${POOL_CACHE:-}
LEVERS=${LEVERS:---unet-omit-solid 0 --unet-unnamed-pattern-weight 0.25}
CONTROL=${CONTROL:-}
CAPTIONS=${CAPTIONS:-240}
PRESET=${PRESET:-cpu}
THREADS=${THREADS:-1}
DEVICE=${DEVICE:-auto}
FIDELITY_EVERY=${FIDELITY_EVERY:-500}
FIDELITY=${FIDELITY:-1}
COMMON=${COMMON:-}
ARMS=${ARMS:-control levers}
read -r -a arms <<< "$ARMS"
read -r -a common <<< "$COMMON"
mkdir -p "$OUT"

# Each arm's own flags: LEVERS, CONTROL or ARM_<name>.
arm_flags() {
    case "$1" in
        levers) echo "$LEVERS" ;;
        control) echo "$CONTROL" ;;
        *) local var="ARM_$1"; [ -n "${!var+set}" ] || { echo "arm '$1': set $var" >&2; exit 2; }
           echo "${!var}" ;;
    esac
}
for arm in "${arms[@]}"; do
    [[ "$arm" =~ ^[A-Za-z0-9_]+$ ]] || { echo "arm name '$arm': letters, digits and _ only" >&2; exit 2; }
    [ "$arm" != base ] || { echo "arm name 'base' is the measured \$MODEL itself" >&2; exit 2; }
    arm_flags "$arm" > /dev/null
done

# The UNet's architecture, read from the one being continued (--unet-init copies tensors by
# name and shape, so the arms must build the same UNet).
read -r -a arch < <("$PYTHON" - "$MODEL" <<'EOF'
import json, sys
c = json.load(open(f"{sys.argv[1]}/unet/config.json"))
heads = c["attention_head_dim"]
heads = heads if isinstance(heads, list) else [heads]
levels = sum(t.startswith("CrossAttn") for t in c["down_block_types"])
print("--unet-channels", *c["block_out_channels"], "--unet-layers", c["layers_per_block"],
      "--unet-attention-levels", levels, "--unet-attention-heads", *heads)
EOF
)

pids=()
for arm in "${arms[@]}"; do
    world="$OUT/$arm/world"
    work="$OUT/$arm/work"
    if [ ! -f "$world/model_index.json" ]; then
        rm -rf "$world.partial"
        mkdir -p "$OUT/$arm"
        cp -r "$MODEL" "$world.partial" && mv "$world.partial" "$world"
    fi
    if [ -n "$POOL_CACHE" ] && [ ! -f "$work/unet/pool.safetensors" ]; then
        mkdir -p "$work/unet"
        cp "$POOL_CACHE" "$work/unet/pool.safetensors"
    fi
    read -r -a flags <<< "$(arm_flags "$arm")"
    if [ ! -f "$work/unet/done" ]; then
        OMP_NUM_THREADS=$THREADS "$PYTHON" -m oneword.cli world train --preset "$PRESET" \
            --stages unet --device "$DEVICE" --threads "$THREADS" --seed 0 --out "$world" \
            --work "$work" --unet-init "$MODEL/unet" "${arch[@]}" --unet-steps "$STEPS" \
            --unet-lr "$LR" --unet-warmup 50 --unet-pool "$POOL" \
            --fidelity-every "$FIDELITY_EVERY" "${common[@]}" "${flags[@]}" >> "$OUT/$arm.log" 2>&1 &
        pids+=($!)
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "a UNet arm failed: see $OUT/*.log" >&2; exit 1; }
done

[ "$FIDELITY" = 0 ] && exit 0

pids=()
for arm in base "${arms[@]}"; do
    model="$OUT/$arm/world"
    [ "$arm" = base ] && model="$MODEL"
    mkdir -p "$OUT/$arm"
    if [ ! -f "$OUT/$arm/fidelity.json" ]; then
        OMP_NUM_THREADS=$THREADS "$PYTHON" -m oneword.cli world fidelity --model "$model" \
            --captions "$CAPTIONS" --samples 1 --steps 30 --guidance 5 --seed 0 \
            --json "$OUT/$arm/fidelity.json" >> "$OUT/$arm-fidelity.log" 2>&1 &
        pids+=($!)
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "a fidelity run failed: see $OUT/*-fidelity.log" >&2; exit 1; }
done

"$PYTHON" - "$OUT" base "${arms[@]}" <<'EOF'
import json, sys
from oneword.datasets.world import ATTRIBUTES, NAMED_PATTERNS, UNNAMED_PATTERNS

arms = sys.argv[2:]
reports = {a: json.load(open(f"{sys.argv[1]}/{a}/fidelity.json")) for a in arms}
print("| attribute | " + " | ".join(arms) + " |")
print("|---|" + "---:|" * len(arms))
for attr in ATTRIBUTES:
    print(f"| {attr} | " + " | ".join(f"{100 * reports[a]['per_attribute'][attr]:.1f}%" for a in arms) + " |")
print("| all at once | " + " | ".join(f"{100 * reports[a]['all']:.1f}%" for a in arms) + " |")
for p in NAMED_PATTERNS:
    print(f"| pattern {p} | " + " | ".join(f"{100 * reports[a]['per_value']['pattern'].get(p, 0):.0f}%" for a in arms) + " |")
row = []
for a in arms:
    asked = reports[a]["confusion"]["pattern"]
    wrong = sum(n for want, got in asked.items() for read, n in got.items() if read != want)
    unnamed = sum(n for got in asked.values() for read, n in got.items() if read in UNNAMED_PATTERNS)
    row.append(f"{unnamed} of {wrong}")
print("| pattern errors that are unnamed patterns | " + " | ".join(row) + " |")
EOF
