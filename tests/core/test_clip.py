"""oneword/clip.py, the one CLIP loader: one spec syntax for towers, scorers and the
identity loss's vision tower."""

from __future__ import annotations

import pytest
import torch

from oneword.clip import load_clip_vision, load_tower, split_spec
from oneword.errors import OnewordError


def test_spec_syntax():
    assert split_spec("world") == ("world", "")
    assert split_spec("transformers:/m/clip") == ("transformers", "/m/clip")
    assert split_spec("open_clip:ViT-L-14:openai") == ("open_clip", "ViT-L-14:openai")
    assert split_spec("open_clip:local-dir:/x") == ("open_clip", "local-dir:/x")


def test_identity_tower_takes_a_folder_or_the_transformers_spec(tiny_world_dir):
    folder = tiny_world_dir / "image_encoder"
    bare, bare_mean, bare_std = load_clip_vision(folder, device="cpu", dtype=torch.float32)
    spec, spec_mean, spec_std = load_clip_vision(
        f"transformers:{folder}", device="cpu", dtype=torch.float32
    )
    assert (bare_mean, bare_std) == (spec_mean, spec_std)
    pixels = torch.randn(2, 3, bare.config.image_size, bare.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(
            bare(pixel_values=pixels).image_embeds, spec(pixel_values=pixels).image_embeds
        )
    with pytest.raises(OnewordError, match="no config.json"):
        load_clip_vision(tiny_world_dir / "nothing-here", device="cpu", dtype=torch.float32)


def test_world_tower_is_the_folders_image_encoder(tiny_world_dir, world_tower):
    # "world" is the model folder's image_encoder/, with the world's preprocessing.
    same = load_tower(f"transformers:{tiny_world_dir / 'image_encoder'}")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(world_tower(images).pooled, same(images).pooled)
    with pytest.raises(OnewordError, match="unknown image tower"):
        load_tower("clip-please")
