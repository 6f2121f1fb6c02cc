"""Quality and cost metrics for learned tokens.

Oracle metrics (the miniature world, where every image's attributes are known):
  identity     share of samples of "a photo of S*" whose shape, colour AND pattern are
               the concept's;
  editability  share of samples of edit prompts ("S* on a green background") whose
               asked-for attributes all hold AND whose other identity attributes are kept.
CLIP metrics, as in Gal et al. (2023), Sec. 5.1:
  CLIP-I       mean cosine over all (sample, concept image) pairs of image features;
  CLIP-T       mean cosine between a sample's image feature and the text feature of its
               prompt with the token removed ("a photo of on a green background").
DINO (Ruiz et al., 2023): CLIP-I with a self-supervised ViT's class token instead.
Cost: wall seconds, UNet forward passes and the process's peak memory.

Every scorer is run in fp32 with fixed preprocessing, so scores are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..clip import (  # noqa: F401  (re-exported: the scorers live in the one CLIP loader)
    BATCH,
    CLIP_SPECS,
    ImageTextScorer,
    _to_unit_pixels,
    has_world_clip,
    images_to_uint8,
    load_clip_scorer,
    pairwise_similarity,
)
from ..errors import OnewordError

IDENTITY_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "pattern")
# Attribute order of the reports: the world's, then any others alphabetically.
ATTRIBUTE_ORDER: tuple[str, ...] = ("shape", "colour", "pattern", "background", "size", "position")


def _mean(values: Sequence) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------
# Oracle metrics


def matches(predictions: Mapping[str, Sequence[str]], expected: Mapping[str, str]) -> list[bool]:
    """Per sample: whether every attribute in `expected` was predicted as expected.

    Args:
        predictions: attribute -> predicted value per sample (what `Oracle.predict` returns).
        expected: attribute -> the value it should have.

    Returns:
        One bool per sample.
    """
    missing = [name for name in expected if name not in predictions]
    if missing:
        raise OnewordError(f"the oracle does not predict {missing}; it knows {sorted(predictions)}")
    count = len(next(iter(predictions.values()))) if predictions else 0
    return [
        all(predictions[name][i] == value for name, value in expected.items()) for i in range(count)
    ]


def oracle_scores(
    identity_predictions: Mapping[str, Sequence[str]],
    edit_predictions: Sequence[Mapping[str, Sequence[str]]],
    edits: Sequence[Mapping[str, str]],
    attributes: Mapping[str, str],
) -> dict:
    """Identity, editability and per-attribute accuracy of one concept's samples.

    Args:
        identity_predictions: oracle predictions for the samples of "a photo of S*".
        edit_predictions: oracle predictions for the samples of each edit prompt.
        edits: per edit prompt, the attribute values it asks for ({} = asks for nothing,
            not counted as an edit).
        attributes: the concept's ground truth (shape, colour, pattern).

    Returns:
        {"identity", "editability" (None without edits), "per_attribute": {attribute:
        accuracy over every sample where a value is expected}, "identity_samples",
        "edit_samples"}.
    """
    if len(edit_predictions) != len(edits):
        raise OnewordError(f"{len(edit_predictions)} edit prompts sampled but {len(edits)} edits")
    identity = {name: attributes[name] for name in IDENTITY_ATTRIBUTES if name in attributes}
    if not identity:
        raise OnewordError(
            f"the concept's attributes {dict(attributes)} name none of {IDENTITY_ATTRIBUTES}"
        )
    identity_hits = matches(identity_predictions, identity)
    edit_hits: list[bool] = []
    per_attribute: dict[str, list[bool]] = {}
    for name, value in identity.items():
        per_attribute.setdefault(name, []).extend(p == value for p in identity_predictions[name])
    for predictions, edit in zip(edit_predictions, edits):
        if not edit:
            continue
        # The edit overrides the identity attributes it names ("a red S*" changes colour).
        expected = {**identity, **edit}
        edit_hits += matches(predictions, expected)
        for name, value in expected.items():
            per_attribute.setdefault(name, []).extend(p == value for p in predictions[name])
    order = [a for a in ATTRIBUTE_ORDER if a in per_attribute]
    order += sorted(a for a in per_attribute if a not in ATTRIBUTE_ORDER)
    return {
        "identity": _mean(identity_hits),
        "editability": _mean(edit_hits),
        "per_attribute": {name: _mean(per_attribute[name]) for name in order},
        "identity_samples": len(identity_hits),
        "edit_samples": len(edit_hits),
    }


def oracle_predict(oracle, images: Sequence[Image.Image]) -> dict[str, list[str]]:
    """The oracle's reading of PIL images (fitted to the oracle's resolution)."""
    return oracle.predict(images_to_uint8(images, oracle.config.resolution))


# ---------------------------------------------------------------------------------------
# Similarities


def strip_token(prompt: str, token: str = "{}") -> str:
    """The prompt without the token, as Gal et al. score CLIP-T.

    "a photo of {} on a green background" -> "a photo of on a green background"; the
    double space left behind (and a space before punctuation) is removed.
    """
    text = prompt.replace(token, " ")
    text = re.sub(r"\s+", " ", text)
    return re.sub(r" ([,.;:!?])", r"\1", text).strip()


def matched_similarity(features: torch.Tensor, others: torch.Tensor) -> float:
    """Mean cosine of row i with row i: features and others (n, p), unit norm."""
    return float((features.float() * others.float()).sum(-1).mean())


def load_dino_scorer(folder: str | Path, device: str | torch.device = "cpu") -> ImageTextScorer:
    """A self-supervised ViT (transformers ViT or Dinov2 folder); feature = class token."""
    from transformers import AutoImageProcessor, AutoModel

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise OnewordError(f"--dino {folder}: no config.json (a transformers ViT/Dinov2 folder)")
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise OnewordError(f"cannot load --dino {folder}: {type(exc).__name__}: {exc}") from None
    model = model.to(device).eval().requires_grad_(False)

    def encode_images(images):
        pixels = processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        hidden = model(pixel_values=pixels.pixel_values.to(device)).last_hidden_state
        return hidden[:, 0]  # (n, width): the class token, as DreamBooth's DINO metric

    return ImageTextScorer(f"dino:{folder}", encode_images)


# ---------------------------------------------------------------------------------------
# Cost


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or the process's VmHWM on Linux."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak resident set size (proc(5), /proc/[pid]/clear_refs)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mib(device: str | torch.device) -> float | None:
    """Peak memory since `reset_peak_memory`: CUDA max_memory_allocated, else VmHWM (MiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return None


def fallback_rates(rows: Sequence[dict], threshold: float, right_identity: float) -> dict | None:
    """How `oneword encode`'s check would decide on one method's tokens.

    Args:
        rows: per-concept rows with "concept", "identity" and "check_score".
        threshold: the check falls back when score > threshold.
        right_identity: a concept is "right" when its identity is >= this, else "wrong".

    Returns:
        {"threshold", "right_identity", "right", "wrong" (concept counts), "right_flagged",
        "wrong_flagged" (of those, how many the check sends to the fallback), and the names
        of the flagged concepts}; None when no row has both a score and an identity.
    """
    scored = [r for r in rows if r.get("check_score") is not None and r.get("identity") is not None]
    if not scored:
        return None
    right = [r for r in scored if r["identity"] >= right_identity]
    wrong = [r for r in scored if r["identity"] < right_identity]

    def flagged(group: list[dict]) -> list[str]:
        return [r["concept"] for r in group if not r["check_score"] <= threshold]  # NaN flags

    return {
        "threshold": threshold,
        "right_identity": right_identity,
        "right": len(right),
        "wrong": len(wrong),
        "right_flagged": len(flagged(right)),
        "wrong_flagged": len(flagged(wrong)),
        "flagged_right": flagged(right),
        "flagged_wrong": flagged(wrong),
    }
