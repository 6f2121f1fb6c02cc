"""`oneword export`: convert an embedding file between layouts."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..embeddings import FORMATS, export_embedding, load_embedding, usage_hint
from .commands import command_help


def run_export(args: argparse.Namespace) -> int:
    """`oneword export IN --to FORMAT OUT [--token T]`."""
    out = export_embedding(args.input, args.to, args.output, token=args.token)
    emb = load_embedding(out)
    print(f"wrote {out} ({args.to}: {emb.describe()})")
    print(usage_hint(out, emb, args.to))
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword export` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "export",
        help=command_help("export"),
        description=(
            "Convert a textual-inversion embedding between layouts. The input format is "
            "detected from the file's content (safetensors, A1111 .pt, diffusers .bin, kohya, "
            "ComfyUI); pickles are read only if they hold plain tensors. The output's name "
            "picks the container: .safetensors, or a .pt / .bin torch pickle."
        ),
        epilog=(
            "examples:\n"
            "  oneword export cat.safetensors --to a1111 cat.safetensors\n"
            "  oneword export cat.safetensors --to comfyui ComfyUI/models/embeddings/\n"
            "  oneword export cat.pt --to kohya cat-kohya.safetensors --token '<my-cat>'\n"
            "An OUT folder gets <trigger>.safetensors. SDXL files hold clip_l and clip_g, SD3\n"
            "files clip_l, clip_g and t5 (a1111: clip_l and clip_g; comfyui: t5xxl), FLUX\n"
            "files clip_l and t5 (comfyui: t5xxl)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="IN", type=Path, help="embedding file to read")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output layout")
    parser.add_argument(
        "output", metavar="OUT", help="file to write (.safetensors, .pt, .bin) or a folder"
    )
    parser.add_argument("--token", default=None, help="rename the trigger word (default: keep)")
    parser.set_defaults(func=run_export)
    return parser
