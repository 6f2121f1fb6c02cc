"""Tiny random Stable Diffusion-family pipelines, built offline and saved as diffusers folders.

They have the real architectures (CLIP text encoders with the real 49,408-token tokenizer,
`UNet2DConditionModel`, `AutoencoderKL`) at toy widths, so every code path that serves
SD 1.x / 2.x / XL can be tested in seconds on a CPU. Sizes follow diffusers' own dummy
components. Weights are random: these models say nothing about quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")


def _text_config(hidden: int, *, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _scheduler_config(prediction_type: str) -> dict:
    # SD's training schedule (Rombach et al.): scaled-linear betas 0.00085 -> 0.012.
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
    }


def build_tiny_pipeline(folder: str | Path, family: str = "sd1", *, seed: int = 0) -> Path:
    """Build a tiny random pipeline of `family` ("sd1", "sd2" or "sdxl") and save it.

    Args:
        folder: output diffusers folder (model_index.json, tokenizer/, text_encoder/, ...).
        family: "sd1" (one encoder, width 32, epsilon), "sd2" (one encoder, width 40, gelu,
            v-prediction) or "sdxl" (two encoders, widths 32 and 48, pooled embeddings and
            add_time_ids).
        seed: torch seed for the random weights.

    Returns:
        The folder, loadable with `oneword.models.load_model` or diffusers' `from_pretrained`.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        text_encoder = CLIPTextModel(_text_config(32, act="quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(48, act="gelu", projection_dim=48)
        )
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            # 6 add_time_ids of 8 dims each, plus text_encoder_2's pooled projection.
            projection_class_embeddings_input_dim=6 * 8 + 48,
            cross_attention_dim=32 + 48,
            norm_num_groups=8,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=DDIMScheduler(**_scheduler_config("epsilon")),
        )
        tokenizer_dirs = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    else:
        from diffusers import StableDiffusionPipeline

        width, act, prediction = (
            (32, "quick_gelu", "epsilon") if family == "sd1" else (40, "gelu", "v_prediction")
        )
        text_encoder = CLIPTextModel(_text_config(width, act=act))
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=width,
            attention_head_dim=4,
            norm_num_groups=8,
            use_linear_projection=family == "sd2",
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(seed),
            text_encoder=text_encoder,
            tokenizer=None,
            unet=unet,
            scheduler=DDIMScheduler(**_scheduler_config(prediction)),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        tokenizer_dirs = {"tokenizer": "<|endoftext|>" if family == "sd1" else "!"}

    pipe.save_pretrained(folder, safe_serialization=True)
    for name, pad in tokenizer_dirs.items():
        write_clip_tokenizer(folder / name, pad_token=pad)
    # The pipeline was built without tokenizer objects; point model_index.json at the folders.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in tokenizer_dirs:
        index[name] = ["transformers", "CLIPTokenizer"]
    index_path.write_text(json.dumps(index, indent=2))
    return folder
