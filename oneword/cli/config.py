"""Command-line flags from a config dataclass, and the config back from the parsed flags.

One way for every command: a field `refine_steps` becomes `--refine-steps`, its type comes
from the field's default (int, float, str; a bool becomes a switch), and its help from
`field(metadata={"help": ...})`, else from the `#` comment above the field (or after it on
the same line) in the class source, so the config's comments are the help text. A command
passes `overrides` for what a comment cannot say (choices, a metavar, another flag name, a
help text written for the command line).

Flags default to None ("not given"), so `config_from_flags` can layer them over a base
config (defaults, a preset or a config file): what the user did not type keeps the base's
value.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable, Iterable
from functools import cache

__all__ = ["add_config_flags", "config_from_flags", "field_help", "flag_name"]


def flag_name(name: str) -> str:
    """`refine_steps` -> `--refine-steps`."""
    return "--" + name.replace("_", "-")


@cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines directly above it, else the comment on its line."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    out: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 1
        above = []
        for line in reversed(lines[:row]):
            stripped = line.strip()
            if not stripped.startswith("#"):
                break
            above.append(stripped.lstrip("#").strip())
        text = " ".join(reversed(above))
        if not text:
            code_line = lines[node.end_lineno - 1]
            if "#" in code_line:
                text = code_line.split("#", 1)[1].strip()
        if text:
            out[node.target.id] = text
    return out


def field_help(cls: type) -> dict[str, str]:
    """Help text per field of dataclass `cls`: metadata["help"], else its source comment."""
    comments = _comments(cls)
    return {
        f.name: f.metadata.get("help") or comments.get(f.name, "") for f in dataclasses.fields(cls)
    }


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Iterable[str] | None = None,
    *,
    overrides: dict[str, dict] | None = None,
    help_suffix: Callable[[dataclasses.Field], str] | None = None,
) -> None:
    """Add one flag per field of `cls` (those in `names`, in that order; default: all).

    Args:
        parser: the command's parser.
        cls: a config dataclass.
        names: the fields that get a flag.
        overrides: field -> `add_argument` keywords that replace the inferred ones
            ("flags": [...] replaces the flag names, "help" the comment).
        help_suffix: appended to each help text, e.g. a preset's value.
    """
    overrides = overrides or {}
    helps = field_help(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names if names is not None else fields:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict = {"default": None, "dest": name, "help": helps.get(name, "")}
        if isinstance(default, bool):
            # A switch that turns the default around: "--quiet" for False, "--no-x" for True.
            kwargs |= {"action": "store_const", "const": not default}
            flags = [flag_name(name) if not default else "--no-" + name.replace("_", "-")]
        elif isinstance(default, tuple):
            kinds = {type(v) for v in default}
            kwargs |= {"nargs": "+", "type": kinds.pop() if len(kinds) == 1 else str}
            flags = [flag_name(name)]
        else:
            if isinstance(default, (int, float)):
                kwargs["type"] = type(default)
            flags = [flag_name(name)]
        extra = dict(overrides.get(name, {}))
        flags = extra.pop("flags", flags)
        kwargs |= extra
        if help_suffix is not None:
            kwargs["help"] = (kwargs.get("help") or "") + help_suffix(f)
        parser.add_argument(*flags, **kwargs)


def config_from_flags(args: argparse.Namespace, cls: type, base=None, *, convert=None):
    """`base` (default: `cls()`) with every field whose flag was given (not None) replaced.

    Args:
        args: the parsed flags (dest = field name).
        cls: the config dataclass.
        base: the config the flags override (defaults, a preset, a config file).
        convert: field -> function(value) -> field value, for flags typed otherwise
            (e.g. "NAME=NUMBER" lists); lists become tuples.
    """
    base = base if base is not None else cls()
    convert = convert or {}
    changes = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in convert:
            value = convert[f.name](value)
        changes[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **changes)
