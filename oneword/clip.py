"""The one CLIP loader: image towers for the encoder, image-text scorers for the metrics and
the fallback check, and the vision tower of the identity loss, named by one spec syntax:

| spec                                   | what it loads                                            |
|----------------------------------------|----------------------------------------------------------|
| `world`                                | the model folder's own CLIP (`<model>/image_encoder`,    |
|                                        | with text_encoder/ and tokenizer/ for a scorer)          |
| `transformers:FOLDER_OR_HUB_ID`        | a transformers CLIP (vision tower, or `CLIPModel` folder |
|                                        | for a scorer)                                            |
| `open_clip:NAME[:PRETRAINED|FILE|DIR]` | an open_clip model, e.g. `open_clip:ViT-L-14:openai`     |
| `open_clip:local-dir:/path`            | an open_clip folder (config + weights)                   |

A bare folder (the identity loss's `--clip-model FOLDER`, as before) means
`transformers:FOLDER`.

- `load_tower(spec, ...)` -> `ImageTower`: pooled and penultimate token features (the
  encoder reads them, as the image-prompt adapters do: IP-Adapter "plus" reads the
  penultimate layer), class token included (transformers `hidden_states[-2]`, open_clip
  `forward_intermediates`).
- `load_clip_scorer(spec, ...)` -> `ImageTextScorer`: unit-norm image and text features
  (CLIP-I, CLIP-T, the "clip" check).
- `load_clip_vision(spec, ...)` -> a differentiable `CLIPVisionModelWithProjection` with its
  pixel statistics (the identity loss L_clip).

Towers that match Stable Diffusion's text encoders: `open_clip:ViT-L-14:openai` (SD 1.x),
`open_clip:ViT-H-14:laion2b_s32b_b79k` (SD 2.x), `open_clip:ViT-bigG-14:laion2b_s39b_b160k`
(SDXL's second encoder). `pretrained` left out gives random weights for a tower, which is
only useful for tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from .errors import OnewordError

CLIP_SPECS = "world, open_clip:NAME[:PRETRAINED|FILE|DIR] or transformers:FOLDER"
BATCH = 64  # images or texts per scorer forward pass


def split_spec(spec: str) -> tuple[str, str]:
    """ "open_clip:ViT-L-14:openai" -> ("open_clip", "ViT-L-14:openai"); "world" -> ("world", "")."""
    kind, _, rest = str(spec).partition(":")
    return kind, rest


# ---------------------------------------------------------------------------------------
# Image towers (the concept encoder)


# OpenAI CLIP's pixel statistics: the default for transformers towers without a
# preprocessor_config.json. The world's CLIP was trained with mean = std = 0.5.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WORLD_MEAN = WORLD_STD = (0.5, 0.5, 0.5)


@dataclass
class ImageFeatures:
    """What the encoder reads from a tower, fp32.

    Attributes:
        pooled: (b, p) the pooled (projected when the tower has a projection) embedding.
        tokens: (b, t, w) the penultimate layer's tokens, class token first.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _read_preprocessing(folder: Path, default_mean, default_std):
    """mean/std from a CLIPImageProcessor's preprocessor_config.json, else the defaults."""
    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return tuple(default_mean), tuple(default_std)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise OnewordError(f"cannot read {config_file}: {error}") from None
    return tuple(config.get("image_mean", default_mean)), tuple(
        config.get("image_std", default_std)
    )


class ImageTower(nn.Module):
    """A frozen CLIP vision tower with its own preprocessing.

    Call it with images in [-1, 1] (b, 3, H, W) of any size; it resizes them to its
    `image_size`, normalises them and returns `ImageFeatures`.
    """

    def __init__(self, spec: str, backbone: nn.Module, kind: str, *, image_size: int, mean, std):
        super().__init__()
        self.spec = spec
        self.kind = kind  # "transformers" or "open_clip"
        self.backbone = backbone.requires_grad_(False).eval()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, self.image_size, self.image_size))
        self.pooled_dim = int(probe.pooled.shape[-1])
        self.token_dim = int(probe.tokens.shape[-1])
        self.num_tokens = int(probe.tokens.shape[1])

    def train(self, mode: bool = True) -> ImageTower:
        super().train(False)  # frozen: dropout and the like stay off
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] (or uint8) -> normalised (b, 3, S, S) in the tower's dtype."""
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        pixels = (images.float().to(self.mean.device) + 1) / 2  # (b, 3, H, W) in [0, 1]
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", antialias=True
            ).clamp(0, 1)
        return ((pixels - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> ImageFeatures:
        pixels = self.preprocess(images)
        if self.kind == "open_clip":
            visual = self.backbone
            layers = len(visual.transformer.resblocks)
            out = visual.forward_intermediates(
                pixels,
                indices=[max(0, layers - 2)],  # the penultimate block's output
                output_fmt="NLC",
                output_extra_tokens=True,
            )
            tokens = torch.cat(
                [out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1
            )  # (b, 1 + patches, w)
            return ImageFeatures(out["image_features"].float(), tokens.float())
        out = self.backbone(pixel_values=pixels, output_hidden_states=True)
        pooled = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        return ImageFeatures(pooled.float(), out.hidden_states[-2].float())


# ---------------------------------------------------------------------------------------
# Loading


def _load_transformers(spec: str, source: str, device, dtype, default_mean, default_std):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    folder = Path(source).expanduser()
    local = folder.is_dir()
    if local and not (folder / "config.json").is_file():
        raise OnewordError(
            f"image tower {folder} has no config.json; expected a transformers "
            "CLIPVisionModelWithProjection folder (config.json + model.safetensors)"
        )
    try:
        config = CLIPVisionConfig.from_pretrained(
            str(folder) if local else source, local_files_only=local or _offline()
        )
        with_projection = "CLIPVisionModel" not in (getattr(config, "architectures", None) or [])
        loader = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
        backbone = loader.from_pretrained(
            str(folder) if local else source,
            local_files_only=local or _offline(),
            torch_dtype=dtype,
        )
    except Exception as error:
        raise OnewordError(
            f"cannot load the image tower {source!r} ({type(error).__name__}: {error}); pass a "
            "local transformers CLIP vision folder (offline, hub ids only work once downloaded)"
        ) from None
    mean, std = default_mean, default_std
    if local:
        mean, std = _read_preprocessing(folder, default_mean, default_std)
        if not (folder / "preprocessor_config.json").is_file():
            mean, std = _read_preprocessing(folder.parent / "feature_extractor", mean, std)
    return ImageTower(
        spec,
        backbone.to(device),
        "transformers",
        image_size=int(backbone.config.image_size),
        mean=mean,
        std=std,
    )


def _load_open_clip(spec: str, rest: str, device, dtype):
    try:
        import open_clip
    except ImportError as error:
        raise OnewordError(f"tower {spec!r} needs open_clip_torch ({error})") from None
    if rest.startswith("local-dir:"):
        name, pretrained = rest, None
    else:
        name, _, pretrained = rest.partition(":")
        pretrained = pretrained or None
    if not name:
        raise OnewordError(f"tower {spec!r}: give a model name, e.g. open_clip:ViT-L-14:openai")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    except Exception as error:
        raise OnewordError(
            f"cannot create open_clip model {name!r} (pretrained={pretrained!r}): "
            f"{type(error).__name__}: {error}. Offline, use open_clip:local-dir:/path or a "
            "checkpoint already in the open_clip cache"
        ) from None
    preprocess = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
        raise OnewordError(f"tower {spec!r} is not a ViT; the encoder reads ViT patch tokens")
    size = preprocess.get("size", getattr(visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageTower(
        spec,
        visual.to(device, dtype),
        "open_clip",
        image_size=int(size),
        mean=tuple(preprocess.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_CLIP_STD)),
    )


def load_tower(
    spec: str,
    *,
    model_folder: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageTower:
    """Load the frozen image tower named by `spec` (see the module docstring).

    Args:
        spec: "world", "transformers:FOLDER", "open_clip:NAME[:PRETRAINED]" or
            "open_clip:local-dir:/path".
        model_folder: the diffusion model's folder ("world" reads its image_encoder/).
        device, dtype: where and in which precision the tower runs.

    Returns:
        An `ImageTower` (frozen, eval mode).
    """
    if spec == "world":
        if model_folder is None:
            raise OnewordError(
                "tower 'world' reads <model>/image_encoder, but no model folder was given"
            )
        folder = Path(model_folder) / "image_encoder"
        if not (folder / "config.json").is_file():
            raise OnewordError(
                f"tower 'world': {folder} does not exist; the model is not a miniature world. "
                "Pick a tower with --tower, e.g. open_clip:ViT-L-14:openai for SD 1.x"
            )
        return _load_transformers(spec, str(folder), device, dtype, WORLD_MEAN, WORLD_STD)
    kind, _, rest = spec.partition(":")
    if kind == "transformers" and rest:
        return _load_transformers(spec, rest, device, dtype, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    if kind == "open_clip" and rest:
        return _load_open_clip(spec, rest, device, dtype)
    raise OnewordError(
        f"unknown image tower {spec!r}; use world, transformers:FOLDER, "
        "open_clip:NAME[:PRETRAINED] or open_clip:local-dir:/path"
    )


# ---------------------------------------------------------------------------------------
# Image-text scorers (CLIP-I, CLIP-T, the "clip" check)


def images_to_uint8(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> (n, 3, size, size) uint8 (resized with bicubic filtering if needed)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return rearrange(torch.from_numpy(np.stack(arrays)), "n h w c -> n c h w").contiguous()


def pairwise_similarity(features: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine over all pairs: features (n, p), references (m, p), both unit norm."""
    return float((features.float() @ references.float().T).mean())


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


# ---------------------------------------------------------------------------------------
# A differentiable vision tower (the identity loss)


def load_clip_vision(spec: str | os.PathLike, *, device, dtype):
    """A frozen-able `CLIPVisionModelWithProjection` and its pixel mean/std.

    Args:
        spec: a folder (config.json + weights), "transformers:FOLDER", or "world" is not
            accepted here without a folder (pass `<model>/image_encoder`).
        device, dtype: where and in which precision it runs.

    Returns:
        (tower, mean, std): OpenAI's statistics unless the folder's preprocessor_config.json
        says otherwise.
    """
    from transformers import CLIPVisionModelWithProjection

    text = str(spec)
    kind, rest = split_spec(text)
    folder = Path(rest if kind == "transformers" and rest else text)
    if not (folder / "config.json").is_file():
        raise OnewordError(
            f"--clip-model {folder} is not a transformers CLIPVisionModelWithProjection "
            "folder (no config.json)"
        )
    try:
        tower = CLIPVisionModelWithProjection.from_pretrained(
            folder, local_files_only=True, torch_dtype=dtype
        ).to(device)
    except Exception as error:
        raise OnewordError(f"cannot load the CLIP tower {folder}: {error}") from None
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        config = json.loads(preprocessor.read_text())
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
    return tower, mean, std


__all__ = [
    "CLIP_SPECS",
    "ImageFeatures",
    "ImageTextScorer",
    "ImageTower",
    "has_world_clip",
    "load_clip_scorer",
    "load_clip_vision",
    "load_tower",
    "pairwise_similarity",
    "split_spec",
]
