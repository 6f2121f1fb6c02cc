"""The `oneword` command: subcommands over the library's Python API.

Every bad input ends as one line on stderr that says what to do, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import OnewordError

EXAMPLES = """\
examples:
  oneword demo                                   # the built-in miniature world, offline, < 1 min
  oneword info checkpoints/world                 # family, widths, resolution, prediction type
  oneword invert --images photos/ --token "<my-cup>" --init cup --out runs/cup
  oneword export runs/cup/learned_embeds.safetensors --to a1111 my-cup.pt
  oneword world train --preset cpu               # retrain the miniature world (about 2 h on 2 cores)
"""


def _info_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a model: family, widths, resolution, prediction type, vocabulary",
        epilog="example:\n  oneword info checkpoints/world\n  oneword info /models/sd15 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="diffusers folder or hub id (default: the miniature world)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from ..models import DEFAULT_MODEL, load_model

    model = load_model(args.model or DEFAULT_MODEL, device="cpu")
    facts = model.describe()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        for key, value in facts.items():
            print(f"{key:>16}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oneword",
        description="Turn a few images of a concept into a new word for Stable Diffusion (1.x, 2.x, XL).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"oneword {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _info_parser(subparsers)
    # Each module registers its own subcommand; imports stay light until a command runs.
    from ..demo import add_demo_parser
    from ..embeddings import add_export_parser
    from ..encoder.encode import add_encode_parser
    from ..evaluation.harness import add_eval_parser
    from ..generate import add_generate_parser
    from ..world.train import add_world_parser
    from .invert import add_invert_parser

    add_demo_parser(subparsers)
    add_invert_parser(subparsers)
    add_encode_parser(subparsers)
    add_export_parser(subparsers)
    add_generate_parser(subparsers)
    add_eval_parser(subparsers)
    add_world_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except OnewordError as exc:
        print(f"oneword {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"oneword {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
