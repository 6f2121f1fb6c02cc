"""Load a Stable Diffusion-family model for token learning and sampling: SD 1.x, SD 2.x and
SDXL (UNet, DDPM noise) and SD 3.x and FLUX.1 (transformer, rectified flow, T5).

One entry point, `load_model`, takes a local diffusers folder or a hub id and returns the
parts that textual inversion needs: tokenizer(s), text encoder(s), the denoiser (UNet or
transformer), VAE, the training noise scheduler, and the facts that change the objective
(family, resolution, latent scaling and shift, prediction type). Frozen parts are placed in bf16/fp16 on a GPU and fp32 on
the CPU; the learned rows always stay fp32 (fp16 embeddings are the classic NaN source).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelLoadError, reason

DEFAULT_MODEL = "checkpoints/world"
FLOW_FAMILIES = ("sd3", "flux")
# The file keys of each text encoder, in the model's order (OneTrainer's and diffusers' names).
ENCODER_KEYS = {
    "sd1": ("clip_l",),
    "sd2": ("clip_h",),
    "sdxl": ("clip_l", "clip_g"),
    "sd3": ("clip_l", "clip_g", "t5"),
    "flux": ("clip_l", "t5"),
}
# The transformer class of each flow-matching family (model_index.json's "transformer").
TRANSFORMER_FAMILY = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# T5 context the pipelines encode prompts with (their `max_sequence_length` default).
T5_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


@dataclass
class LoadedModel:
    """A frozen diffusion model and its text side.

    Attributes:
        family: "sd1", "sd2", "sdxl", "sd3" or "flux".
        source: the folder or hub id it came from.
        tokenizers / text_encoders: one each (SD 1.x/2.x), two (SDXL: CLIP-L, then
            OpenCLIP-bigG; FLUX: CLIP-L, then T5) or three (SD3: CLIP-L, OpenCLIP-bigG, T5).
        unet: the denoiser: a `UNet2DConditionModel`, or the SD3/FLUX transformer.
        resolution: native image side in pixels.
        scaling_factor: VAE latent scale (0.18215 for SD 1.x/2.x).
        prediction_type: "epsilon", "v_prediction" or "flow_matching" (SD3, FLUX: the
            velocity noise - x0 of rectified flow).
        dtype: dtype of the frozen parts.
        shift_factor: VAE latent shift, latents = (z - shift) * scale (SD3, FLUX; else 0).
        max_sequence_length: T5 tokens per prompt (SD3 256, FLUX 512); None without T5.
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
    shift_factor: float = 0.0
    max_sequence_length: int | None = None

    @property
    def is_flow(self) -> bool:
        """True for the rectified-flow transformers (SD3, FLUX)."""
        return self.family in FLOW_FAMILIES

    @property
    def encoder_keys(self) -> tuple[str, ...]:
        """File key of each text encoder ("clip_l", "clip_g", "t5"; SD 1.x/2.x: one)."""
        return ENCODER_KEYS[self.family]

    @property
    def widths(self) -> list[int]:
        """Token-embedding width of each text encoder, e.g. [768] or [768, 1280]."""
        return [te.get_input_embeddings().embedding_dim for te in self.text_encoders]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizers[0])

    def describe(self) -> dict:
        """Plain facts for `oneword info` and log files."""
        encoders = []
        for key, tokenizer, text_encoder, width in zip(
            self.encoder_keys, self.tokenizers, self.text_encoders, self.widths
        ):
            length = self.max_sequence_length if key == "t5" else tokenizer.model_max_length
            encoders.append(f"{key}: {type(text_encoder).__name__}, width {width}, {length} tokens")
        facts = {
            "source": self.source,
            "family": self.family,
            "widths": self.widths,
            "text_encoders": encoders,
            "denoiser": type(self.unet).__name__,
            "resolution": self.resolution,
            "latent_size": self.resolution // self.vae_scale,
            "latent_channels": int(self.vae.config.latent_channels),
            "prediction_type": self.prediction_type,
            "scaling_factor": self.scaling_factor,
            "vocab_size": self.vocab_size,
        }
        parameters = sum(p.numel() for p in self.unet.parameters())
        if self.is_flow:
            config = self.noise_scheduler.config
            facts["shift_factor"] = self.shift_factor
            facts["timestep_shift"] = (
                f"dynamic (mu {config.base_shift}..{config.max_shift} over "
                f"{config.base_image_seq_len}..{config.max_image_seq_len} latent tokens)"
                if config.use_dynamic_shifting
                else f"{config.shift}"
            )
            facts["guidance_embeds"] = bool(getattr(self.unet.config, "guidance_embeds", False))
            facts["transformer_parameters"] = parameters
        else:
            facts["unet_parameters"] = parameters
        facts["device"] = str(self.device)
        facts["dtype"] = str(self.dtype).replace("torch.", "")
        return facts

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
    """SD3 or FLUX from the transformer's class; SDXL if a second text encoder exists; SD 2.x
    if its text tower is OpenCLIP's (width 1024 or gelu activation); otherwise SD 1.x."""
    transformer = index.get("transformer")
    if isinstance(transformer, list) and len(transformer) == 2 and transformer[1] is not None:
        if transformer[1] not in TRANSFORMER_FAMILY:
            raise ModelLoadError(
                f"unsupported denoiser {transformer[1]!r} in model_index.json; oneword knows "
                f"UNet2DConditionModel and {', '.join(TRANSFORMER_FAMILY)}"
            )
        return TRANSFORMER_FAMILY[transformer[1]]
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
                allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*/*"],
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
            with warnings.catch_warnings():
                # torch warns about a pickle protocol before it refuses the pickle; the
                # error below says what is wrong with the file.
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return loader.from_pretrained(
                    folder, subfolder=sub, local_files_only=True, **kwargs
                )
        except Exception as exc:
            raise ModelLoadError(f"{folder / sub}: cannot load ({reason(exc)})") from None

    if family in FLOW_FAMILIES:
        return _load_flow_model(folder, str(source), family, index, part, device, dtype)
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


def _load_flow_model(folder: Path, source: str, family: str, index: dict, part, device, dtype):
    """SD3 (CLIP-L, OpenCLIP-bigG, T5, MMDiT) or FLUX.1 (CLIP-L pooled, T5, guidance)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    t5_index = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    if not (isinstance(index.get(t5_index), list) and index[t5_index][0] is not None):
        raise ModelLoadError(
            f"{folder}: this {family} folder has no T5 text encoder ({t5_index} is empty in "
            "model_index.json); oneword needs every text encoder of the model"
        )
    if family == "sd3":
        from diffusers import SD3Transformer2DModel as Transformer

        tokenizers = [
            part(CLIPTokenizer, "tokenizer", model_max_length=77),
            part(CLIPTokenizer, "tokenizer_2", model_max_length=77),
            part(T5TokenizerFast, "tokenizer_3"),
        ]
        text_encoders = [
            part(CLIPTextModelWithProjection, "text_encoder", torch_dtype=dtype),
            part(CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=dtype),
            part(T5EncoderModel, "text_encoder_3", torch_dtype=dtype),
        ]
    else:
        from diffusers import FluxTransformer2DModel as Transformer

        tokenizers = [
            part(CLIPTokenizer, "tokenizer", model_max_length=77),
            part(T5TokenizerFast, "tokenizer_2"),
        ]
        text_encoders = [
            part(CLIPTextModel, "text_encoder", torch_dtype=dtype),
            part(T5EncoderModel, "text_encoder_2", torch_dtype=dtype),
        ]
    transformer = part(Transformer, "transformer", torch_dtype=dtype)
    vae = part(AutoencoderKL, "vae", torch_dtype=dtype)
    noise_scheduler = part(FlowMatchEulerDiscreteScheduler, "scheduler")
    for module in [*text_encoders, transformer, vae]:
        module.requires_grad_(False).eval().to(device)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    # SD3's transformer config states its latent side; FluxPipeline assumes 128 (1024 px),
    # which the tiny FLUX model overrides with a private model_index.json key.
    sample_size = int(
        getattr(transformer.config, "sample_size", None) or index.get("_oneword_sample_size") or 128
    )
    max_length = min(T5_SEQUENCE_LENGTH[family], tokenizers[-1].model_max_length)
    return LoadedModel(
        family=family,
        source=source,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        unet=transformer,
        vae=vae,
        noise_scheduler=noise_scheduler,
        resolution=sample_size * vae_scale,
        scaling_factor=float(vae.config.scaling_factor),
        prediction_type="flow_matching",
        device=device,
        dtype=dtype,
        extra={"folder": str(folder), "index": index},
        shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
        max_sequence_length=max_length,
    )
