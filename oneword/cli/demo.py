"""`oneword demo`: the whole job on the built-in miniature world, offline, in minutes on a CPU.

1. Write a held-out concept's images (a shape/colour/pattern the captions never name) to a folder.
2. Learn its token in the world model: with the trained concept encoder when there is one
   (`oneword encode`: predict, refine, check, fall back if needed), else, or with
   `--classic`, with classic inversion on a short budget.
3. Write the token file and a PNG grid of the concept in new scenes, and say where they are.

`oneword demo --images PATHS` does the same for your own images of a world-like concept.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import OnewordError
from .commands import command_help

DEMO_STEPS = 150  # short: the point is to see it work end to end in a few minutes


def _concept(name: str | None):
    from ..datasets import world

    if name is None:
        return world.HELD_OUT[0]
    for identity in world.HELD_OUT:
        if identity.name == name:
            return identity
    names = ", ".join(i.name for i in world.HELD_OUT)
    raise OnewordError(f"no held-out concept named {name!r}; choose one of: {names}")


def run_demo(args) -> int:
    from ..datasets import world
    from ..datasets.suite import write_concept_images
    from ..encoder.encode import DEFAULT_ENCODER
    from ..images import load_images, save_grid
    from ..inversion import InversionConfig, invert
    from ..io import prepare_out_dir
    from ..models import load_model
    from ..sampling import generate

    owned = prepare_out_dir(args.out)  # noqa: F841 (first, and held for the run's life)
    out = Path(args.out)
    timings: dict[str, float] = {}
    start = time.time()
    if args.images:
        images_arg, init, class_word, concept_name = (
            args.images,
            args.init or "object",
            args.init,
            "your images",
        )
        edits = [template for template, _ in world.EDIT_PROMPTS[:6]]
    else:
        identity = _concept(args.concept)
        paths = write_concept_images(identity, out / "images", seed=args.seed)
        images_arg, init, class_word = (
            [str(p) for p in paths],
            identity.class_word(),
            identity.class_word(),
        )
        concept_name = identity.name
        edits = [template for template, _ in world.edit_prompts(identity)[:6]]
    timings["images"] = time.time() - start

    t = time.time()
    model = load_model(args.model, device=args.device)
    timings["load model"] = time.time() - t

    t = time.time()
    encoder_path = None if args.classic else Path(args.encoder or DEFAULT_ENCODER)
    if encoder_path is not None and not encoder_path.is_file():
        if args.encoder:  # asked for explicitly: say so instead of silently going classic
            raise OnewordError(f"no encoder at {encoder_path}; pass --classic to invert instead")
        print(f"no encoder at {encoder_path}: learning the token by classic inversion")
        encoder_path = None
    if encoder_path is not None:
        from ..encoder.encode import encode
        from ..encoder.model import load_encoder

        result = encode(
            model,
            load_encoder(encoder_path),
            images_arg,
            args.token,
            class_word=class_word or "object",
            out_dir=out / "token",
            refine_steps=args.refine_steps,
            fallback_steps=args.steps,  # the demo's budget, not classic inversion's default
            seed=args.seed,
            samples=False,
            quiet=args.quiet,
        )
        how = result.summary()
    else:
        config = InversionConfig(steps=args.steps, seed=args.seed, samples=False, quiet=args.quiet)
        result = invert(
            model, images_arg, args.token, init, config, out / "token", class_word=class_word
        )
        how = f"classic inversion, {args.steps} steps"
    timings["learn token"] = time.time() - t

    t = time.time()
    prompts = [f"a photo of {args.token}"] + [template.format(args.token) for template in edits]
    samples = generate(
        model,
        prompts,
        placeholders=[result.placeholder],
        num_per_prompt=4,
        seed=args.seed,
        progress=not args.quiet,
    )
    references = load_images(images_arg, model.resolution)[:4]
    grid = save_grid(
        references + samples,
        out / "demo.png",
        columns=4,
        labels=["your images" if args.images else "training images"] + prompts,
    )
    timings["sample new scenes"] = time.time() - t

    print(f"concept: {concept_name} (init word {init!r}); {how}")
    for stage, seconds in timings.items():
        print(f"  {stage:>18}: {seconds:6.1f} s")
    print(f"  {'total':>18}: {time.time() - start:6.1f} s")
    print(f"token file: {result.files['embedding']}")
    print(f"grid:       {grid}")
    return 0


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=command_help("demo"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  oneword demo\n  oneword demo --concept teal-square-split --out runs/demo\n"
        "  oneword demo --images my_shapes/ --init star",
    )
    from ..encoder.encode import DEFAULT_ENCODER, EncodeConfig
    from ..models import DEFAULT_MODEL

    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="diffusers folder (default: the miniature world)"
    )
    parser.add_argument(
        "--concept", default=None, help="held-out world concept name (default: the first)"
    )
    parser.add_argument("--images", nargs="+", default=None, help="your own images instead")
    parser.add_argument(
        "--init", default=None, help="initializer word for --images (default: object)"
    )
    parser.add_argument("--token", default="<concept>")
    parser.add_argument(
        "--encoder",
        default=None,
        help=f"concept encoder file (default: {DEFAULT_ENCODER} when it exists)",
    )
    parser.add_argument(
        "--classic", action="store_true", help="classic inversion even when an encoder exists"
    )
    parser.add_argument(
        "--refine-steps",
        type=int,
        default=EncodeConfig.refine_steps,
        help="refinement steps after the encoder (default: oneword encode's)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEMO_STEPS,
        help="classic inversion steps (with --classic, or as the encoder's fallback)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default="runs/demo")
    parser.set_defaults(func=run_demo)
