"""Throughput of the target factory: concept-steps per second, batched against single-concept.

Runs the real factory (`oneword.encoder.targets.run_factory`: rendering, VAE encoding,
classic inversion, writing the target files) on a world model for a short run, once per
--batch-concepts value (1 = one concept per UNet batch, the single-concept baseline), and
projects the time to build the whole target set (672 training identities x --image-sets x
--full-steps concept-steps) at the best measured rate.

    OMP_NUM_THREADS=1 python benchmarks/bench_targets.py --model checkpoints/world \\
        --threads 1 --steps 20 --batches 1,8 --out benchmarks/results/bench_targets.json

State the machine and its load with the numbers: the script records the CPU model, the
thread count and the load average before and after each arm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(model, steps: int, batch_concepts: int, concepts: int) -> dict:
    """One factory run of `concepts` targets (one image set each) in UNet batches of
    `batch_concepts`; returns its rate in concept-steps per second (wall time)."""
    from oneword.encoder.targets import FactoryConfig, run_factory

    config = FactoryConfig(
        steps=steps,
        image_sets=1,
        identities=concepts,
        batch_concepts=batch_concepts,
        quiet=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-targets-") as folder:
        load_before = os.getloadavg()
        started, cpu_started = time.perf_counter(), time.process_time()
        summary = run_factory(model, config, Path(folder) / "f", say=lambda _: None)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        load_after = os.getloadavg()
    return {
        "batch_concepts": batch_concepts,
        "concepts": concepts,
        "steps": steps,
        "seconds": seconds,
        "concept_steps_per_s": concepts * steps / seconds,
        # CPU time of this process: at one thread, the wall time it would take alone on a
        # core (the shared machine's load changes the wall time, hardly the CPU time).
        "cpu_seconds": cpu_seconds,
        "concept_steps_per_cpu_s": concepts * steps / cpu_seconds,
        "seconds_per_target_at_steps": seconds / concepts,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "learned": len(summary["learned"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/world")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="inversion steps per run")
    parser.add_argument(
        "--batches", default="1,8", help="--batch-concepts values to measure (1 = single)"
    )
    parser.add_argument(
        "--concepts",
        type=int,
        default=0,
        help="targets per arm (default: the arm's batch size, at least 2)",
    )
    parser.add_argument("--image-sets", type=int, default=2, help="for the projection")
    parser.add_argument("--full-steps", type=int, default=150, help="for the projection")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    from oneword.datasets.world import training_identities
    from oneword.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    measure(model, 2, 1, 1)  # warm-up: first-call allocations and kernel selection
    arms = []
    for batch in (int(b) for b in args.batches.split(",")):
        arm = measure(model, args.steps, batch, args.concepts or max(2, batch))
        arms.append(arm)
        print(
            f"batch {batch:>3}: {arm['concept_steps_per_s']:.2f} concept-steps/s wall, "
            f"{arm['concept_steps_per_cpu_s']:.2f} per CPU second "
            f"({arm['concepts']} targets x {arm['steps']} steps in {arm['seconds']:.1f} s, "
            f"{arm['cpu_seconds']:.1f} s CPU; "
            f"load {arm['loadavg_before'][0]:.1f} -> {arm['loadavg_after'][0]:.1f})",
            flush=True,
        )
    best = max(arms, key=lambda a: a["concept_steps_per_cpu_s"])
    single = next((a for a in arms if a["batch_concepts"] == 1), None)
    cpu_rate, single_rate = (
        best["concept_steps_per_cpu_s"],
        (single or {}).get("concept_steps_per_cpu_s"),
    )
    total = len(training_identities()) * args.image_sets * args.full_steps
    result = {
        "model": args.model,
        "device": args.device,
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "arms": arms,
        "speedup_best_over_single_cpu_time": cpu_rate / single_rate if single else None,
        "projection": {
            "targets": len(training_identities()) * args.image_sets,
            "steps": args.full_steps,
            "concept_steps": total,
            "batch_concepts": best["batch_concepts"],
            # At the best CPU-time rate: one process alone on one core; n processes on n
            # free cores take about 1/n of it.
            "hours_one_core": total / cpu_rate / 3600,
            "hours_one_core_wall_rate_measured_here": total / best["concept_steps_per_s"] / 3600,
        },
    }
    if single:
        result["projection"]["hours_one_core_single_concept"] = total / single_rate / 3600
    print(json.dumps(result["projection"], indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
