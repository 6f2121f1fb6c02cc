"""`oneword invert`: learn a token for one concept, or for a folder/manifest of many.

Settings come from `InversionConfig`'s defaults, then an optional `--config FILE` (JSON
with the same field names), then the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

from ..errors import OnewordError
from ..inversion.invert import ENCODER_CHOICES, ConceptSpec, InversionConfig
from .commands import command_help
from .common import add_image_limit_flags, add_model_argument, apply_image_limits
from .config import add_config_flags, config_from_flags

EXAMPLES = """\
examples:
  oneword invert --images photos/cup/ --token "<my-cup>" --init cup --out runs/cup
  oneword invert --model /models/sd15 --images "cat/*.jpg" --token "<cat>" --init cat \\
      --class-word cat --vectors 2 --steps 2000 --out runs/cat
  oneword invert --images art/ --token "<style>" --init painting --templates style --out runs/style
  oneword invert --images photos/cup/ --token "<my-cup>" --init cup --out runs/cup --resume
  oneword invert --concepts concepts/ --init object --steps 1000 --out runs/many
  accelerate launch --num_processes 4 -m oneword.cli invert --concepts concepts.json --out runs/many

--concepts takes a folder of concept folders (each with images and an optional concept.json
{"class_word": "dog", "token": "<dog1>", "init": "dog"}) or a JSON manifest: a list of
{"name", "images": [paths], "token", "init", "class_word"} (paths relative to the manifest).
"""


def add_invert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `oneword invert` on an argparse subparsers object."""
    defaults = InversionConfig()
    parser = subparsers.add_parser(
        "invert",
        help=command_help("invert"),
        description=(
            "Classic textual inversion (Gal et al., 2023): optimise only the new token's "
            "embedding rows so the frozen model reconstructs the images from template prompts."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add_model_argument(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", metavar="PATH", help="image files, folders or globs")
    what.add_argument("--concepts", metavar="FOLDER_OR_JSON", help="many concepts (see below)")
    add("--token", help='the new word, e.g. "<my-cup>" (default with --concepts: "<name>")')
    add("--init", help="initializer word(s), e.g. the class: cup")
    add("--class-word", help='class word for the cue "a photo of a <t> cup" (turns the cue on)')
    add(
        "--class-word-cue",
        action="store_const",
        const=True,
        help="use the class word in prompts (on with --class-word; for --concepts)",
    )
    add("--out", required=True, type=Path, help="output folder")
    add("--config", type=Path, help="JSON file with InversionConfig fields (flags override it)")
    # Every InversionConfig flag defaults to None ("not given"): --config FILE, then the
    # flags, override the defaults (`resolve_config`).
    flags = {
        "steps": {"help": f"optimisation steps (default {defaults.steps})"},
        "lr": {"help": f"Adam learning rate (default {defaults.lr})"},
        "batch": {"help": f"images per step and concept (default {defaults.batch})"},
        "vectors": {"help": f"vectors K per token (default {defaults.vectors})"},
        "encoders": {
            "choices": list(ENCODER_CHOICES),
            "help": "text encoders that learn the token, SD3/FLUX (default all; others keep "
            "the init)",
        },
        "templates": {"help": "object, style, or a file with one template per line ({} = token)"},
        "seed": {"help": f"seed (default {defaults.seed})"},
        "clip_weight": {"help": "weight of the CLIP identity loss (default 0 = off)"},
        "clip_model": {
            "help": "CLIPVisionModelWithProjection folder (default MODEL/image_encoder)"
        },
        "l2_weight": {"help": "pull toward the initial rows (default 0 = off)"},
        "augment": {"help": "random crop, flip, colour jitter"},
        "early_stop": {"help": "stop when the loss plateaus"},
        "patience": {"help": f"early-stop patience in steps (default {defaults.patience})"},
        "min_delta": {"help": f"early-stop improvement (default {defaults.min_delta})"},
        "checkpoint_every": {"help": f"steps (default {defaults.checkpoint_every})"},
        "precision": {
            "choices": ["bf16", "fp16", "fp32"],
            "help": "frozen parts on a GPU (default bf16)",
        },
        "max_nonfinite": {
            "help": f"abort after N non-finite steps in a row (default {defaults.max_nonfinite})"
        },
        "samples": {"help": "skip samples.png"},
        "sample_steps": {"help": f"DDIM steps for samples.png (default {defaults.sample_steps})"},
        "quiet": {"help": "no progress bar"},
    }

    def config_flags(*names: str) -> None:
        add_config_flags(parser, InversionConfig, names, overrides=flags)

    config_flags("steps", "lr", "batch", "vectors", "encoders", "templates", "seed")
    add("--resume", action="store_true", help="continue from OUT/checkpoints (must exist)")
    add("--warm-start", type=Path, help="start from the rows of this embedding file")
    config_flags("clip_weight", "clip_model", "l2_weight", "augment", "early_stop", "patience")
    config_flags("min_delta", "checkpoint_every", "precision")
    add("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    config_flags("max_nonfinite", "samples", "sample_steps")
    add("--chunk", type=int, default=8, help="with --concepts: concepts per UNet batch (default 8)")
    config_flags("quiet")
    add_image_limit_flags(parser)
    parser.set_defaults(func=run_invert, class_word_cue=None)
    return parser


def resolve_config(args: argparse.Namespace) -> InversionConfig:
    """Defaults, then --config FILE, then flags."""
    values = asdict(InversionConfig())
    if args.config is not None:
        try:
            from_file = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as error:
            raise OnewordError(f"cannot read --config {args.config}: {error}") from None
        unknown = set(from_file) - set(values)
        if unknown:
            raise OnewordError(
                f"--config {args.config}: unknown fields {sorted(unknown)}; "
                f"known: {[f.name for f in fields(InversionConfig)]}"
            )
        values |= from_file
    if args.class_word:
        values["class_word_cue"] = True
    config = config_from_flags(args, InversionConfig, InversionConfig(**values))
    config.check()
    return config


def _concept_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OnewordError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise OnewordError(f'{path} must hold a JSON object like {{"class_word": "dog"}}')
    return data


def load_concepts(source: str | os.PathLike, *, init_text: str | None = None) -> list[ConceptSpec]:
    """Concepts from a folder of concept folders or a JSON manifest.

    Args:
        source: a folder whose sub-folders each hold one concept's images (and an optional
            concept.json {"class_word", "token", "init"}), or a JSON file with a list of
            {"name", "images", "token", "init", "class_word"}.
        init_text: initializer for concepts that give neither "init" nor "class_word".

    Returns:
        `ConceptSpec`s in folder-name or manifest order.
    """
    source = Path(source)
    specs = []
    if source.is_dir():
        folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise OnewordError(
                f"--concepts {source} has no concept folders (one folder per concept)"
            )
        for folder in folders:
            info = (
                _concept_json(folder / "concept.json")
                if (folder / "concept.json").is_file()
                else {}
            )
            specs.append(_spec(folder.name, folder, info, init_text, where=str(folder)))
        return specs
    if not source.is_file():
        raise OnewordError(f"--concepts {source} is neither a folder nor a JSON manifest")
    try:
        manifest = json.loads(source.read_text())
    except (OSError, ValueError) as error:
        raise OnewordError(f"cannot read the manifest {source}: {error}") from None
    if not isinstance(manifest, list) or not manifest:
        raise OnewordError(f"manifest {source} must be a non-empty JSON list of concepts")
    for index, entry in enumerate(manifest):
        if not isinstance(entry, dict) or "name" not in entry or "images" not in entry:
            raise OnewordError(f"{source}: entry {index} needs at least 'name' and 'images'")
        images = entry["images"] if isinstance(entry["images"], list) else [entry["images"]]
        images = [str(source.parent / p) for p in images]
        specs.append(
            _spec(entry["name"], images, entry, init_text, where=f"{source} entry {index}")
        )
    return specs


def _spec(name, images, info: dict, init_text, *, where: str) -> ConceptSpec:
    init = info.get("init") or info.get("init_text") or info.get("class_word") or init_text
    if not init:
        raise OnewordError(f'{where}: no initializer; add "init" or "class_word", or pass --init')
    return ConceptSpec(
        name=str(name),
        images=images,
        token=info.get("token"),
        init_text=init,
        class_word=info.get("class_word"),
        seed=info.get("seed"),
    )


def _shard_and_device(device):
    """(rank, world size) and device under `accelerate launch`/torchrun; else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return (0, 1), device
    from accelerate import PartialState

    state = PartialState()
    return (state.process_index, state.num_processes), device or state.device


def run_invert(args: argparse.Namespace) -> int:
    """`oneword invert ...`."""
    from ..inversion.invert import check_out_not_in_images, invert, invert_many
    from ..io import prepare_out_dir
    from ..models import load_model

    config = resolve_config(args)
    apply_image_limits(args)
    if args.concepts is None and (not args.token or not args.init):
        raise OnewordError('--images needs --token (e.g. "<my-cup>") and --init (e.g. cup)')
    shard, device = _shard_and_device(args.device)
    # Before the model loads: a bad --out or one another run owns fails in a second.
    if args.concepts is not None:
        check_out_not_in_images(args.out, [args.concepts], nested=True)
    else:
        check_out_not_in_images(args.out, args.images)
    owned = prepare_out_dir(args.out, rank=shard[0])  # noqa: F841 (held for the run's life)
    model = load_model(args.model, device=device, precision=config.precision)
    if args.concepts is not None:
        specs = load_concepts(args.concepts, init_text=args.init)
        results = invert_many(
            model, specs, config, args.out, chunk=args.chunk, shard=shard, resume=args.resume
        )
        for name, data in results.items():
            print(f"{name}: {data['token']} -> {args.out / name / 'learned_embeds.safetensors'}")
        return 0
    result = invert(
        model,
        args.images,
        args.token,
        args.init,
        config,
        args.out,
        class_word=args.class_word,
        resume=args.resume,
        warm_start=args.warm_start,
    )
    final = result.log["final_loss_ema"]
    print(
        f"learned {result.token} in {result.log['steps_done']} steps "
        f"(loss EMA {final if final is None else round(final, 4)}): {result.files['embedding']}"
    )
    return 0


def main(argv=None) -> int:
    """`python -m oneword.cli.invert invert ...` (same as `oneword invert ...`)."""
    parser = argparse.ArgumentParser(prog="oneword")
    add_invert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OnewordError as error:
        print(f"oneword invert: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
