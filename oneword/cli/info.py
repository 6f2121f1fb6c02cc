"""`oneword info`: describe a model."""

from __future__ import annotations

import argparse
import json

from .commands import command_help


def add_info_parser(subparsers) -> None:
    """Register `oneword info`."""
    parser = subparsers.add_parser(
        "info",
        help=command_help("info"),
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
    parser.set_defaults(func=run_info)


def run_info(args) -> int:
    from ..models import DEFAULT_MODEL, load_model

    model = load_model(args.model or DEFAULT_MODEL, device="cpu")
    facts = model.describe()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        side = max(len(key) for key in facts)
        for key, value in facts.items():
            if isinstance(value, list) and value and isinstance(value[0], str):
                value = "; ".join(value)  # the text encoders, one clause each
            print(f"{key:>{side}}: {value}")
    return 0
