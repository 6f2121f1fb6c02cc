"""Concept suites: a few images per concept plus the prompts to test a token with.

The folder format (`oneword-suite/1`), which users also fill with their own concepts::

    SUITE/
      suite.json          {"name": ..., "format": "oneword-suite/1", "concepts": [names...]}
                          (optional; without it every non-hidden subfolder is a concept)
      <concept>/
        concept.json      {"class_word": "star",
                           "prompts": ["a photo of {} on a green background", ...],
                           "attributes": {...} (optional ground truth),
                           "edits": [{...}, ...] (optional, one per prompt)}
        00.png 01.png ... 3-5 images (png, jpg, jpeg, webp, bmp)

`read_suite` also reads the DreamBooth dataset as it is published (see
`read_dreambooth`). `write_world_suite` writes the world's held-out concepts in this format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from oneword.datasets.world import (
    HELD_OUT,
    Identity,
    Scene,
    concept_scenes,
    edit_prompts,
    render,
)
from oneword.errors import OnewordError

SUITE_FORMAT = "oneword-suite/1"
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_PROMPTS: tuple[str, ...] = ("a photo of {}",)  # when concept.json has no "prompts"
DREAMBOOTH_FILE = "prompts_and_classes.txt"
DREAMBOOTH_LIVE_CLASSES = frozenset({"dog", "cat"})  # DreamBooth's live subjects


@dataclass
class SuiteConcept:
    """One concept of a suite. `prompts` are templates with "{}" for the token;
    `edits[i]` (if any) is the attribute change prompt `i` asks for."""

    name: str
    images: list[Path]
    class_word: str
    prompts: list[str]
    attributes: dict[str, Any] | None = None
    edits: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    images = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise OnewordError(
            f"concept folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); add 3-5"
        )
    return images


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise OnewordError(f"{path} is not valid JSON: {exn}") from exn
    except (OSError, UnicodeDecodeError) as exn:
        raise OnewordError(f"cannot read {path}: {exn}") from exn


def _check_prompts(prompts: Any, where: Path) -> list[str]:
    if not isinstance(prompts, list) or not prompts:
        raise OnewordError(f'{where}: "prompts" must be a non-empty list of strings with "{{}}"')
    for prompt in prompts:
        if not isinstance(prompt, str) or "{}" not in prompt:
            raise OnewordError(
                f'{where}: prompt {prompt!r} has no "{{}}" where the token goes, '
                f'e.g. "a photo of {{}} on the beach"'
            )
    return prompts


def _read_concept(folder: Path) -> SuiteConcept:
    if not folder.is_dir():
        raise OnewordError(f"concept folder {folder} does not exist")
    config_path = folder / "concept.json"
    if not config_path.is_file():
        raise OnewordError(
            f'{config_path} is missing; write {{"class_word": "...", "prompts": ["a photo of {{}}"]}}'
        )
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise OnewordError(f"{config_path} must hold a JSON object, not {type(config).__name__}")
    class_word = config.get("class_word")
    if not isinstance(class_word, str) or not class_word.strip():
        raise OnewordError(f'{config_path} needs a "class_word" (e.g. "dog", "star", "object")')
    prompts = _check_prompts(config.get("prompts", list(DEFAULT_PROMPTS)), config_path)
    attributes = config.get("attributes")
    if attributes is not None and not isinstance(attributes, dict):
        raise OnewordError(f'{config_path}: "attributes" must be an object')
    edits = config.get("edits")
    if edits is not None and (
        not isinstance(edits, list)
        or len(edits) != len(prompts)
        or not all(isinstance(e, dict) for e in edits)
    ):
        raise OnewordError(
            f'{config_path}: "edits" must be a list of {len(prompts)} objects, one per prompt'
        )
    return SuiteConcept(
        name=folder.name,
        images=_images_in(folder),
        class_word=class_word.strip(),
        prompts=list(prompts),
        attributes=attributes,
        edits=edits,
    )


def _extract_template(line: str) -> str:
    """`'a {0} {1} in the snow'.format(unique_token, class_token),` -> the quoted text."""
    quoted = re.search(r"""(['"])(.*?\{0\}.*?)\1""", line)
    if quoted:
        return quoted.group(2).strip()
    return line.strip().rstrip(",").strip()


def parse_dreambooth_prompts(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse DreamBooth's `prompts_and_classes.txt`.

    Layout assumed (as published in google/dreambooth `dataset/`): a "Classes" block of
    `subject_name,class` lines (its `subject_name,class` header skipped), then "Object
    Prompts" and "Live Subject Prompts" sections whose lines hold templates such as
    `'a {0} {1} in the jungle'.format(unique_token, class_token),` with {0} the unique
    token and {1} the class. Blank lines, "Prompts", `prompt_list = [` and `]` are ignored.
    A file without section headers puts every template in the object list.

    Returns:
        (subject -> class, object templates, live-subject templates); templates keep
        their `{0}`/`{1}` fields.
    """
    subjects: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = "classes"
    for raw in text.splitlines():
        line = raw.strip()
        lowered = line.lower()
        if lowered.startswith("object prompts"):
            section = "object"
        elif lowered.startswith("live subject prompts"):
            section = "live"
        elif "{0}" in line:
            prompts["live" if section == "live" else "object"].append(_extract_template(line))
        elif section == "classes" and "," in line and "{" not in line:
            name, class_word = (part.strip() for part in line.split(",", 1))
            if name and class_word and name.lower() != "subject_name":
                subjects[name] = class_word
    return subjects, prompts["object"], prompts["live"]


def _to_token_template(template: str, class_word: str) -> str:
    return template.replace("{0}", "{}").replace("{1}", class_word)


def read_dreambooth(
    prompts_file: str | os.PathLike, dataset_dir: str | os.PathLike | None = None
) -> list[SuiteConcept]:
    """Read the DreamBooth dataset: subject folders of images and `prompts_and_classes.txt`.

    Args:
        prompts_file: the `prompts_and_classes.txt` file (see `parse_dreambooth_prompts`).
        dataset_dir: the folder holding the subject folders (default: the file's folder).

    Returns:
        One concept per subject, in file order; prompts become "{}" templates followed by
        the class word ("a {} dog in the jungle"); live subjects (dog, cat) get the live
        prompts when the file has them.
    """
    prompts_file = Path(prompts_file)
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else prompts_file.parent
    try:
        text = prompts_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exn:
        raise OnewordError(f"cannot read {prompts_file}: {exn}") from exn
    subjects, object_prompts, live_prompts = parse_dreambooth_prompts(text)
    if not subjects:
        raise OnewordError(f"{prompts_file} lists no subjects (lines 'subject_name,class')")
    if not object_prompts and not live_prompts:
        raise OnewordError(
            f"{prompts_file} holds no prompt templates with {{0}} (token) and {{1}} (class)"
        )
    concepts = []
    for name, class_word in subjects.items():
        folder = dataset_dir / name
        if not folder.is_dir():
            raise OnewordError(
                f"DreamBooth subject {name!r} listed in {prompts_file} has no folder {folder}"
            )
        live = class_word.lower() in DREAMBOOTH_LIVE_CLASSES and live_prompts
        templates = live_prompts if live else (object_prompts or live_prompts)
        concepts.append(
            SuiteConcept(
                name=name,
                images=_images_in(folder),
                class_word=class_word,
                prompts=[_to_token_template(t, class_word) for t in templates],
            )
        )
    return concepts


def read_suite(path: str | os.PathLike) -> list[SuiteConcept]:
    """Read a concept suite: our folder format, or the DreamBooth dataset layout.

    DreamBooth is recognised by `prompts_and_classes.txt` in `path` or in `path/dataset`
    (subject folders beside it, or in `path/dataset`).

    Args:
        path: the suite folder.

    Returns:
        The concepts, in suite.json order (else sorted by folder name).
    """
    root = Path(path)
    if not root.is_dir():
        raise OnewordError(f"suite folder {root} does not exist (or is not a folder)")
    suite_file = root / "suite.json"
    if suite_file.is_file():
        suite = _read_json(suite_file)
        if not isinstance(suite, dict):
            raise OnewordError(f"{suite_file} must hold a JSON object")
        if suite.get("format", SUITE_FORMAT) != SUITE_FORMAT:
            raise OnewordError(
                f"{suite_file} has format {suite['format']!r}; this reader knows {SUITE_FORMAT!r}"
            )
        names = suite.get("concepts")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise OnewordError(f'{suite_file}: "concepts" must be a list of folder names')
            return [_read_concept(root / name) for name in names]
    else:
        for folder in (root, root / "dataset"):
            if (folder / DREAMBOOTH_FILE).is_file():
                dataset_dir = root / "dataset" if (root / "dataset").is_dir() else folder
                return read_dreambooth(folder / DREAMBOOTH_FILE, dataset_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise OnewordError(f"suite folder {root} holds no concept folders")
    return [_read_concept(folder) for folder in folders]


# ---------------------------------------------------------------------------------------
# Writing the world's held-out suite
# ---------------------------------------------------------------------------------------


def _identity_seed(seed: int, identity: Identity) -> int:
    digest = hashlib.blake2b(f"oneword-suite:{seed}:{identity.name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def concept_image_set(
    identity: Identity, count: int, seed: int, resolution: int = 64
) -> tuple[list[Scene], torch.Tensor]:
    """The images a world suite written with `seed` holds for `identity` (its "image set").

    They depend only on (seed, identity), so the target factory and the suites agree on what
    image set `seed` of an identity is.

    Returns:
        The scenes and their renders, uint8 (count, 3, resolution, resolution).
    """
    generator = torch.Generator().manual_seed(_identity_seed(seed, identity))
    scenes = concept_scenes(identity, count, generator)
    return scenes, render(scenes, resolution)


def write_concept_images(
    identity: Identity, folder: Path, *, count: int = 5, seed: int = 0, resolution: int = 64
) -> list[Path]:
    """Render `count` varied scenes of `identity` as PNG files `folder/NN.png` (the demo's and
    the web page's example images)."""
    from ..images import tensor_to_images

    scenes = concept_scenes(identity, count, torch.Generator().manual_seed(seed))
    pixels = render(scenes, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(tensor_to_images(pixels.float() / 127.5 - 1)):
        path = folder / f"{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_world_suite(
    out_dir: str | os.PathLike,
    *,
    images_per_concept: int = 5,
    seed: int = 0,
    resolution: int = 64,
    identities: Sequence[Identity] = HELD_OUT,
) -> Path:
    """Render the world's concepts into a suite folder (written aside, then renamed).

    Each concept: images in varied scenes (backgrounds, sizes, positions), the
    `edit_prompts` valid for it (>= 8) with their edits, the identity as "attributes"
    and every image's Scene under "scenes". A concept's images depend only on (seed,
    identity), not on the other identities.

    Args:
        out_dir: the suite folder to create (must not exist, or be empty).
        images_per_concept: images per concept.
        seed: seed of the scenes.
        resolution: image side in pixels.
        identities: the concepts (default: the world's held-out ones).

    Returns:
        `out_dir`.
    """
    out_dir = Path(out_dir)
    identities = list(identities)
    if images_per_concept < 1:
        raise OnewordError(f"images_per_concept must be >= 1, got {images_per_concept}")
    if not identities or len({i.name for i in identities}) != len(identities):
        raise OnewordError("identities must be a non-empty list without duplicates")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OnewordError(f"{out_dir} exists and is not empty; pick a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling (same filesystem, so the final rename is atomic); mkdir, unlike
    # mkdtemp, keeps the user's umask for the published folder.
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for identity in identities:
            # 1. Varied scenes of this identity, rendered.
            scenes, pixels = concept_image_set(identity, images_per_concept, seed, resolution)
            folder = staging / identity.name
            folder.mkdir()
            for index, image in enumerate(pixels):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:02d}.png")
            # 2. Prompts, the edits they ask for, and the ground truth.
            prompts_and_edits = edit_prompts(identity)
            concept = {
                "class_word": identity.class_word(),
                "prompts": [template for template, _ in prompts_and_edits],
                "edits": [dict(edit) for _, edit in prompts_and_edits],
                "attributes": {
                    "shape": identity.shape,
                    "colour": identity.colour,
                    "pattern": identity.pattern,
                },
                "scenes": [scene.to_dict() for scene in scenes],
            }
            (folder / "concept.json").write_text(json.dumps(concept, indent=2) + "\n")
        suite = {
            "name": "oneword-world",
            "format": SUITE_FORMAT,
            "concepts": [identity.name for identity in identities],
            "seed": seed,
            "resolution": resolution,
        }
        (staging / "suite.json").write_text(json.dumps(suite, indent=2) + "\n")
        # 3. Publish: the suite appears under its name only once complete.
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
