"""Encoder pretraining: training images/s vs the data loader's own images/s, and the head's cost.

Three numbers decide whether encoder pretraining is compute-bound and cheap enough:

1. the head's cost next to the frozen CLIP tower's forward (FLOPs and CPU time for one set
   of N images): the encoder is meant to be small (<= 1/10 of the tower);
2. seconds per training step and training images/s (references through the tower, targets
   through the VAE and the frozen UNet forward + backward to the predicted rows);
3. the loader's own images/s (the same source read alone): training is data-bound when
   this is not well above (2).

Without --model it builds a model with the miniature world's architecture (default
`WorldTrainConfig`: CLIP towers 96/192 wide, VAE (32, 64, 64), UNet (64, 128, 128)) with one
training step per stage, so the timings are those of the real world at random weights.

    OMP_NUM_THREADS=1 python benchmarks/bench_encoder_data.py               # ~1-2 min on a CPU
    python benchmarks/bench_encoder_data.py --model checkpoints/world --steps 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))


def build_world_sized_model(folder: Path, threads: int) -> Path:
    """The miniature world's architecture, one step per stage (random quality, real sizes)."""
    from train_world import WorldTrainConfig, train_world

    config = WorldTrainConfig(out=str(folder / "world"), work=str(folder / "work"), threads=threads)
    config = replace(
        config,
        clip_steps=1,
        clip_batch=8,
        vae_steps=1,
        vae_batch=4,
        oracle_steps=1,
        oracle_batch=8,
        unet_steps=1,
        unet_batch=4,
        unet_warmup=1,
        save_every=1,
        fidelity_captions=4,
        eval_renders=32,
    )
    train_world(config)
    return folder / "world"


def head_vs_tower(model_folder: Path, references: int, repeats: int = 5) -> dict:
    """FLOPs and CPU seconds of the tower on N images vs the default head on that set."""
    from torch.utils.flop_counter import FlopCounterMode

    from oneword.encoder.features import load_tower
    from oneword.encoder.model import ConceptEncoder, EncoderConfig
    from oneword.models import load_model

    model = load_model(model_folder, device="cpu")
    tower = load_tower("world", model_folder=model_folder)
    config = EncoderConfig(
        pooled_dim=tower.pooled_dim,
        token_dim=tower.token_dim,
        widths=tuple(model.widths),
        family=model.family,
    )
    head = ConceptEncoder(config).eval().requires_grad_(False)
    images = torch.zeros(references, 3, model.resolution, model.resolution)
    features = tower(images)
    class_rows = [torch.randn(1, 1, w) for w in model.widths]

    def run_tower():
        return tower(images)

    def run_head():
        return head(features.pooled.unsqueeze(0), features.tokens.unsqueeze(0), class_rows)

    result = {}
    for name, fn in (("tower", run_tower), ("head", run_head)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.no_grad():
                fn()
            times.append(time.perf_counter() - started)
        result[f"{name}_flops"] = counter.get_total_flops()
        result[f"{name}_seconds"] = statistics.median(times)
    result["head_over_tower_flops"] = result["head_flops"] / result["tower_flops"]
    result["head_over_tower_time"] = result["head_seconds"] / result["tower_seconds"]
    result["head_parameters"] = sum(p.numel() for p in head.parameters())
    return result


def training_throughput(model_folder: Path, args, out: Path) -> dict:
    """A short pretraining run without validation; timings from its log."""
    spec = importlib.util.spec_from_file_location("train_encoder", REPO / "train_encoder.py")
    train_encoder = importlib.util.module_from_spec(spec)
    sys.modules["train_encoder"] = train_encoder
    spec.loader.exec_module(train_encoder)
    config = replace(
        train_encoder.TrainConfig(),
        model=str(model_folder),
        out=str(out),
        data=args.data,
        steps=args.steps,
        batch=args.batch,
        references=args.references,
        targets=args.targets,
        workers=args.workers,
        threads=args.threads,
        log_every=1,
        checkpoint_every=10**9,
        val_suite="none",
        probe_batches=args.probe_batches,
        quiet=True,
    )
    train_encoder.train(config)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"][args.warmup :]
    loader = next(r for r in records if r["event"] == "loader")
    seconds = statistics.median(r["seconds_per_step"] for r in steps)
    images_per_step = args.batch * (args.references + args.targets)
    return {
        "seconds_per_step": seconds,
        "training_images_per_s": images_per_step / seconds,
        "unet_samples_per_s": args.batch * args.targets / seconds,
        "loader_images_per_s": loader["loader_images_per_s"],
        "loader_over_training": loader["loader_images_per_s"] / (images_per_step / seconds),
        "timed_steps": len(steps),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a world folder (default: build one, ~1 min)")
    parser.add_argument("--data", default="world", help="train_encoder.py --data (default: world)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--probe-batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--plan-steps", type=int, default=3000, help="steps of the run to estimate")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="oneword-bench-encoder-") as temp:
        temp = Path(temp)
        started = time.perf_counter()
        folder = args.model or build_world_sized_model(temp, args.threads)
        build_seconds = time.perf_counter() - started
        result = {
            "model": str(args.model) if args.model else "world architecture, random weights",
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(),
            "build_seconds": None if args.model else build_seconds,
            "batch": f"{args.batch} identities x ({args.references} references + {args.targets} targets)",
            **head_vs_tower(Path(folder), args.references),
            **training_throughput(Path(folder), args, temp / "run"),
        }
    result["estimate_hours"] = {
        f"{args.plan_steps}_steps": result["seconds_per_step"] * args.plan_steps / 3600
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
