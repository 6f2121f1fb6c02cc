"""Hardening item 8 (docs/guarantees.md): a shard cut inside a tar header is counted as an
error naming the shard, and a bad sample is logged with its shard and key."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# --- 8. shards cut inside a header; bad images named ----------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(buffer, "PNG")
    return buffer.getvalue()


def test_8_cut_shards_and_bad_images_are_counted_and_named(tmp_path, caplog):
    from oneword.datasets.shards import read_shards

    members = []
    for key in range(4):
        members += [(f"{key:04d}.png", _png(key)), (f"{key:04d}.txt", b"a caption")]
    cut = tmp_path / "cut.tar"
    _tar(cut, members)
    with tarfile.open(cut) as tar:
        third = tar.getmembers()[4].offset  # the header of sample 0002's image
    cut.write_bytes(cut.read_bytes()[: third + 100])  # ends inside that header
    bad = tmp_path / "bad.tar"
    _tar(bad, [("0000.png", _png(0)), ("0001.png", b"not a png at all")])
    with caplog.at_level(logging.WARNING):
        dataset = read_shards([str(cut), str(bad)], split_by_node=False, split_by_worker=False)
        keys = [sample["__key__"] for sample in dataset]
    assert keys == ["0000", "0001", "0000"]
    assert dataset.errors.count == 2  # the cut shard and the bad image
    log = caplog.text
    assert f"shard {cut}" in log and "cut short" in log
    assert f"shard {bad}, sample '0001'" in log
