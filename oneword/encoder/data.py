"""Concept sets for pretraining the encoder: N reference views and M target views per concept.

The encoder sees the N references; the denoising loss is computed on the M targets, which
are *other* images of the same identity (other backgrounds, sizes, positions), so the
encoder is rewarded for the identity and not for copying one image's layout.

Three sources, one batch format (each source yields whole batches, `DataLoader(source,
batch_size=None)`):

- `WorldConceptSets`: the miniature world rendered in memory; identities from
  `training_identities()`, never a validation or test one (`VALIDATION`, `HELD_OUT`).
- `ShardConceptSets`: WebDataset shards (our world shards, or any img2dataset output with
  jpg/png + txt), read with `oneword.datasets.shards.read_shards` (images, txt and json
  only: no member is ever unpickled; corrupt samples are skipped, counted, and the run stops
  above a maximum error rate). Samples whose JSON has an `identity` are grouped by it; other
  images are each their own concept, seen through augmented views.
- `FolderConceptSets`: one subfolder of images per identity (a concept suite works too:
  `concept.json`'s `class_word` is used).

A batch is a dict:
    "references": uint8 (B, N, 3, H, W), "targets": uint8 (B, M, 3, H, W),
    "names": [B] identity names, "class_words": [B],
    "reference_keys" / "target_keys": [B][N] / [B][M] image keys (None for rendered images),
    "augmented": [B] whether the views were augmented (such features must not be cached),
    "batch_index": int, "stats": dict of counters (shards: errors, seen, skipped).

Resuming: batch i of the world and folder sources depends only on (seed, rank, i), so
`load_state_dict({"next_batch": i})` continues the stream exactly. A shard stream cannot be
replayed cheaply; on resume it is re-seeded from (seed, rank, next_batch), so it continues
with fresh draws instead of repeating the samples it already gave.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from ..datasets import world
from ..errors import OnewordError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The world's validation and test identities: the encoder never trains on them (its data
# stream, folder and shard sources, and its distillation or regression targets).
NEVER_TRAIN_NAMES = frozenset(identity.name for identity in world.HELD_OUT + world.VALIDATION)


def mix_seed(*parts) -> int:
    """A 63-bit seed from any parts (rank, batch index, ...), stable across processes."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def augment_views(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`oneword.images.augment` on uint8 (n, 3, H, W) images; returns uint8 (n, 3, H, W)."""
    from ..images import augment

    return (augment(pixels.float() / 255, generator) * 255).round().to(torch.uint8)


def _to_uint8(image, resolution: int) -> torch.Tensor:
    """PIL image -> uint8 (3, resolution, resolution), centre-cropped and resized."""
    from ..images import fit_image

    array = np.asarray(fit_image(image, resolution), dtype=np.uint8)  # (H, W, 3)
    return rearrange(torch.from_numpy(array.copy()), "h w c -> c h w")


def world_class_word(meta: dict | None, default: str) -> str:
    """The class word of a sample's JSON: "class_word", else the world shape's word, else default."""
    if not meta:
        return default
    if isinstance(meta.get("class_word"), str) and meta["class_word"].strip():
        return meta["class_word"].strip()
    shape = meta.get("shape")
    if shape in world.SHAPES:
        return shape if shape not in world.UNNAMED else "object"
    return default


class ConceptSets(torch.utils.data.IterableDataset):
    """Shared parts: sizes, seeding, worker split of batch indices, resumable state."""

    def __init__(
        self,
        *,
        batch_size: int,
        references: int,
        targets: int,
        resolution: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = False,
    ):
        super().__init__()
        for name, value in (("batch", batch_size), ("references", references)):
            if value < 1:
                raise OnewordError(f"--{name} must be >= 1, got {value}")
        if targets < 1:
            raise OnewordError(f"--targets must be >= 1, got {targets}")
        self.batch_size = batch_size
        self.references = references
        self.targets = targets
        self.resolution = resolution
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.augment = augment
        self.next_batch = 0

    @property
    def views(self) -> int:
        return self.references + self.targets

    def batch(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.next_batch + worker
        while True:
            yield self.batch(index)
            index += workers

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("next_batch", -1)) < 0:
            raise OnewordError(f"data state needs a non-negative 'next_batch', got {state}")
        self.next_batch = int(state["next_batch"])

    def _assemble(self, examples: list[dict], index: int, stats: dict | None = None) -> dict:
        """Stack B examples {name, class_word, views uint8 (N+M, 3, H, W), keys} into a batch."""
        views = torch.stack([e["views"] for e in examples])  # (B, N+M, 3, H, W)
        keys = [e.get("keys") or [None] * self.views for e in examples]
        return {
            "references": views[:, : self.references].contiguous(),
            "targets": views[:, self.references :].contiguous(),
            "names": [e["name"] for e in examples],
            "class_words": [e["class_word"] for e in examples],
            "augmented": [bool(e.get("augmented", self.augment)) for e in examples],
            "reference_keys": [k[: self.references] for k in keys],
            "target_keys": [k[self.references :] for k in keys],
            "batch_index": index,
            "stats": dict(stats or {}),
        }


# ---------------------------------------------------------------------------------------
# The miniature world, rendered in memory


class WorldConceptSets(ConceptSets):
    """Identities of the miniature world (never validation or test ones), rendered on the fly.

    Each example draws N + M varied scenes of one identity (`concept_scenes`: backgrounds,
    sizes and positions cycled) and splits them at random into references and targets.
    """

    def __init__(self, *, identities: Sequence[world.Identity] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.identities = (
            list(identities) if identities is not None else world.training_identities()
        )
        leaked = sorted(i.name for i in self.identities if i.name in NEVER_TRAIN_NAMES)
        if leaked:
            raise OnewordError(
                f"identities {leaked} belong to the validation or test split; the encoder must "
                "never train on them"
            )
        if not self.identities:
            raise OnewordError("no identities to train on")

    def batch(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(mix_seed("world", self.seed, self.rank, index))
        picks = torch.randint(len(self.identities), (self.batch_size,), generator=generator)
        scenes = []
        for pick in picks.tolist():
            drawn = world.concept_scenes(self.identities[pick], self.views, generator)
            order = torch.randperm(self.views, generator=generator).tolist()
            scenes += [drawn[i] for i in order]
        pixels = world.render(scenes, self.resolution)  # (B (N+M), 3, H, W)
        if self.augment:
            pixels = augment_views(pixels, generator)
        pixels = rearrange(pixels, "(b v) c h w -> b v c h w", b=self.batch_size)
        examples = [
            {
                "name": self.identities[pick].name,
                "class_word": self.identities[pick].class_word(),
                "views": pixels[i],
            }
            for i, pick in enumerate(picks.tolist())
        ]
        return self._assemble(examples, index)


# ---------------------------------------------------------------------------------------
# Image folders, one subfolder per identity


@lru_cache(maxsize=512)
def _load_file(path: str, resolution: int) -> torch.Tensor:
    from ..images import open_image

    return _to_uint8(open_image(path), resolution)


class FolderConceptSets(ConceptSets):
    """ROOT/<identity>/*.png|jpg|...; a `concept.json` with "class_word" names the class.

    An identity with fewer than N + M images repeats images (with augmentation, so views
    still differ); with one image it is a single-image concept.
    """

    def __init__(self, root: str | os.PathLike, *, default_class_word: str = "object", **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise OnewordError(f"--data folders:{root}: no such folder")
        self.concepts = []  # (name, class word, [image paths])
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name.startswith(".") or folder.name in NEVER_TRAIN_NAMES:
                continue  # hidden folders; the world's validation/test identities never train
            files = sorted(
                str(p)
                for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                continue
            class_word = default_class_word
            concept_json = folder / "concept.json"
            if concept_json.is_file():
                try:
                    class_word = world_class_word(json.loads(concept_json.read_text()), class_word)
                except (OSError, ValueError) as error:
                    raise OnewordError(f"cannot read {concept_json}: {error}") from None
            self.concepts.append((folder.name, class_word, files))
        if not self.concepts:
            raise OnewordError(
                f"--data folders:{root} has no subfolder with images; put one folder of "
                f"images ({', '.join(IMAGE_SUFFIXES)}) per identity inside it"
            )

    def batch(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(mix_seed("folders", self.seed, self.rank, index))
        picks = torch.randint(len(self.concepts), (self.batch_size,), generator=generator)
        examples = []
        for pick in picks.tolist():
            name, class_word, files = self.concepts[pick]
            if len(files) >= self.views:
                chosen = torch.randperm(len(files), generator=generator)[: self.views].tolist()
            else:
                chosen = torch.randint(len(files), (self.views,), generator=generator).tolist()
            views = torch.stack([_load_file(files[i], self.resolution) for i in chosen])
            augmented = self.augment or len(files) < self.views
            if augmented:
                views = augment_views(views, generator)
            keys = [os.path.relpath(files[i], self.root) for i in chosen]
            examples.append(
                {
                    "name": name,
                    "class_word": class_word,
                    "views": views,
                    "keys": keys,
                    "augmented": augmented,
                }
            )
        return self._assemble(examples, index)


# ---------------------------------------------------------------------------------------
# WebDataset shards


class ShardConceptSets(ConceptSets):
    """Concept sets from WebDataset shards, streamed with `read_shards(resampled=True)`.

    Shards are split by rank and then by DataLoader worker *before* resampling (each takes
    every k-th shard of the sorted list), so ranks and workers read disjoint shards:
    webdataset's own `split_by_node` after a resampled shard list would only thin out each
    rank's random draws, not separate them. Needs at least ranks x workers shards.
    """

    def __init__(
        self,
        urls,
        *,
        workers: int = 0,
        shuffle: int = 1000,
        max_error_rate: float = 0.1,
        default_class_word: str = "object",
        max_pending: int = 4096,
        **kwargs,
    ):
        super().__init__(**kwargs)
        from ..datasets.shards import resolve_shard_urls

        self.urls = resolve_shard_urls(urls)
        needed = self.world_size * max(1, workers)
        if len(self.urls) < needed:
            raise OnewordError(
                f"{len(self.urls)} shard(s) for {self.world_size} rank(s) x {max(1, workers)} "
                f"worker(s): each needs its own shard (too few starves ranks and can hang DDP); "
                "write more, smaller shards or use fewer --workers"
            )
        self.shuffle = shuffle
        self.max_error_rate = max_error_rate
        self.default_class_word = default_class_word
        self.max_pending = max_pending  # identities waiting for N + M images (oldest dropped)

    def _pipeline(self, worker: int, workers: int):
        import webdataset as wds

        from ..datasets.shards import ShardErrorCounter, read_shards

        urls = self.urls[self.rank :: self.world_size][worker::workers]
        counter = ShardErrorCounter(max_error_rate=self.max_error_rate)
        dataset = read_shards(
            urls,
            shuffle=self.shuffle,
            resampled=True,
            seed=mix_seed("shards", self.seed, self.rank, worker, self.next_batch) % 2**31,
            split_by_node=False,  # done above, before resampling
            split_by_worker=False,
            handler=counter,
        )
        for stage in getattr(dataset, "pipeline", []):
            # By default the resampler also mixes the pid and the clock into its seed; a
            # deterministic stream is reproducible from (seed, rank, worker, next_batch).
            if isinstance(stage, wds.ResampledShards):
                stage.deterministic = True
        return dataset, counter

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        dataset, counter = self._pipeline(worker, workers)
        generator = torch.Generator().manual_seed(
            mix_seed("shard-views", self.seed, self.rank, worker, self.next_batch)
        )
        pending: OrderedDict[str, list] = OrderedDict()
        stats = {"held_out_skipped": 0, "dropped_incomplete": 0}
        examples, index = [], self.next_batch + worker
        for sample in dataset:
            meta = sample["json"] if isinstance(sample["json"], dict) else None
            key = f"{Path(str(sample['__url__'])).name}/{sample['__key__']}"
            identity = meta.get("identity") if meta else None
            if identity in NEVER_TRAIN_NAMES:
                stats["held_out_skipped"] += 1
                continue
            image = _to_uint8(sample["image"], self.resolution)  # (3, H, W)
            class_word = world_class_word(meta, self.default_class_word)
            if identity is None:
                # No identity: the image is its own concept, seen through N + M augmented views.
                views = augment_views(image.expand(self.views, -1, -1, -1), generator)
                examples.append(
                    {
                        "name": key,
                        "class_word": class_word,
                        "views": views,
                        "keys": [key] * self.views,
                        "augmented": True,
                    }
                )
            else:
                group = pending.setdefault(str(identity), [])
                group.append((key, image))
                if len(group) == self.views:
                    del pending[str(identity)]
                    order = torch.randperm(self.views, generator=generator).tolist()
                    views = torch.stack([group[i][1] for i in order])
                    if self.augment:
                        views = augment_views(views, generator)
                    examples.append(
                        {
                            "name": str(identity),
                            "class_word": class_word,
                            "views": views,
                            "keys": [group[i][0] for i in order],
                        }
                    )
                elif len(pending) > self.max_pending:
                    pending.popitem(last=False)
                    stats["dropped_incomplete"] += 1
            if len(examples) == self.batch_size:
                stats |= {"errors": counter.count, "seen": counter.seen, "worker": worker}
                yield self._assemble(examples, index, stats)
                examples, index = [], index + workers


def make_source(spec: str, **kwargs) -> ConceptSets:
    """`--data` spec -> a source: "world", "shards:URLS" (folder, glob or brace pattern) or
    "folders:DIR". Keyword arguments go to the source (see the classes)."""
    kind, _, arg = spec.partition(":")
    shard_only = ("workers", "shuffle", "max_error_rate")
    if kind == "world" and not arg:
        for name in (*shard_only, "default_class_word"):
            kwargs.pop(name, None)
        return WorldConceptSets(**kwargs)
    if kind == "shards" and arg:
        return ShardConceptSets(arg, **kwargs)
    if kind == "folders" and arg:
        for name in shard_only:
            kwargs.pop(name, None)
        return FolderConceptSets(arg, **kwargs)
    raise OnewordError(
        f"--data {spec!r}: use world, shards:PATH_OR_PATTERN (e.g. shards:data/shard-{{000000..000099}}.tar) "
        "or folders:DIR (one subfolder of images per identity)"
    )


__all__ = [
    "ConceptSets",
    "FolderConceptSets",
    "ShardConceptSets",
    "WorldConceptSets",
    "augment_views",
    "make_source",
    "mix_seed",
]
