"""The `oneword` command: subcommands over the library's Python API.

Every bad input ends as one line on stderr that says what to do, and exit status 2.
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oneword",
        description="Turn a few images of a concept into a new word for Stable Diffusion (1.x, 2.x, XL).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"oneword {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # One module per command, each registering its own subcommand.
    from .demo import add_demo_parser
    from .encode import add_encode_parser
    from .eval import add_eval_parser
    from .export import add_export_parser
    from .generate import add_generate_parser
    from .info import add_info_parser
    from .invert import add_invert_parser
    from .world import add_world_parser

    add_info_parser(subparsers)
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
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_any", False):
        parser.parse_args(argv)  # argparse's own error for the unknown flags
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
