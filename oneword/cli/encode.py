"""`oneword encode`: a concept's token from a trained encoder, refined, with a fallback."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..encoder import encode as encode_module
from ..encoder.encode import (
    CHECKS,
    DEFAULT_ENCODER,
    MAX_REFINE_STEPS,
    THRESHOLDS,
    EncodeConfig,
    encode,
)
from ..errors import OnewordError
from .commands import command_help
from .common import add_image_limit_flags, add_model_argument, apply_image_limits
from .config import add_config_flags, config_from_flags

EXAMPLES = """\
examples:
  oneword encode --images photos/cup/ --token "<my-cup>" --class-word cup --out runs/cup
  oneword encode --images photos/cup/ --token "<my-cup>" --refine-steps 0 --no-fallback --out runs/cup0
  oneword encode --model /models/sd15 --encoder runs/encoder-sd15/encoder.safetensors \\
      --images "cat/*.jpg" --token "<cat>" --class-word cat --threshold 0.95 --out runs/cat

Paths: "encoder" (the prediction alone), "refined" (prediction + --refine-steps of classic
inversion) or "fallback" (the check failed: full inversion from the refined rows).
The check (--check auto: clip when the model has its own CLIP or --clip is given, else
loss) scores the token against the class word (1.0 = no better; lower is better): above
--threshold (default 0.825 for clip, 1.0 for loss; chosen on the world's validation split)
the fallback runs.
"""


def run_encode(args: argparse.Namespace) -> int:
    """`oneword encode ...`."""
    from ..encoder.model import load_encoder
    from ..io import prepare_out_dir
    from ..models import load_model

    owned = prepare_out_dir(args.out)  # noqa: F841 (first, and held for the run's life)
    apply_image_limits(args)
    config = config_from_flags(args, EncodeConfig)
    config.check_values()  # bad values fail before anything loads
    encoder_path = Path(args.encoder)
    if not encoder_path.is_file():
        hint = " (the default)" if args.encoder == DEFAULT_ENCODER else ""
        raise OnewordError(
            f"no encoder at {encoder_path}{hint}; pass --encoder FILE (train one with "
            "train_encoder.py --model MODEL --out DIR), or learn the token with oneword invert"
        )
    encoder = load_encoder(encoder_path)
    model = load_model(args.model, device=args.device, precision=config.precision)
    result = encode(
        model,
        encoder.to(model.device),
        args.images,
        args.token,
        class_word=args.class_word,
        config=config,
        out_dir=args.out,
    )
    print(result.summary())
    print(f"wrote {', '.join(p.name for p in result.files.values())} in {args.out}")
    return 0


def add_encode_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword encode` on an argparse subparsers object."""
    defaults = EncodeConfig()
    parser = subparsers.add_parser(
        "encode",
        help=command_help("encode"),
        description=encode_module.__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add_model_argument(parser)
    add(
        "--encoder",
        default=DEFAULT_ENCODER,
        help=f"encoder file from train_encoder.py (default: {DEFAULT_ENCODER})",
    )
    add("--images", nargs="+", required=True, metavar="PATH", help="image files, folders or globs")
    add("--token", required=True, help='the new word, e.g. "<my-cup>"')
    add(
        "--class-word",
        help="the concept's class, e.g. cup (default: the encoder's training class word, "
        "else object)",
    )
    flags = {
        "refine_steps": {
            "help": f"classic steps from the prediction, 0..{MAX_REFINE_STEPS} "
            f"(default {defaults.refine_steps}; 0 = prediction only)"
        },
        "refine_lr": {"help": f"Adam lr of the refinement (default {defaults.refine_lr})"},
        "l2_weight": {
            "help": "pull toward the encoder's prediction during refinement "
            f"(default {defaults.l2_weight})"
        },
        "fallback": {"help": "never run full inversion, even when the check fails"},
        "fallback_steps": {
            "type": int,
            "help": "steps of the full inversion after a failed check (default: oneword invert's)",
        },
        "check": {
            "choices": CHECKS,
            "help": "quality check: auto (default: clip when a CLIP is at hand, else loss), loss "
            "(relative denoising loss), clip (relative CLIP image distance of samples) or none "
            "(no check, no fallback)",
        },
        "threshold": {
            "type": float,
            "help": f"fall back when the score is above this (default: {THRESHOLDS['clip']} for "
            f"clip, {THRESHOLDS['loss']} for loss; 1.0 = no better than the class word)",
        },
        "check_draws": {"help": f"draws of the loss check (default {defaults.check_draws})"},
        "clip": {"help": "CLIP for --check clip (default: the model's image_encoder/)"},
        "templates": {"help": "object, style, or a file with one template per line"},
        "seed": {"help": f"seed (default {defaults.seed})"},
        "precision": {
            "choices": ["bf16", "fp16", "fp32"],
            "help": "frozen parts on a GPU (default bf16)",
        },
        "samples": {"help": "skip samples.png"},
        "sample_steps": {"help": f"DDIM steps for samples.png (default {defaults.sample_steps})"},
        "quiet": {"help": "no progress bars"},
    }
    first = ["refine_steps", "refine_lr", "l2_weight", "fallback", "fallback_steps", "check"]
    first += ["threshold", "check_draws", "clip", "templates", "seed"]
    add_config_flags(parser, EncodeConfig, first, overrides=flags)
    add("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    last = ["precision", "samples", "sample_steps", "quiet"]
    add_config_flags(parser, EncodeConfig, last, overrides=flags)
    add("--out", required=True, type=Path, help="output folder")
    add_image_limit_flags(parser)
    parser.set_defaults(func=run_encode)
    return parser
