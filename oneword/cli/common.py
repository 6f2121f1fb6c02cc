"""What several commands share: the --model option, the image-limit flags."""

from __future__ import annotations

import argparse

from ..images import ImageLimits, set_limits
from ..models import DEFAULT_MODEL
from .config import add_config_flags


def add_model_argument(parser) -> None:
    """The `--model` option every command shares (a diffusers folder or hub id)."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"diffusers folder or hub id (default: {DEFAULT_MODEL})",
    )


def add_image_limit_flags(parser) -> None:
    """--max-pixels and --min-side (the fields of `ImageLimits`) on a command that reads images."""
    add_config_flags(parser, ImageLimits, help_suffix=lambda f: f" (default {f.default:,})")


def apply_image_limits(args: argparse.Namespace) -> None:
    """Set the limits every image the command reads must meet, from its flags (not given: the
    defaults, so a second command in one process does not inherit the first one's)."""
    set_limits(args.max_pixels, args.min_side)
