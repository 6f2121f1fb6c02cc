"""Load a Stable Diffusion-family model (SD 1.x, SD 2.x, SDXL) for token learning and sampling.

One entry point, `load_model`, takes a local diffusers folder or a hub id and returns the
parts that textual inversion needs: tokenizer(s), text encoder(s), UNet, VAE, the training
noise scheduler, and the facts that change the objective (family, resolution, latent
scaling factor, prediction type). Frozen parts are placed in bf16/fp16 on a GPU and fp32 on
the CPU; the learned rows always stay fp32 (fp16 embeddings are the classic NaN source).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelLoadError

DEFAULT_MODEL = "checkpoints/world"


@dataclass
class LoadedModel:
    """A frozen diffusion model and its text side.

    Attributes:
        family: "sd1", "sd2" or "sdxl".
        source: the folder or hub id it came from.
        tokenizers / text_encoders: one each (SD 1.x/2.x) or two (SDXL: CLIP-L, then OpenCLIP-bigG).
        resolution: native image side in pixels.
        scaling_factor: VAE latent scale (0.18215 for SD 1.x/2.x).
        prediction_type: "epsilon" or "v_prediction" (the noise scheduler's target).
        dtype: dtype of the frozen parts.
    """

    family: str
    source: str
    tokenizers: list
    text_encoders: list
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object
    resolution: int
    scaling_factor: float
    prediction_type: str
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        """Token-embedding width of each text encoder, e.g. [768] or [768, 1280]."""
        return [te.get_input_embeddings().embedding_dim for te in self.text_encoders]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizers[0])

    def describe(self) -> dict:
        """Plain facts for `oneword info` and log files."""
        return {
            "source": self.source,
            "family": self.family,
            "widths": self.widths,
            "resolution": self.resolution,
            "latent_size": self.resolution // self.vae_scale,
            "prediction_type": self.prediction_type,
            "scaling_factor": self.scaling_factor,
            "vocab_size": self.vocab_size,
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def frozen_dtype(device: torch.device, precision: str | None = None) -> torch.dtype:
    """bf16 on a GPU unless asked otherwise ("fp16", "fp32"); always fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    return {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": torch.float32,
        None: torch.bfloat16,
    }[precision]


def detect_family(index: dict, text_config: dict) -> str:
    """SDXL if a second text encoder exists; SD 2.x if its text tower is OpenCLIP's
    (width 1024 or gelu activation); otherwise SD 1.x."""
    if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None:
        return "sdxl"
    if text_config.get("hidden_size") == 1024 or text_config.get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


def _resolve(source: str, local_files_only: bool) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers model folder: it has no model_index.json "
                "(expected tokenizer/, text_encoder/, unet/, vae/, scheduler/ beside it)"
            )
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model {source!r} not found: pass a local diffusers folder or a hub id like 'org/name'"
        )
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
    )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                source,
                local_files_only=offline,
                allow_patterns=["*.json", "*.txt", "*.safetensors", "tokenizer*/*"],
                ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt", "*.bin"],
            )
        )
    except Exception as exc:  # network, auth and offline errors all mean the same to a user
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face hub ({type(exc).__name__}); "
            "without network access, download it elsewhere and pass the local diffusers folder"
        ) from None


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    precision: str | None = None,
    local_files_only: bool = False,
) -> LoadedModel:
    """Load the parts of a Stable Diffusion-family pipeline that token learning needs.

    Args:
        source: a local diffusers folder or a hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5").
        device: "cpu", "cuda", ...; default: CUDA if available.
        precision: frozen parts' precision on a GPU: "bf16" (default), "fp16" or "fp32".
        local_files_only: never touch the network (also set by HF_HUB_OFFLINE=1).

    Returns:
        A `LoadedModel` with every part frozen (`requires_grad_(False)`, eval mode).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = _resolve(str(source), local_files_only)
    device = torch.device(device) if device is not None else default_device()
    dtype = frozen_dtype(device, precision)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{folder}: unreadable model_index.json or text_encoder/config.json ({exc})"
        ) from None
    family = detect_family(index, text_config)

    def part(loader, sub: str, **kwargs):
        if not (folder / sub).is_dir():
            raise ModelLoadError(f"{folder} has no {sub}/ folder, which a {family} model needs")
        try:
            return loader.from_pretrained(folder, subfolder=sub, local_files_only=True, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"{folder / sub}: cannot load ({type(exc).__name__}: {exc})"
            ) from None

    tokenizers = [part(CLIPTokenizer, "tokenizer", model_max_length=77)]
    text_encoders = [part(CLIPTextModel, "text_encoder", torch_dtype=dtype)]
    if family == "sdxl":
        tokenizers.append(part(CLIPTokenizer, "tokenizer_2", model_max_length=77))
        text_encoders.append(part(CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=dtype))
    unet = part(UNet2DConditionModel, "unet", torch_dtype=dtype)
    vae = part(AutoencoderKL, "vae", torch_dtype=dtype)
    noise_scheduler = part(DDPMScheduler, "scheduler")

    for module in [*text_encoders, unet, vae]:
        module.requires_grad_(False).eval().to(device)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return LoadedModel(
        family=family,
        source=str(source),
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        unet=unet,
        vae=vae,
        noise_scheduler=noise_scheduler,
        resolution=int(unet.config.sample_size) * vae_scale,
        scaling_factor=float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215),
        prediction_type=noise_scheduler.config.prediction_type,
        device=device,
        dtype=dtype,
        extra={"folder": str(folder), "index": index},
    )
