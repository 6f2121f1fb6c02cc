"""The `oneword` command: subcommands over the library's Python API.

Every bad input ends as one line on stderr that says what to do, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import OnewordError, one_line_warnings
from .commands import COMMANDS

EXAMPLES = """\
examples:
  oneword demo                                   # the built-in miniature world, offline, < 1 min
  oneword info checkpoints/world                 # family, widths, resolution, prediction type
  oneword invert --images photos/ --token "<my-cup>" --init cup --out runs/cup
  oneword export runs/cup/learned_embeds.safetensors --to a1111 my-cup.pt
  oneword world train --preset cpu               # retrain the miniature world (about 2 h on 2 cores)
  oneword serve                                  # a web page on http://127.0.0.1:7860
"""


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `oneword` parser. `commands`: the commands to build in full (None: all); every
    other command is listed by name and help only, so that `oneword --help` and one command's
    run import only what they use."""
    parser = argparse.ArgumentParser(
        prog="oneword",
        description=(
            "Turn a few images of a concept into a new word for Stable Diffusion "
            "(1.x, 2.x, XL, 3.x) and FLUX.1."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"oneword {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # One module per command, each registering its own subcommand.
    for name, (module, function, help_text) in COMMANDS.items():
        if commands is None or name in commands:
            add_parser = getattr(importlib.import_module(f".{module}", __name__), function)
            add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in argv (its first word that is not a flag), if it is one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_any", False):
        parser.parse_args(argv)  # argparse's own error for the unknown flags
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with one_line_warnings(f"oneword {args.command}"):
            return int(args.func(args) or 0)
    except OnewordError as exc:
        print(f"oneword {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"oneword {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
