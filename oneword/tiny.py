"""Tiny random Stable Diffusion-family pipelines, built offline and saved as diffusers folders.

They have the real architectures (CLIP text encoders with the real 49,408-token tokenizer,
`UNet2DConditionModel`, `AutoencoderKL`; for SD3 and FLUX.1 also `T5EncoderModel` with a
SentencePiece tokenizer trained on the fly, `SD3Transformer2DModel` /
`FluxTransformer2DModel` and a 16-channel VAE) at toy widths, so every code path that serves
SD 1.x / 2.x / XL / 3.x and FLUX.1 can be tested in seconds on a CPU. Sizes follow
diffusers' own dummy components. Weights are random: these models say nothing about quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer, write_t5_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
FLOW_FAMILIES = ("sd3", "flux")
# The tiny T5 tokenizer has 1,000 pieces and its embedding 1,024 rows: like T5-XXL (32,100
# pieces, 32,128 rows), the matrix is padded past the vocabulary, so new tokens get ids
# from len(tokenizer), not from the number of rows.
T5_PIECES, T5_ROWS = 1000, 1024


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


def _vae(seed: int, latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    )


def _t5_encoder(width: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 (SD3 and FLUX use T5-XXL v1.1): gated GELU, relative-position attention.
    return T5EncoderModel(
        T5Config(
            vocab_size=T5_ROWS,
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _build_flow_pipeline(family: str, seed: int):
    """SD3 (CLIP-L 32 + CLIP-G 48 + T5 96, MMDiT) or FLUX.1 (CLIP-L 32 + T5 64, guidance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        text_encoder = CLIPTextModelWithProjection(_text_config(32, act="quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(48, act="gelu"))
        text_encoder_3 = _t5_encoder(96)
        transformer = SD3Transformer2DModel(
            sample_size=16,  # latent side: 32 px images with the 2x VAE
            patch_size=2,
            in_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            # T5's width; the CLIP features (32 + 48) are zero-padded to it, as in SD3.
            joint_attention_dim=96,
            caption_projection_dim=32,
            pooled_projection_dim=32 + 48,
            out_channels=16,
            pos_embed_max_size=16,
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler config
            # SD3's VAE: 16 channels, latents (z - 0.0609) * 1.5305.
            vae=_vae(seed, 16, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=text_encoder,
            tokenizer=None,
            text_encoder_2=text_encoder_2,
            tokenizer_2=None,
            text_encoder_3=text_encoder_3,
            tokenizer_3=None,
        )
        return pipe, {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}, "tokenizer_3"
    from diffusers import FluxPipeline, FluxTransformer2DModel

    text_encoder = CLIPTextModel(_text_config(32, act="quick_gelu"))
    text_encoder_2 = _t5_encoder(64)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,  # as FLUX.1-dev (schnell has none)
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        transformer=transformer,
        # FLUX.1-dev's scheduler config: resolution-dependent shift (mu) between 0.5 and 1.15.
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae(seed, 16, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE
        text_encoder=text_encoder,
        tokenizer=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=None,
    )
    return pipe, {"tokenizer": "<|endoftext|>"}, "tokenizer_2"


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
    """Build a tiny random pipeline of `family` (one of `FAMILIES`) and save it.

    Args:
        folder: output diffusers folder (model_index.json, tokenizer/, text_encoder/, ...).
        family: "sd1" (one encoder, width 32, epsilon), "sd2" (one encoder, width 40, gelu,
            v-prediction) or "sdxl" (two encoders, widths 32 and 48, pooled embeddings and
            add_time_ids), "sd3" (CLIP widths 32 and 48, T5 width 96, MMDiT, flow matching)
            or "flux" (CLIP width 32 pooled, T5 width 64, guidance embedding, flow matching).
            SD3 and FLUX images are 32 px (16 x 16 latents with 16 channels).
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

    t5_dir = None
    if family in FLOW_FAMILIES:
        pipe, tokenizer_dirs, t5_dir = _build_flow_pipeline(family, seed)
    elif family == "sdxl":
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
    if t5_dir is not None:
        write_t5_tokenizer(folder / t5_dir, vocab_size=T5_PIECES)
        index[t5_dir] = ["transformers", "T5TokenizerFast"]
    if family == "flux":
        # FluxPipeline samples 128 latents a side unless told; oneword reads the native
        # side from this private key (diffusers ignores keys starting with "_"; real FLUX.1
        # folders have none, and 128 is right for them).
        index["_oneword_sample_size"] = 16
    index_path.write_text(json.dumps(index, indent=2))
    return folder
