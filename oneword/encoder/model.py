"""The concept encoder: a few images of a concept -> the embedding rows of a new word, in one pass.

Like E4T (Gal et al., 2023) and ELITE (Wei et al., 2023) it reads a frozen CLIP image tower
and predicts word embeddings for a frozen diffusion model; unlike them it is small and reads
a *set* of images. With the defaults and the world's tower (width 192, 4 layers, 65 tokens)
the head has 0.32 M parameters and, for a set of 4 images, costs 35 MFLOPs against the
tower's 939 MFLOPs (3.7%; 8% of the CPU time at one thread), measured by
`benchmarks/bench_encoder_data.py` and held below 1/10 by `tests/test_encoder.py`:

    1. per image: the pooled embedding (one token) and the penultimate patch tokens, each
       projected to `dim`; `queries` learned queries attend over them (attention pooling);
    2. over the set: K output queries attend over the pooled queries of all images (no
       positions, padded images masked), so the result does not depend on the images'
       order and any set size works (1 image or 5);
    3. per text encoder e: a linear map (zero at initialisation) gives a raw offset
       r_k (d_e) for each vector k, bounded radially:

           v_k = c_k + alpha * ||c_k|| * tanh(||r_k||) * r_k / ||r_k||

       where c_k is the class word's embedding (the classic initialiser). So ||v_k - c_k|| <=
       alpha ||c_k||: the prediction stays in the range of real word embeddings (a new
       word never gets the runaway norm that makes a token ignore the rest of the prompt),
       and an untrained encoder predicts exactly the class word, the usual baseline.
       alpha (`offset_scale`) = 1 lets v reach anywhere in a ball of radius ||c|| around c.

The file format: one safetensors file (the head's weights) whose metadata holds the
`EncoderConfig` as JSON, so `load_encoder` needs nothing else. The frozen tower is not in it
(the config names it); the diffusion model is not in it either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..errors import OnewordError

FORMAT = "oneword-encoder/1"


@dataclass
class EncoderConfig:
    """Everything that defines an encoder; stored in its file.

    The head sizes are the defaults for the miniature world (tower width 192, 65 tokens):
    the head then costs ~4% of the tower's forward.
    """

    tower: str = "world"  # image tower spec (see features.load_tower)
    pooled_dim: int = 128  # the tower's pooled embedding width p
    token_dim: int = 192  # the tower's token width w
    family: str = "sd1"  # the diffusion model family the rows are for
    widths: tuple[int, ...] = (96,)  # token-embedding width of each text encoder
    num_vectors: int = 1  # K vectors per word
    dim: int = 128  # head width
    queries: int = 4  # learned queries per image (attention pooling)
    heads: int = 4  # attention heads (dim must be divisible by it)
    mlp_ratio: int = 2  # hidden width of the feed-forward blocks, in units of dim
    # alpha: ||v - c|| <= alpha * ||c|| (see the module docstring).
    offset_scale: float = 1.0

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)

    def check(self) -> None:
        """Raise `OnewordError` for sizes that cannot work."""
        sizes = {"dim": self.dim, "queries": self.queries, "heads": self.heads}
        sizes |= {"num_vectors": self.num_vectors, "mlp_ratio": self.mlp_ratio}
        sizes |= {"pooled_dim": self.pooled_dim, "token_dim": self.token_dim}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise OnewordError(f"encoder {name} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise OnewordError(f"encoder dim {self.dim} is not divisible by heads {self.heads}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise OnewordError(f"encoder widths must be positive, got {self.widths}")
        if self.family not in ("sd1", "sd2", "sdxl", "sd3", "flux"):
            raise OnewordError(
                f"encoder family must be sd1, sd2, sdxl, sd3 or flux, got {self.family!r}"
            )
        if not (self.offset_scale > 0 and math.isfinite(self.offset_scale)):
            raise OnewordError(f"offset scale must be a positive number, got {self.offset_scale}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OnewordError(
                f"encoder config has unknown fields {unknown}; it was written by a newer oneword"
            )
        return cls(**data)


# ---------------------------------------------------------------------------------------
# Building blocks


class FeedForward(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class AttentionPool(nn.Module):
    """Queries attend over a set of tokens (multi-head, pre-norm keys), then a feed-forward.

    Without positional terms on the keys the result is invariant to the order of the tokens.
    """

    def __init__(self, dim: int, heads: int, ratio: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = FeedForward(dim, ratio)

    def forward(
        self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """queries (b, q, dim), tokens (b, t, dim), mask (b, t) bool (True = attend) -> (b, q, dim)."""
        q = rearrange(self.to_q(self.norm_q(queries)), "b q (h d) -> b h q d", h=self.heads)
        k, v = self.to_kv(self.norm_kv(tokens)).chunk(2, dim=-1)
        k = rearrange(k, "b t (h d) -> b h t d", h=self.heads)
        v = rearrange(v, "b t (h d) -> b h t d", h=self.heads)
        attn_mask = None if mask is None else rearrange(mask, "b t -> b 1 1 t")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (b, h, q, d)
        x = queries + self.proj(rearrange(out, "b h q d -> b q (h d)"))
        return self.ff(x)


def bounded_rows(raw: torch.Tensor, class_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """v = c + scale * ||c|| * tanh(||r||) * r / ||r||, row-wise (see the module docstring).

    Args:
        raw: (..., d) unbounded offsets r.
        class_rows: (..., d) the class word's rows c.
        scale: alpha.

    Returns:
        (..., d) rows v with ||v - c|| < alpha ||c||.
    """
    norm = raw.norm(dim=-1, keepdim=True)
    # tanh(n) / n -> 1 - n^2 / 3 near 0 (smooth, and exact at the zero initialisation).
    ratio = torch.where(norm > 1e-4, torch.tanh(norm) / norm.clamp_min(1e-4), 1 - norm**2 / 3)
    return class_rows + scale * class_rows.norm(dim=-1, keepdim=True) * ratio * raw


# ---------------------------------------------------------------------------------------
# The encoder


@dataclass
class EncoderOutput:
    """Predicted rows per text encoder, (b, K, d_e) fp32, and the class rows they started from."""

    rows: list[torch.Tensor]
    class_rows: list[torch.Tensor]

    def offset_ratio(self) -> torch.Tensor:
        """(b,) mean over encoders and vectors of ||v - c||^2 / ||c||^2 (the regulariser)."""
        terms = [
            ((v - c).pow(2).sum(-1) / c.pow(2).sum(-1).clamp_min(1e-12)).mean(-1)
            for v, c in zip(self.rows, self.class_rows)
        ]
        return torch.stack(terms).mean(0)


class ConceptEncoder(nn.Module):
    """Image features of a set of images -> K rows per text encoder (the head; the tower is apart)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        config.check()
        self.config = config
        dim = config.dim
        self.token_in = nn.Sequential(
            nn.LayerNorm(config.token_dim), nn.Linear(config.token_dim, dim)
        )
        self.pooled_in = nn.Sequential(
            nn.LayerNorm(config.pooled_dim), nn.Linear(config.pooled_dim, dim)
        )
        self.image_queries = nn.Parameter(torch.randn(config.queries, dim) * dim**-0.5)
        self.image_pool = AttentionPool(dim, config.heads, config.mlp_ratio)
        self.set_queries = nn.Parameter(torch.randn(config.num_vectors, dim) * dim**-0.5)
        self.set_pool = AttentionPool(dim, config.heads, config.mlp_ratio)
        self.norm_out = nn.LayerNorm(dim)
        self.outputs = nn.ModuleList(nn.Linear(dim, width) for width in config.widths)
        for layer in self.outputs:  # start at the class word (see the module docstring)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        pooled: torch.Tensor,
        tokens: torch.Tensor,
        class_rows: Sequence[torch.Tensor],
        set_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Predict the rows of one word per set of images.

        Args:
            pooled: (b, n, p) pooled features of n images per concept.
            tokens: (b, n, t, w) penultimate tokens of the same images.
            class_rows: per text encoder (b, K, d_e) the class word's rows c.
            set_mask: (b, n) bool, False for padding images (sets of different sizes).

        Returns:
            `EncoderOutput` with rows per text encoder (b, K, d_e) fp32.
        """
        b, n = pooled.shape[:2]
        if len(class_rows) != len(self.outputs):
            raise OnewordError(
                f"the encoder predicts rows for {len(self.outputs)} text encoder(s), "
                f"got class rows for {len(class_rows)}"
            )
        # 1. Per image: the pooled embedding as one more token, then attention pooling.
        image_tokens = torch.cat(
            [
                rearrange(self.pooled_in(pooled), "b n d -> (b n) 1 d"),
                rearrange(self.token_in(tokens), "b n t d -> (b n) t d"),
            ],
            dim=1,
        )  # (b n, 1 + t, dim)
        queries = repeat(self.image_queries, "q d -> bn q d", bn=b * n)
        per_image = self.image_pool(queries, image_tokens)  # (b n, q, dim)
        # 2. Over the set: K queries attend over every image's pooled queries.
        set_tokens = rearrange(per_image, "(b n) q d -> b (n q) d", b=b)
        mask = None
        if set_mask is not None:
            mask = repeat(set_mask.bool(), "b n -> b (n q)", q=self.config.queries)
        out = self.set_pool(repeat(self.set_queries, "k d -> b k d", b=b), set_tokens, mask)
        out = self.norm_out(out)  # (b, K, dim)
        # 3. Per text encoder: a bounded offset from the class word.
        rows = [
            bounded_rows(layer(out).float(), c.float(), self.config.offset_scale)
            for layer, c in zip(self.outputs, class_rows)
        ]  # per encoder (b, K, d_e)
        return EncoderOutput(rows, [c.float() for c in class_rows])


# ---------------------------------------------------------------------------------------
# Files


def save_encoder(
    path: str | os.PathLike, encoder: ConceptEncoder, *, metadata: dict | None = None
) -> Path:
    """Write the head's weights and its config (JSON in the metadata) to one safetensors file.

    Args:
        path: the output file, e.g. out/encoder.safetensors (written atomically).
        encoder: the `ConceptEncoder` (unwrapped from DDP).
        metadata: more string facts (training step, base model, ...).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    from ..io import atomic_path

    encoder = getattr(encoder, "module", encoder)  # a DDP wrapper holds the encoder in .module
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    info = {str(k): str(v) for k, v in (metadata or {}).items()}
    info |= {"format": FORMAT, "config": encoder.config.to_json()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info)
    return Path(path)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> ConceptEncoder:
    """Read an encoder written by `save_encoder`; the file alone is enough.

    Returns:
        The `ConceptEncoder` in eval mode on `device`, with `.metadata` (the file's metadata)
        and `.source` (the path).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise OnewordError(f"encoder file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise OnewordError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error})"
        ) from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise OnewordError(
            f"{path} is not a oneword encoder file (metadata format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); embedding files load with oneword.embeddings.load_embedding"
        )
    try:
        config = EncoderConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as error:
        raise OnewordError(f"{path}: unreadable encoder config ({error})") from None
    encoder = ConceptEncoder(config)
    expected = encoder.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise OnewordError(
                f"encoder file {path} is broken: tensor {name!r} has shape "
                f"{tuple(tensor.shape)} but its own config asks for {tuple(expected[name].shape)}; "
                "the file was edited or mixed from two encoders: train or download it again"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise OnewordError(
                f"encoder file {path} is broken: tensor {name!r} holds {bad} NaN/inf value(s) "
                "(a diverged training run or a damaged copy); train or download it again"
            )
    missing, unexpected = encoder.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise OnewordError(
            f"{path}: weights do not match its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    encoder.metadata = metadata
    encoder.source = str(path)
    return encoder.to(device).eval()


# ---------------------------------------------------------------------------------------
# Using an encoder with a model


def check_compatible(config: EncoderConfig, model) -> None:
    """Raise `OnewordError` unless the encoder's family and widths are the model's."""
    widths = tuple(model.widths)
    if config.family != model.family or tuple(config.widths) != widths:
        raise OnewordError(
            f"this encoder predicts rows for a {config.family} model with text-encoder widths "
            f"{list(config.widths)}, but {model.source} is {model.family} with widths "
            f"{list(widths)}; train an encoder for this model (train_encoder.py --model ...)"
        )


def class_word_rows(model, class_word: str, num_vectors: int) -> list[torch.Tensor]:
    """Per text encoder, the class word's (K, d) fp32 rows: the classic initialiser."""
    from ..tokens import initial_rows

    return [
        initial_rows(tokenizer, text_encoder, class_word, num_vectors)
        for tokenizer, text_encoder in zip(model.tokenizers, model.text_encoders)
    ]


class _TextEncoderWithRows(nn.Module):
    """Runs a text encoder with its placeholder rows replaced by a given (differentiable) tensor."""

    def __init__(self, text_encoder: nn.Module, parameter_name: str, rows: torch.Tensor):
        super().__init__()
        self.text_encoder = text_encoder
        self.parameter_name = parameter_name
        self.rows = rows

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(
            self.text_encoder, {self.parameter_name: self.rows}, args, kwargs, strict=False
        )


def with_placeholder_rows(model, placeholders, rows: Sequence[torch.Tensor]):
    """A view of `model` whose text encoders read the placeholders' rows from `rows`.

    `tokens.set_rows` copies values under `no_grad`, which cuts the graph; a predicted row is
    a non-leaf tensor that must stay in it. This view runs each text encoder through
    `torch.func.functional_call` with the `PlaceholderEmbedding` rows swapped for a tensor
    built from `rows`, so the text features are differentiable with respect to them. The
    model itself is not modified (other placeholders keep their stored rows).

    Args:
        model: a `LoadedModel` with the placeholders added.
        placeholders: P `Placeholder`s of K vectors each.
        rows: per text encoder, (P, K, d_e) rows (any autograd history).

    Returns:
        A shallow copy of `model` to pass to `encode_prompts`.
    """
    from ..tokens import placeholder_embedding

    encoders = []
    for index, (text_encoder, values) in enumerate(zip(model.text_encoders, rows)):
        table = placeholder_embedding(text_encoder)
        name = next(n for n, p in text_encoder.named_parameters() if p is table.rows)
        offsets = torch.tensor(
            [i - table.base_vocab for p in placeholders for i in p.ids[index]],
            device=table.rows.device,
        )  # (P K,)
        flat = rearrange(values, "p k d -> (p k) d").to(table.rows.device, torch.float32)
        full = table.rows.detach().index_put((offsets,), flat)  # (n_new, d), differentiable in flat
        encoders.append(_TextEncoderWithRows(text_encoder, name, full))
    return dataclasses.replace(model, text_encoders=encoders)


@torch.no_grad()
def encode_concept(
    encoder: ConceptEncoder,
    model,
    images,
    token: str,
    class_word: str,
    *,
    tower=None,
):
    """Predict a word for a concept from a few images, in one forward pass.

    Args:
        encoder: a `ConceptEncoder` (e.g. from `load_encoder`).
        model: the `LoadedModel` the encoder was trained for (family and widths are checked).
        images: PIL images or paths (files, folders, globs); 1 or more.
        token: the new word, e.g. "<my-cup>".
        class_word: the concept's class word ("cup"; "object" if none fits).
        tower: the loaded `ImageTower` (loaded from the encoder's config when None; pass it
            to encode many concepts without reloading).

    Returns:
        A `TokenEmbedding` with per text encoder (K, d) fp32 rows, ready for
        `add_placeholder(init_rows=...)` or `save_embedding`.
    """
    from ..embeddings import TokenEmbedding
    from ..images import fit_images, images_to_tensor
    from .features import load_tower

    config = encoder.config
    check_compatible(config, model)
    if tower is None:
        tower = load_tower(
            config.tower, model_folder=model.extra.get("folder"), device=model.device
        )
    if (tower.pooled_dim, tower.token_dim) != (config.pooled_dim, config.token_dim):
        raise OnewordError(
            f"image tower {tower.spec!r} gives features of width {tower.pooled_dim}/"
            f"{tower.token_dim}, but the encoder was trained on {config.tower!r} with "
            f"{config.pooled_dim}/{config.token_dim}"
        )
    pixels = images_to_tensor(fit_images(images, model.resolution))  # (n, 3, H, W)
    features = tower(pixels.to(tower.mean.device))
    device = next(encoder.parameters()).device
    class_rows = [
        r.unsqueeze(0).to(device) for r in class_word_rows(model, class_word, config.num_vectors)
    ]
    output = encoder(
        features.pooled.unsqueeze(0).to(device), features.tokens.unsqueeze(0).to(device), class_rows
    )
    vectors = [rows[0].detach().cpu().contiguous() for rows in output.rows]  # per encoder (K, d)
    metadata = {
        "base_model": str(model.source),
        "model_family": model.family,
        "method": "encoder",
        "steps": "0",
        "init_text": class_word,
        "class_word": class_word,
        "encoder_tower": config.tower,
        "num_images": str(pixels.shape[0]),
    }
    if getattr(encoder, "source", None):
        metadata["encoder"] = encoder.source
    keys = tuple(getattr(model, "encoder_keys", ()))
    return TokenEmbedding(token, vectors, metadata, keys=keys if len(keys) > 1 else None)


__all__ = [
    "ConceptEncoder",
    "EncoderConfig",
    "EncoderOutput",
    "bounded_rows",
    "check_compatible",
    "class_word_rows",
    "encode_concept",
    "load_encoder",
    "save_encoder",
    "with_placeholder_rows",
]
