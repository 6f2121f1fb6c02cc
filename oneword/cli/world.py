"""`oneword world ...`: train the miniature world, measure its fidelity, write its data.

`oneword world train` is a thin entry to the root script `train_world.py` (world training
is not part of the library); it needs a source checkout, where the script sits beside the
`oneword` package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from ..errors import OnewordError
from .commands import command_help

# The root script beside the package in a source checkout (absent from a wheel install).
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train_world.py"

EPILOG = (
    "examples:\n  oneword world train --preset cpu --out checkpoints/world\n"
    "  oneword world train --preset tiny --out /tmp/w --work /tmp/w-work\n"
    "  oneword world fidelity --model checkpoints/world --captions 240\n"
    "  oneword world suite --out runs/world-suite\n"
    "  oneword world suite --split validation --out runs/world-suite-validation\n"
    "  oneword world shards --out runs/world-shards --count 20000"
)


def load_train_script(path: Path | None = None):
    """The root script train_world.py as the module `train_world`, or None when it is not
    there (a wheel install). Registered in sys.modules under that name, as dataclasses and
    pickling look a module up there."""
    path = Path(path or TRAIN_SCRIPT)
    if not path.is_file():
        return None
    loaded = sys.modules.get("train_world")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location("train_world", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_world"] = module
    spec.loader.exec_module(module)
    return module


def _run_train(args) -> int:
    script = sys.modules["train_world"]
    # `--jobs` spawns one process per stage, which imports the script by name: its folder
    # goes on sys.path (last, so it shadows nothing) only when training runs.
    folder = str(Path(script.__file__).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    return script.run(args)


def _no_train_script(args) -> int:
    raise OnewordError(
        f"world training is the root script train_world.py, not found at {TRAIN_SCRIPT}; "
        "run it from a source checkout of oneword (git clone), e.g. python train_world.py --help"
    )


def add_world_parser(subparsers) -> None:
    """Register `oneword world` (train, suite, shards, fidelity)."""
    parser = subparsers.add_parser(
        "world",
        help=command_help("world"),
        description="Train the miniature world (CLIP, VAE, oracle, UNet) or write its shards/suite.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="world_command", required=True)
    train = sub.add_parser("train", help="train every stage (resumes unfinished ones)")
    script = load_train_script()
    if script is None:
        train.description = "Needs train_world.py from a source checkout (not in this install)."
        train.set_defaults(func=_no_train_script, accepts_any=True)  # say why, whatever the flags
    else:
        script.add_train_arguments(train)
        train.set_defaults(func=_run_train)
    suite = sub.add_parser(
        "suite",
        help="write the test (or validation) concepts as a concept suite (for oneword eval)",
    )
    suite.add_argument("--out", required=True, help="new folder for the suite")
    suite.add_argument("--images", type=int, default=5, help="images per concept")
    suite.add_argument("--seed", type=int, default=0)
    suite.add_argument(
        "--split",
        choices=("test", "validation", "train"),
        default="test",
        help="which identities: test (the 24 held-out concepts every reported table uses), "
        "validation (24 of the same make-up, for every choice) or train (default: %(default)s)",
    )
    suite.set_defaults(func=run_world_suite)
    shards = sub.add_parser(
        "shards", help="write world renders as WebDataset shards (png + txt + json)"
    )
    shards.add_argument("--out", required=True, help="new folder for the shards")
    shards.add_argument("--count", type=int, default=10000, help="number of samples")
    shards.add_argument("--per-shard", type=int, default=1000)
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--name-all", action="store_true", help="captions name unnamed values too")
    shards.set_defaults(func=run_world_shards)
    add_fidelity_parser(sub)


def run_world_suite(args) -> int:
    from ..datasets.suite import write_world_suite
    from ..datasets.world import split_identities
    from ..io import prepare_out_dir

    owned = prepare_out_dir(args.out)  # noqa: F841 (first, and held for the run's life)

    identities = split_identities(getattr(args, "split", "test"))
    print(
        write_world_suite(
            args.out, images_per_concept=args.images, seed=args.seed, identities=identities
        )
    )
    return 0


def run_world_shards(args) -> int:
    from ..datasets.shards import write_world_shards
    from ..io import prepare_out_dir

    owned = prepare_out_dir(args.out)  # noqa: F841 (first, and held for the run's life)

    paths = write_world_shards(
        args.out, args.count, seed=args.seed, maxcount=args.per_shard, name_all=args.name_all
    )
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


def add_fidelity_parser(sub) -> None:
    """Register `oneword world fidelity`."""
    parser = sub.add_parser(
        "fidelity", help="measure the world model's prompt fidelity with the oracle"
    )
    parser.add_argument("--model", default="checkpoints/world")
    parser.add_argument("--captions", type=int, default=240)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="PNG of caption -> samples")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also score the VAE's reconstructions of the captions' true renders",
    )
    parser.add_argument(
        "--renders",
        type=int,
        default=0,
        metavar="N",
        help="also read N fresh renders with the oracle and, zero-shot, the world's CLIP "
        "(the model card's reader table uses 2048)",
    )
    parser.set_defaults(func=run_fidelity)


def run_fidelity(args) -> int:
    from ..datasets import world
    from ..world.fidelity import fresh_render_accuracy, measure_fidelity

    report = measure_fidelity(
        args.model,
        captions=args.captions,
        samples=args.samples,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        grid=args.grid,
        ceiling=args.ceiling,
    )
    ceiling = report.get("vae_ceiling")
    print("| attribute | samples right |" + (" VAE round trip right |" if ceiling else ""))
    print("|---|---:|" + ("---:|" if ceiling else ""))
    for attribute, value in [*report["per_attribute"].items(), ("all at once", report["all"])]:
        extra = ""
        if ceiling:
            extra = f" {ceiling['per_attribute'].get(attribute, ceiling['all']):.1%} |"
        print(f"| {attribute} | {value:.1%} |{extra}")
    for attribute in report["per_value"]:
        for name, source in (("samples", report), ("VAE round trip", ceiling)):
            if source is not None:
                values = sorted(source["per_value"][attribute].items())
                print(f"{attribute} ({name}): " + ", ".join(f"{v} {x:.0%}" for v, x in values))
    if args.renders:
        fresh = fresh_render_accuracy(args.model, n=args.renders)
        report["fresh_renders"] = fresh
        readers = [("oracle", fresh["oracle"])]
        if "clip_zero_shot" in fresh:
            readers.append(("CLIP zero-shot", fresh["clip_zero_shot"]))
        print(f"\n| {args.renders} fresh renders | " + " | ".join(world.ATTRIBUTES) + " |")
        print("|---|" + "---:|" * len(world.ATTRIBUTES))
        for name, shares in readers:
            print(f"| {name} | " + " | ".join(f"{shares[a]:.1%}" for a in world.ATTRIBUTES) + " |")
    if args.json:
        from ..io import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0
