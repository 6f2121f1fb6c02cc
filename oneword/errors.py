"""The one error type users see: a message that says what is wrong and what to do."""

from __future__ import annotations


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
