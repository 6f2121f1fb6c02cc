"""The commands of `oneword`: each one's module and one-line help, without importing it.

`oneword --help` lists every command from this table alone; a command's module (which may
import torch and the models, seconds on a CPU) is imported only when that command runs or
its own `--help` is asked for.
"""

from __future__ import annotations

# name -> (module under oneword.cli, its add_*_parser function, the one-line help), in the
# order `oneword --help` lists them.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": (
        "info",
        "add_info_parser",
        "describe a model: family, widths, resolution, prediction type, vocabulary",
    ),
    "demo": (
        "demo",
        "add_demo_parser",
        "learn a token for a held-out concept of the built-in world and show it in new scenes",
    ),
    "invert": (
        "invert",
        "add_invert_parser",
        "learn a new word for a concept from a few images (textual inversion)",
    ),
    "encode": (
        "encode",
        "add_encode_parser",
        "a concept's token from a trained encoder in about a second, refined, with fallback",
    ),
    "export": (
        "export",
        "add_export_parser",
        "convert an embedding file to the A1111, ComfyUI, kohya, diffusers or oneword layout",
    ),
    "generate": (
        "generate",
        "add_generate_parser",
        "sample a grid of images with learned tokens (rows = prompts, columns = samples)",
    ),
    "eval": (
        "eval",
        "add_eval_parser",
        "compare token-learning methods on a concept suite (quality, speed, memory)",
    ),
    "world": (
        "world",
        "add_world_parser",
        "the miniature world: train its models, write its data and concept suite",
    ),
    "serve": (
        "serve",
        "add_serve_parser",
        "a web page from images to a token file (Gradio), on this machine",
    ),
}


def command_help(name: str) -> str:
    """The one-line help of command `name`, as `oneword --help` lists it."""
    return COMMANDS[name][2]
