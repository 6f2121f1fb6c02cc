"""What several commands share: the --model option."""

from __future__ import annotations

from ..models import DEFAULT_MODEL


def add_model_argument(parser) -> None:
    """The `--model` option every command shares (a diffusers folder or hub id)."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"diffusers folder or hub id (default: {DEFAULT_MODEL})",
    )
