"""Classic per-concept textual inversion (Gal et al., 2023): `invert`, `invert_many`."""

from .invert import (
    ConceptSpec,
    InversionConfig,
    InversionResult,
    PreparedImages,
    invert,
    invert_many,
    prepare_images,
)
from .templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, load_templates

__all__ = [
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "ConceptSpec",
    "InversionConfig",
    "InversionResult",
    "PreparedImages",
    "invert",
    "invert_many",
    "load_templates",
    "prepare_images",
]
