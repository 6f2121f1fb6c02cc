"""The one error type users see: a message that says what is wrong and what to do."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class OnewordError(Exception):
    """Bad input or an impossible request; the CLI prints its message on one line and exits 2."""


class ImageError(OnewordError):
    """An image (or a set of images) that cannot be used; the message names the file."""


class EmbeddingFileError(OnewordError):
    """An embedding file that cannot be read, converted or loaded into a model."""


class TokenError(OnewordError):
    """A placeholder token that cannot be added (exists already, splits into several ids, ...)."""


class ModelLoadError(OnewordError):
    """A model folder or hub id that cannot be loaded."""


def reason(error: BaseException, limit: int = 300) -> str:
    """One line for an exception from a library: its type and message, whitespace collapsed,
    and without PyTorch's weights-only advice (to turn the check off: never right for a
    file from elsewhere) or a page of documentation links.

    >>> reason(ValueError("bad\\n  value"))
    'ValueError: bad value'
    """
    import re

    text = str(error)
    for marker in (
        "Weights only load failed",  # torch.load(weights_only=True): keep only the reason
        "WeightsUnpickler error:",
    ):
        if marker in text:
            tail = text.split("WeightsUnpickler error:")[-1]
            tail = tail.split("Check the documentation of torch.load")[0]
            tail = tail.split(" Please use")[0].split("from a trusted source.")[-1]
            text = f"refused by the weights-only unpickler: {tail.strip()}"
            break
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """Print warnings as one line each ("oneword export: warning: ..."), without Python's
    file name and source line, for the length of a command."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"{prog}: warning: {text}", file=file or sys.stderr)

    original = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
