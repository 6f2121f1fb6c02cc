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

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from ..errors import OnewordError

IDENTITY_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "pattern")
# Attribute order of the reports: the world's, then any others alphabetically.
ATTRIBUTE_ORDER: tuple[str, ...] = ("shape", "colour", "pattern", "background", "size", "position")
CLIP_SPECS = "world, open_clip:NAME[:PRETRAINED|FILE|DIR] or transformers:FOLDER"
BATCH = 64  # images or texts per scorer forward pass


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


def images_to_uint8(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> (n, 3, size, size) uint8 (resized with bicubic filtering if needed)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return rearrange(torch.from_numpy(np.stack(arrays)), "n h w c -> n c h w").contiguous()


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


def pairwise_similarity(features: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine over all pairs: features (n, p), references (m, p), both unit norm."""
    return float((features.float() @ references.float().T).mean())


def matched_similarity(features: torch.Tensor, others: torch.Tensor) -> float:
    """Mean cosine of row i with row i: features and others (n, p), unit norm."""
    return float((features.float() * others.float()).sum(-1).mean())


def _to_unit_pixels(images: Sequence[Image.Image], size: int, mean, std) -> torch.Tensor:
    """PIL -> (n, 3, size, size) fp32, resized (bilinear, antialiased) and normalised."""
    pixels = images_to_uint8(images).float() / 255  # (n, 3, H, W) in [0, 1]
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean) / std


@dataclass
class ImageTextScorer:
    """A CLIP-like model reduced to two functions that return unit-norm fp32 features.

    Attributes:
        name: what was loaded ("world", "open_clip:ViT-B-32:openai", ...).
        encode_images: PIL images -> (n, p).
        encode_texts: strings -> (n, p), or None for an image-only model (DINO).
    """

    name: str
    encode_images: Callable[[Sequence[Image.Image]], torch.Tensor]
    encode_texts: Callable[[Sequence[str]], torch.Tensor] | None = None

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, p) unit-norm fp32 image features, in batches of `BATCH`."""
        images = list(images)
        chunks = [self.encode_images(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
        return F.normalize(torch.cat(chunks).float().cpu(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, p) unit-norm fp32 text features."""
        if self.encode_texts is None:
            raise OnewordError(f"{self.name} has no text tower")
        texts = list(texts)
        chunks = [self.encode_texts(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
        return F.normalize(torch.cat(chunks).float().cpu(), dim=-1)


def has_world_clip(folder: str | Path | None) -> bool:
    """Whether a model folder ships the parts of a full CLIP (the miniature world does)."""
    if folder is None:
        return False
    folder = Path(folder)
    return (
        (folder / "image_encoder" / "config.json").is_file()
        and (folder / "image_encoder" / "text_projection.safetensors").is_file()
        and (folder / "text_encoder" / "config.json").is_file()
        and (folder / "tokenizer").is_dir()
    )


def _world_clip(folder: Path, device: torch.device) -> ImageTextScorer:
    """A transformers `CLIPModel` assembled from a world folder: text_encoder/ (text tower),
    image_encoder/ (vision tower + visual projection) and image_encoder/text_projection.safetensors
    (text projection + temperature); preprocessing as the world trained it (mean/std 0.5)."""
    from safetensors.torch import load_file
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    if not has_world_clip(folder):
        raise OnewordError(
            f"--clip world needs {folder}/image_encoder/ with text_projection.safetensors, "
            f"text_encoder/ and tokenizer/ (the miniature world's layout); pass --clip {CLIP_SPECS}"
        )
    try:
        kwargs = {"local_files_only": True, "torch_dtype": torch.float32}
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", **kwargs)
        vision = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", **kwargs)
        projection = load_file(str(folder / "image_encoder" / "text_projection.safetensors"))
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except Exception as exc:
        raise OnewordError(f"cannot assemble the world CLIP from {folder}: {exc}") from None
    config = CLIPConfig(
        text_config=text.config.to_dict(),
        vision_config=vision.config.to_dict(),
        projection_dim=vision.config.projection_dim,
    )
    clip = CLIPModel(config)
    # Part by part: transformers 4 nests the towers (text.text_model), 5 flattens them.
    parts = (
        (clip.text_model, getattr(text, "text_model", text)),
        (clip.vision_model, vision.vision_model),
        (clip.visual_projection, vision.visual_projection),
    )
    try:
        for target, source in parts:
            target.load_state_dict(source.state_dict())
        with torch.no_grad():
            clip.text_projection.weight.copy_(projection["text_projection.weight"].float())
            clip.logit_scale.copy_(projection["logit_scale"].float().reshape(()))
    except (RuntimeError, KeyError) as exc:
        raise OnewordError(f"the world CLIP in {folder} does not fit a CLIPModel: {exc}") from None
    clip = clip.to(device).eval().requires_grad_(False)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    preprocessor = folder / "feature_extractor" / "preprocessor_config.json"
    if preprocessor.is_file():
        saved = json.loads(preprocessor.read_text())
        mean, std = saved.get("image_mean", mean), saved.get("image_std", std)
    size = int(vision.config.image_size)
    length = min(tokenizer.model_max_length, text.config.max_position_embeddings)

    def encode_images(images):
        pixels = _to_unit_pixels(images, size, mean, std).to(device)  # (n, 3, s, s)
        return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)

    def encode_texts(texts):
        # As the world trained it (and diffusers encodes prompts): pad to 77, no mask.
        ids = tokenizer(
            list(texts),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return clip.text_projection(clip.text_model(input_ids=ids).pooler_output)

    return ImageTextScorer("world", encode_images, encode_texts)


def _transformers_clip(folder: Path, device: torch.device) -> ImageTextScorer:
    """A transformers `CLIPModel` folder with its tokenizer and image processor."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    if not (folder / "config.json").is_file():
        raise OnewordError(f"--clip transformers:{folder}: no config.json (a CLIPModel folder?)")
    try:
        clip = CLIPModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise OnewordError(
            f"cannot load --clip transformers:{folder} (a CLIPModel with tokenizer and "
            f"preprocessor_config.json): {type(exc).__name__}: {exc}"
        ) from None
    clip = clip.to(device).eval().requires_grad_(False)
    length = min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)

    def encode_images(images):
        pixels = processor(images=list(images), return_tensors="pt").pixel_values.to(device)
        return clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)

    def encode_texts(texts):
        tokens = tokenizer(
            list(texts), padding=True, max_length=length, truncation=True, return_tensors="pt"
        ).to(device)
        output = clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return clip.text_projection(output.pooler_output)

    return ImageTextScorer(f"transformers:{folder}", encode_images, encode_texts)


def _open_clip(name: str, pretrained: str | None, device: torch.device) -> ImageTextScorer:
    """An open_clip model: a built-in NAME with a pretrained tag, a weights file or a folder
    of weights; or NAME "local-dir"/"hf-hub" with the rest as open_clip's own schema."""
    import open_clip

    label = f"open_clip:{name}" + (f":{pretrained}" if pretrained else "")
    if name in ("local-dir", "hf-hub"):
        name, pretrained = f"{name}:{pretrained}", None
    elif pretrained and Path(pretrained).expanduser().is_dir():
        folder = Path(pretrained).expanduser()
        if (folder / "open_clip_config.json").is_file():
            name, pretrained = f"local-dir:{folder}", None
        else:
            weights = sorted(
                p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
            )
            if not weights:
                raise OnewordError(f"--clip {label}: {folder} holds no weights file")
            pretrained = str(weights[0])
    elif not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            raise OnewordError(
                f"--clip {label}: no pretrained weights known for {name!r}; pass "
                "open_clip:NAME:TAG (e.g. open_clip:ViT-B-32:openai), a weights file or a folder"
            )
        pretrained = tags[0]
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        raise OnewordError(f"cannot load --clip {label}: {type(exc).__name__}: {exc}") from None
    model = model.eval().requires_grad_(False).float()

    def encode_images(images):
        pixels = torch.stack([preprocess(image.convert("RGB")) for image in images]).to(device)
        return model.encode_image(pixels)

    def encode_texts(texts):
        return model.encode_text(tokenizer(list(texts)).to(device))

    return ImageTextScorer(label, encode_images, encode_texts)


def load_clip_scorer(
    spec: str | None, model_folder: str | Path | None, device: str | torch.device = "cpu"
) -> ImageTextScorer | None:
    """The CLIP that scores CLIP-I and CLIP-T.

    Args:
        spec: "world" (the model folder's own CLIP), "open_clip:NAME[:PRETRAINED]" (a tag,
            a weights file or a local folder), "transformers:FOLDER" (a CLIPModel folder),
            or None: "world" when the model folder has one, else no CLIP scores.
        model_folder: the diffusion model's folder (for "world").
        device: where to run it.

    Returns:
        An `ImageTextScorer`, or None (spec None and no world CLIP).
    """
    device = torch.device(device)
    if spec is None:
        return _world_clip(Path(model_folder), device) if has_world_clip(model_folder) else None
    kind, _, rest = spec.partition(":")
    if kind == "world" and not rest:
        if model_folder is None:
            raise OnewordError("--clip world needs a local model folder")
        return _world_clip(Path(model_folder), device)
    if kind == "transformers" and rest:
        return _transformers_clip(Path(rest).expanduser(), device)
    if kind == "open_clip" and rest:
        name, _, pretrained = rest.partition(":")
        return _open_clip(name, pretrained or None, device)
    raise OnewordError(f"--clip {spec!r}: expected {CLIP_SPECS}")


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
