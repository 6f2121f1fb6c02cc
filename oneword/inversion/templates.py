"""Prompt templates for inversion: neutral captions with one slot for the new word.

Gal et al. (2023, Sec. 4.1 and their appendix) train S* with short CLIP-ImageNet-style
captions ("a photo of a S*", "a rendering of a S*", ...), sampled at random each step, so
the token has to explain the images rather than one fixed sentence. These lists are our
own in that style. The class-word cue ("a photo of a S* dog") ties the token to its class
and often helps editability.

A template FILE is plain text, one template per line, each with exactly one "{}".
Blank lines and lines starting with "#" are ignored.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import OnewordError

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

# Prompts for the sample grid written after training: the reconstruction, then edits that
# show whether the word still composes with the rest of a prompt.
OBJECT_SAMPLE_PROMPTS = [
    "a photo of {}",
    "a painting of {} in the style of van gogh",
    "{} on the beach",
    "a pencil sketch of {}",
]
STYLE_SAMPLE_PROMPTS = [
    "a painting in the style of {}",
    "a house in the style of {}",
    "a portrait of a woman in the style of {}",
    "a cat in the style of {}",
]


def load_templates(spec: str) -> list[str]:
    """Templates by name ("object", "style") or from a text file (one template per line).

    Args:
        spec: "object", "style" or a path to a file.

    Returns:
        Templates, each with exactly one "{}".

    Raises:
        OnewordError: an unknown name, an unreadable file, or a line without exactly one "{}".
    """
    if spec == "object":
        return list(OBJECT_TEMPLATES)
    if spec == "style":
        return list(STYLE_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise OnewordError(
            f"--templates {spec!r} is neither 'object', 'style' nor a file "
            "(a text file with one template per line, each with one '{}')"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise OnewordError(f"cannot read template file {path}: {error}") from None
    templates = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line or line.count("{") != 1 or line.count("}") != 1:
            raise OnewordError(
                f"{path}:{number}: template {line!r} must contain exactly one '{{}}' "
                "where the token goes (and no other braces)"
            )
        templates.append(line)
    if not templates:
        raise OnewordError(f"template file {path} has no templates (one per line, with '{{}}')")
    return templates


def fill(template: str, token: str, class_word: str | None = None) -> str:
    """Put the token (and, with the class-word cue, "token class") into the template.

    >>> fill("a photo of a {}", "<cat>", "cat")
    'a photo of a <cat> cat'
    """
    return template.replace("{}", f"{token} {class_word}" if class_word else token)
