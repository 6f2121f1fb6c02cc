"""Make the encoder's targets: classic inversion of every training identity of the world.

One resumable job (`oneword.encoder.targets`): every training identity (672 on the world)
x --image-sets independent image sets (scene seeds 0, 1, ...), classic inversion from the
class word for --steps steps with one seed, --batch-concepts targets per UNet batch. Each
finished target is written at once to OUT/targets/<identity>@<seed>.safetensors and
recorded in OUT/manifest/rank-R.jsonl; a restart with --resume skips finished targets and
learns again any corrupt or partial file (named in OUT/log/rank-R.jsonl and on stderr), and
says how many targets it keeps and which ones a killed run was learning when it stopped.
When every target is done, OUT/targets.safetensors holds the table that
`train_encoder.py --target-table OUT` reads.

Sharding: under `accelerate launch` or `torchrun` each process takes every world_size-th
UNet batch of targets (a disjoint share by index); the targets are the same, bit for bit
on the CPU, whatever the number of processes, because a target is always learned in the
same UNet batch.

--steps defaults to 100, where classic's identity was best on validation concepts 1-12
(docs/encoder-plan.md, step 2). Throughput and the time for the whole set:
benchmarks/bench_targets.py and the factory's own log (OUT/log/rank-R.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from oneword.encoder.targets import PLATEAU_STEPS, FactoryConfig, run_factory
from oneword.errors import OnewordError
from oneword.models import DEFAULT_MODEL

EXAMPLES = """\
examples:
  # the whole training split, 2 image sets each, on a CPU (one process, two threads)
  python make_targets.py --model checkpoints/world --out runs/targets --threads 2

  # continue after a stop (finished targets are skipped, damaged files learned again)
  python make_targets.py --model checkpoints/world --out runs/targets --threads 2 --resume

  # two CPU processes (gloo), or all GPUs of a machine
  torchrun --nproc_per_node 2 make_targets.py --model checkpoints/world --out runs/targets
  accelerate launch --num_processes 8 make_targets.py --model checkpoints/world \\
      --out runs/targets --batch-concepts 64

  # a quick first contact: 4 identities x 2 image sets, 10 steps
  python make_targets.py --model checkpoints/world --out /tmp/t --identities 4 --steps 10
"""


# FactoryConfig's fields that get a flag (help from the field comments, as in train_world.py);
# `batch` and `templates` stay InversionConfig's defaults, `quiet` is added below.
FLAG_FIELDS = ("steps", "identities", "image_sets", "images", "batch_concepts", "seed", "lr")
FLAG_OVERRIDES = {
    "steps": {
        "help": "classic inversion steps per target: classic's plateau on the validation split "
        f"(default {PLATEAU_STEPS}: validation concepts 1-12; see docs/encoder-plan.md)"
    },
    "identities": {
        "type": int,
        "help": "only the first N training identities (a fixed mixed order; default: all 672)",
    },
}


def build_parser() -> argparse.ArgumentParser:
    from oneword.cli.config import add_config_flags

    defaults = FactoryConfig()
    parser = argparse.ArgumentParser(
        prog="make_targets.py",
        description="Classic inversion of every training identity: the encoder's targets.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="the world folder (default: %(default)s)")
    add("--out", required=True, help="the factory's folder (targets/, manifest/, log/, table)")
    add_config_flags(
        parser,
        FactoryConfig,
        (*FLAG_FIELDS, "vectors", "quiet"),
        overrides=FLAG_OVERRIDES,
        help_suffix=lambda f: (
            f" (default: {getattr(defaults, f.name)})"
            if f.name not in ("steps", "identities", "quiet")
            else ""
        ),
    )
    add(
        "--max-chunks",
        type=int,
        default=None,
        help="stop after this many UNet batches (resume later with --resume)",
    )
    add("--resume", action="store_true", help="continue the factory in --out")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--device", default=None, help="cpu or cuda (default: the process's accelerate device)")
    add("--precision", default=None, help="frozen model precision on a GPU: bf16, fp16, fp32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from accelerate import PartialState

        from oneword.cli.config import config_from_flags
        from oneword.io import prepare_out_dir
        from oneword.models import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        # One process per device under accelerate launch / torchrun (gloo on the CPU).
        cpu = args.device == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        # Checked and owned before the model loads; each rank holds its own lock, so the
        # ranks of one job share the folder while a second job on it is refused.
        owned = prepare_out_dir(args.out, rank=state.process_index)  # noqa: F841
        device = args.device or str(state.device)
        config = config_from_flags(args, FactoryConfig)
        config.quiet = config.quiet or not state.is_local_main_process  # one bar per machine
        config.check()
        model = load_model(args.model, device=device, precision=args.precision)
        if state.is_main_process:
            print(json.dumps({"config": asdict(config), "world_size": state.num_processes}))
        summary = run_factory(
            model,
            config,
            args.out,
            rank=state.process_index,
            world_size=state.num_processes,
            resume=args.resume,
            max_chunks=args.max_chunks,
        )
    except OnewordError as error:
        print(f"make_targets.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_targets.py: interrupted (continue with --resume)", file=sys.stderr)
        return 130
    if summary["table"]:
        from oneword.encoder.targets import image_set_spread, load_targets

        spread = image_set_spread(load_targets(summary["table"]))
        if spread:
            print(
                f"targets of one identity lie {spread['within_identity']:.3f} apart, of "
                f"different identities {spread['between_identities']:.3f} "
                f"(ratio {spread['ratio']:.2f}; lower: the identity decides the target)"
            )
    print(
        f"rank {summary['rank']}: {len(summary['learned'])} learned, {len(summary['skipped'])} "
        f"skipped, {len(summary['redone'])} redone in {summary['seconds']:.0f} s"
        + (f"; table: {summary['table']}" if summary["table"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
