"""WebDataset shards: write the miniature world to shards; read any image-text shards safely.

Reading never uses webdataset's default decoders, which unpickle `.pyd`/`.pkl` members
(a downloaded tar could run code): only image, `.txt` and `.json` members are even read
from the tar, and they are decoded here with PIL, UTF-8 and `json.loads`.
Works with our shards and with img2dataset output (`{key}.jpg` + `.txt` + `.json`).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from oneword.datasets.world import Identity, WorldStream, full_caption
from oneword.errors import OnewordError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
_READ_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))
SHARD_PATTERN = "shard-%06d.tar"
_CHUNK = 256  # scenes rendered per call while writing


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def _png_bytes(pixels: Any) -> bytes:
    """uint8 (3, H, W) tensor -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_world_shards(
    out_dir: str | os.PathLike,
    n: int,
    *,
    seed: int,
    maxcount: int = 1000,
    resolution: int = 64,
    name_all: bool = False,
    identities: Sequence[Identity] | None = None,
) -> list[Path]:
    """Render `n` world images into WebDataset shards `out_dir/shard-000000.tar`, ...

    Each sample: `__key__` (9 digits), `png`, `txt` (a random caption) and `json` (every
    Scene field, "identity" and "full_caption"). Sample `i` is image `i % 256` of
    `WorldStream(256, seed).batch(i // 256)`, so shards and stream agree. Shards are written
    in a hidden sibling folder first, so a crash never leaves a half shard under its name.

    Args:
        out_dir: folder to create (or an existing one without shards).
        n: number of samples.
        seed: seed of the world stream.
        maxcount: samples per shard.
        resolution: image side in pixels.
        name_all: captions name unnamed values too (for the world's CLIP).
        identities: restrict shape/colour/pattern to these identities.

    Returns:
        The shard paths, sorted.
    """
    out_dir = Path(out_dir)
    if n < 1 or maxcount < 1:
        raise OnewordError(f"need n >= 1 and maxcount >= 1, got n={n}, maxcount={maxcount}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.glob("shard-*.tar"))):
        raise OnewordError(
            f"{out_dir} already holds shards (or is a file); pick a new folder or delete them"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stream = WorldStream(_CHUNK, seed, resolution, identities=identities, name_all=name_all)
    # A hidden sibling (same filesystem, so the final rename is atomic); mkdir, unlike
    # mkdtemp, keeps the user's umask for the published folder.
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        # 1. Render and write every shard into the staging folder.
        sink = wds.ShardWriter(str(staging / SHARD_PATTERN), maxcount=maxcount, verbose=0, mtime=0)
        try:
            with tqdm(total=n, desc=f"world shards -> {out_dir}", unit="img") as bar:
                for chunk, start in enumerate(range(0, n, _CHUNK)):
                    batch = stream.batch(chunk)
                    count = min(_CHUNK, n - start)
                    for i in range(count):
                        scene = batch["scenes"][i]
                        meta = {
                            **scene.to_dict(),
                            "identity": scene.identity.name,
                            "full_caption": full_caption(scene),
                        }
                        sink.write(
                            {
                                "__key__": f"{start + i:09d}",
                                "png": _png_bytes(batch["pixels"][i]),
                                "txt": batch["captions"][i].encode("utf-8"),
                                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                            }
                        )
                    bar.update(count)
        finally:
            sink.close()
        # 2. Give the finished shards their final names.
        if not out_dir.exists():
            staging.rename(out_dir)
        else:
            for shard in sorted(staging.glob("shard-*.tar")):
                os.replace(shard, out_dir / shard.name)
            staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(out_dir.glob("shard-*.tar"))


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


class ShardErrorCounter:
    """A webdataset handler that skips bad samples, counts them, and gives up when too many
    are bad: raises OnewordError once `count / seen > max_error_rate` after at least
    `min_samples` samples. Each DataLoader worker holds its own copy."""

    def __init__(self, max_error_rate: float = 0.1, min_samples: int = 20):
        self.max_error_rate = max_error_rate
        self.min_samples = min_samples
        self.count = 0  # bad samples (or shards) skipped
        self.seen = 0  # samples decoded or skipped

    def good(self) -> None:
        self.seen += 1  # the rate is checked on errors only, so a good sample never raises

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        self.seen += 1
        logger.warning("skipping a bad sample (%d of %d so far): %r", self.count, self.seen, exn)
        self._check()
        return True  # keep going

    def _check(self) -> None:
        if self.count and self.seen >= self.min_samples:
            rate = self.count / self.seen
            if rate > self.max_error_rate:
                raise OnewordError(
                    f"{self.count} of {self.seen} samples could not be read ({rate:.0%} > "
                    f"{self.max_error_rate:.0%}); check the shards (the log names the bad ones)"
                )


def _wanted_member(name: str) -> bool:
    """Read only image, txt and json members from a tar (never .pyd/.pkl/...)."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.split(".", 1)[1].lower() in _READ_EXTENSIONS


class _DecodeSample:
    """Raw sample (bytes per extension) -> {"image", "txt", "json", "__key__", "__url__"}."""

    def __init__(self, counter: ShardErrorCounter):
        self.counter = counter
        self.checked: set[str] = set()  # shards whose end was checked (`tar_problem`)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key, url = sample.get("__key__"), sample.get("__url__")
        if url is not None and url not in self.checked:
            self.checked.add(url)
            problem = tar_problem(url)
            if problem is not None:  # counted once per shard; its good samples are still read
                self.counter(OnewordError(f"shard {url}: {problem}"))
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if extension is None:
            raise OnewordError(
                f"sample {key!r} in {url} has no image "
                f"({', '.join(IMAGE_EXTENSIONS)}); it has {sorted(k for k in sample if not k.startswith('__'))}"
            )
        try:
            with Image.open(io.BytesIO(sample[extension])) as opened:
                image = opened.convert("RGB")  # decodes fully, so a corrupt file raises here
            text = sample["txt"].decode("utf-8") if "txt" in sample else ""
            meta = json.loads(sample["json"]) if "json" in sample else None
        except Exception as error:  # PIL, UnicodeDecodeError, JSONDecodeError: name the sample
            raise OnewordError(
                f"shard {url}, sample {key!r}: cannot decode it ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:200]})"
            ) from None
        self.counter.good()
        return {
            "image": image,
            "txt": text,
            "json": meta,
            "__key__": key,
            "__url__": sample.get("__url__"),
        }


def tar_problem(url: str) -> str | None:
    """Why a local tar file is cut short, or None (also for remote shards, not checked).

    Python's tarfile stops without an error when a tar ends inside a member header, so the
    rest of the shard would be lost silently. A complete tar is a whole number of 512-byte
    blocks and ends with two zero blocks (tarfile and webdataset's writer add them).
    """
    if _is_remote(url) or not os.path.isfile(url):
        return None
    size = os.path.getsize(url)
    if size % 512:
        return (
            f"it is cut short ({size:,} bytes is not a whole number of 512-byte tar blocks; "
            "it ends inside a member): the samples after the cut are lost, copy it again"
        )
    with open(url, "rb") as handle:
        handle.seek(max(size - 1024, 0))
        if handle.read(1024).strip(b"\0"):
            return (
                "it is cut short (no end-of-archive blocks): the samples after the cut are "
                "lost, copy it again"
            )
    return None


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shard_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A folder (its `*.tar`), a glob, brace notation (`shard-{000000..000009}.tar`), one
    file, or a list of any of these -> the list of shard URLs. Local files must exist."""
    if isinstance(urls, (str, os.PathLike)):
        text = os.fspath(urls)
        if _is_remote(text):
            return list(braceexpand.braceexpand(text))
        if os.path.isdir(text):
            found = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
            if not found:
                raise OnewordError(f"no .tar shards in folder {text}")
            return found
        if any(ch in text for ch in "*?["):
            found = sorted(glob.glob(text))
            if not found:
                raise OnewordError(f"no shards match the pattern {text}")
            return found
        expanded = list(braceexpand.braceexpand(text))
    else:
        expanded = []
        for item in urls:
            expanded.extend(resolve_shard_urls(item))
    missing = [u for u in expanded if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise OnewordError(
            f"shard file(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    if not expanded:
        raise OnewordError("no shard URLs given")
    return expanded


def read_shards(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle: int = 0,
    resampled: bool = False,
    seed: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    handler: ShardErrorCounter | None = None,
) -> wds.WebDataset:
    """A WebDataset pipeline over image-text shards, decoding only images, txt and json.

    Args:
        urls: a folder, a glob, brace notation, a file, or a list of them.
        shuffle: sample shuffle buffer (0: keep order); shards are shuffled too when > 0.
        resampled: draw shards with replacement forever (for multi-node training).
        seed: seed of both shuffles.
        split_by_node: give each distributed rank its own shards (else every rank reads all).
        split_by_worker: give each DataLoader worker its own shards.
        handler: the error counter to use (a new `ShardErrorCounter()` if None); it is also
            available as `dataset.errors`.

    Returns:
        A `webdataset.WebDataset` yielding {"image": PIL RGB, "txt": str ("" if missing),
        "json": dict or None, "__key__": str, "__url__": str}.
    """
    shard_urls = resolve_shard_urls(urls)
    counter = handler if handler is not None else ShardErrorCounter()
    dataset = wds.WebDataset(
        shard_urls,
        handler=counter,
        resampled=resampled,
        shardshuffle=False if resampled or shuffle <= 0 else len(shard_urls),
        detshuffle=True,
        seed=seed,
        # webdataset's default node splitter raises when world size > 1: use the real
        # splitter only when asked, else no splitting at all.
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker if split_by_worker else None,
        select_files=_wanted_member,
    )
    if shuffle > 0:
        dataset = dataset.shuffle(shuffle, seed=seed)
    dataset = dataset.map(_DecodeSample(counter), handler=counter)
    dataset.errors = counter
    return dataset
