"""`oneword serve`: the argument parser (the page itself is `oneword.serve`)."""

from __future__ import annotations

import argparse
import logging

from .commands import command_help

EXAMPLES = """\
examples:
  oneword serve                                  # the miniature world and its encoder
  oneword serve --model /models/sd15 --encoder runs/encoder-sd15/encoder.safetensors
  oneword serve --model /models/sd15 --port 7861 --concurrency 2 --out runs/serve
"""


def run_serve(args: argparse.Namespace) -> int:
    """`oneword serve ...`: serve the page until Ctrl-C."""
    from ..encoder.encode import DEFAULT_ENCODER
    from ..models import DEFAULT_MODEL
    from ..serve import serve

    # One line per job (learned, failed, cancelled) on stderr, beside Gradio's own.
    logging.basicConfig(format="oneword serve: %(message)s")
    logging.getLogger("oneword.serve").setLevel(logging.INFO)
    encoder = args.encoder
    if encoder is None and args.model == DEFAULT_MODEL:
        encoder = DEFAULT_ENCODER  # the world's own encoder
    elif encoder in ("", "none"):
        encoder = None
    serve(
        args.model,
        encoder=encoder,
        host=args.host,
        port=args.port,
        out=args.out,
        concurrency=args.concurrency,
        device=args.device,
    )
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword serve` on an argparse subparsers object."""
    from .common import add_model_argument

    parser = subparsers.add_parser(
        "serve",
        help=command_help("serve"),
        description="Serve a page to learn tokens from uploaded images, see them in new scenes, "
        "download them for diffusers, AUTOMATIC1111 and kohya, and try prompts with them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add_model_argument(parser)
    add(
        "--encoder",
        default=None,
        help="concept encoder for the model, or 'none' (default: the world's encoder with the "
        "default model, else none: classic inversion only)",
    )
    add(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    add("--port", type=int, default=7860, help="port (default 7860)")
    add("--out", default="runs/serve", help="output root, one folder per browser session")
    add("--concurrency", type=int, default=1, help="jobs at once, one model copy each (default 1)")
    add("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.set_defaults(func=run_serve)
    return parser
