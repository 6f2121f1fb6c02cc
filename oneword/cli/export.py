"""`oneword export`: convert an embedding file between layouts."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..embeddings import FORMATS, export_embedding, load_embedding


def run_export(args: argparse.Namespace) -> int:
    """`oneword export IN --to FORMAT OUT [--token T]`."""
    out = export_embedding(args.input, args.to, args.output, token=args.token)
    emb = load_embedding(out)
    print(f"wrote {out} ({args.to}: {emb.describe()})")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword export` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "export",
        help="convert an embedding file to the A1111, kohya, diffusers or oneword layout",
        description=(
            "Convert a textual-inversion embedding between layouts. The input format is "
            "detected from the file's content (safetensors, A1111 .pt, diffusers .bin, kohya); "
            "pickles are read only if they hold plain tensors."
        ),
        epilog=(
            "examples:\n"
            "  oneword export cat.safetensors --to a1111 cat.pt\n"
            "  oneword export cat.pt --to kohya cat-kohya.safetensors --token '<my-cat>'\n"
            "SDXL embeddings are always written as safetensors with clip_l and clip_g."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="IN", type=Path, help="embedding file to read")
    parser.add_argument(
        "--to", required=True, choices=FORMATS, help="output layout (a1111 SD1/2: a .pt pickle)"
    )
    parser.add_argument("output", metavar="OUT", type=Path, help="file to write")
    parser.add_argument("--token", default=None, help="rename the trigger word (default: keep)")
    parser.set_defaults(func=run_export)
    return parser
