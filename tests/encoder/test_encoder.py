"""The concept encoder: towers, the head, its file, its data sources (tiny models, CPU, seconds)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import small_encoder_config
from PIL import Image

from oneword.datasets.world import HELD_OUT, concept_scenes, render, training_identities
from oneword.encoder.data import (
    FolderConceptSets,
    ShardConceptSets,
    WorldConceptSets,
    augment_views,
    make_source,
)
from oneword.encoder.features import FeatureCache, ImageTower, load_tower
from oneword.encoder.model import (
    ConceptEncoder,
    EncoderConfig,
    bounded_rows,
    check_compatible,
    class_word_rows,
    encode_concept,
    load_encoder,
    save_encoder,
    with_placeholder_rows,
)
from oneword.errors import OnewordError


@pytest.fixture(scope="module")
def world_model(tiny_world_dir):
    from oneword.models import load_model

    return load_model(tiny_world_dir, device="cpu")


def _config(image_tower, model, **overrides) -> EncoderConfig:
    return small_encoder_config(image_tower, model, **({"num_vectors": 2} | overrides))


def _shake(encoder: ConceptEncoder, seed: int = 0) -> ConceptEncoder:
    """Give the zero-initialised output layers random weights, so outputs depend on the images."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in encoder.outputs:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    return encoder


def _world_pixels(n: int, seed: int = 0) -> torch.Tensor:
    scenes = concept_scenes(HELD_OUT[0], n, torch.Generator().manual_seed(seed))
    return render(scenes, 64)  # uint8 (n, 3, 64, 64)


def _features(tower, pixels):
    out = tower(pixels)
    return out.pooled.unsqueeze(0), out.tokens.unsqueeze(0)  # (1, n, p), (1, n, t, w)


# ---------------------------------------------------------------------------------------
# Towers


def test_world_tower_reads_pooled_and_penultimate_features(world_tower, tiny_world_dir):
    config = json.loads((Path(tiny_world_dir) / "image_encoder" / "config.json").read_text())
    out = world_tower(_world_pixels(3))
    patches = (config["image_size"] // config["patch_size"]) ** 2
    assert out.pooled.shape == (3, config["projection_dim"])
    assert out.tokens.shape == (3, patches + 1, config["hidden_size"])
    # The world's CLIP was trained with mean = std = 0.5 (its feature_extractor says so).
    assert world_tower.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert all(not p.requires_grad for p in world_tower.parameters())
    # The same images as floats in [-1, 1] give the same features as uint8.
    floats = _world_pixels(3).float() / 127.5 - 1
    torch.testing.assert_close(world_tower(floats).pooled, out.pooled)


def test_open_clip_tower_gives_tokens(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "oneword-test-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "oneword-test-vit.json")
    tower = load_tower("open_clip:oneword-test-vit")
    out = tower(torch.zeros(2, 3, 64, 64))
    assert out.pooled.shape == (2, 16)
    assert out.tokens.shape == (2, 1 + 16, 32)  # class token + 4x4 patches, width 32


def test_unknown_tower_spec_is_refused():
    with pytest.raises(OnewordError, match="unknown image tower"):
        load_tower("clip-please")
    with pytest.raises(OnewordError, match="no model folder"):
        load_tower("world")


# ---------------------------------------------------------------------------------------
# The head


def test_forward_shapes_sd1_and_start_at_the_class_word(world_tower, world_model):
    encoder = ConceptEncoder(_config(world_tower, world_model))
    class_rows = [r.unsqueeze(0) for r in class_word_rows(world_model, "circle", 2)]
    for n in (1, 5):
        pooled, tokens = _features(world_tower, _world_pixels(n))
        out = encoder(pooled, tokens, class_rows)
        assert [tuple(r.shape) for r in out.rows] == [(1, 2, world_model.widths[0])]
        # Zero-initialised output layers: an untrained encoder predicts the class word.
        torch.testing.assert_close(out.rows[0], class_rows[0], rtol=0, atol=0)


def test_forward_shapes_sdxl_two_widths(tiny_sdxl_dir, tiny_clip_vision_dir, tmp_path):
    from oneword.embeddings import load_embedding, save_embedding
    from oneword.models import load_model
    from oneword.tokens import add_placeholder, get_rows

    torch.manual_seed(0)
    model = load_model(tiny_sdxl_dir, device="cpu")
    tower = load_tower(f"transformers:{tiny_clip_vision_dir}")
    assert (tower.pooled_dim, tower.token_dim, tower.num_tokens) == (24, 32, 17)
    assert model.family == "sdxl" and len(model.widths) == 2
    encoder = _shake(ConceptEncoder(_config(tower, model)))
    class_rows = [r.unsqueeze(0).repeat(3, 1, 1) for r in class_word_rows(model, "dog", 2)]
    pooled = torch.randn(3, 5, 24)
    tokens = torch.randn(3, 5, 17, 32)
    out = encoder(pooled, tokens, class_rows)
    assert [tuple(r.shape) for r in out.rows] == [(3, 2, w) for w in model.widths]

    # encode_concept -> a TokenEmbedding for both encoders, usable by the embedding files and tokens.
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue", "green")]
    embedding = encode_concept(encoder, model, images, "<dog1>", "dog", tower=tower)
    assert embedding.widths == list(model.widths) and embedding.num_vectors == 2
    assert embedding.metadata["method"] == "encoder"
    path = save_embedding(tmp_path / "dog1.safetensors", embedding)
    assert load_embedding(path).widths == list(model.widths)
    placeholder = add_placeholder(model, "<dog1>", "dog", 2, init_rows=embedding.vectors)
    for stored, predicted in zip(get_rows(model, placeholder), embedding.vectors):
        torch.testing.assert_close(stored, predicted)


def test_permutation_invariance_and_masked_padding(world_tower, world_model):
    encoder = _shake(ConceptEncoder(_config(world_tower, world_model))).eval()
    class_rows = [r.unsqueeze(0) for r in class_word_rows(world_model, "circle", 2)]
    pooled, tokens = _features(world_tower, _world_pixels(5))
    order = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        base = encoder(pooled, tokens, class_rows).rows[0]
        permuted = encoder(pooled[:, order], tokens[:, order], class_rows).rows[0]
        fewer = encoder(pooled[:, :3], tokens[:, :3], class_rows).rows[0]
        # The first three images, padded to five with two masked copies of other images.
        mask = torch.tensor([[True, True, True, False, False]])
        padded = encoder(pooled, tokens, class_rows, set_mask=mask).rows[0]
    torch.testing.assert_close(permuted, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded, fewer, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fewer, base, atol=1e-4)  # the images do matter


def test_bounded_rows_stay_near_the_class_word():
    generator = torch.Generator().manual_seed(0)
    class_rows = torch.randn(4, 3, 16, generator=generator)
    for scale in (0.25, 1.0):
        for magnitude in (1e-6, 0.3, 1e3):
            raw = torch.randn(4, 3, 16, generator=generator) * magnitude
            rows = bounded_rows(raw, class_rows, scale)
            ratio = (rows - class_rows).norm(dim=-1) / class_rows.norm(dim=-1)
            assert bool((ratio <= scale + 1e-6).all())
    # Small offsets pass through almost linearly: v ~ c + alpha ||c|| r.
    raw = torch.full((1, 16), 1e-3)
    c = torch.ones(1, 16)
    torch.testing.assert_close(bounded_rows(raw, c, 0.5), c + 0.5 * 4 * raw, rtol=1e-5, atol=1e-7)


def test_gradient_reaches_the_head_through_the_placeholder_path(world_tower, world_model):
    from oneword.prompts import encode_prompts
    from oneword.tokens import add_placeholder, expand_prompt, get_rows, set_rows

    model = world_model
    encoder = _shake(ConceptEncoder(_config(world_tower, model)))
    zeros = [torch.zeros(2, w) for w in model.widths]
    slots = [
        add_placeholder(model, f"<grad-slot-{i}>", "object", 2, init_rows=zeros) for i in range(2)
    ]
    pooled, tokens = _features(world_tower, _world_pixels(6))
    class_rows = [r.unsqueeze(0).repeat(2, 1, 1) for r in class_word_rows(model, "circle", 2)]
    out = encoder(pooled.view(2, 3, -1), tokens.view(2, 3, *tokens.shape[2:]), class_rows)
    prompts = [expand_prompt(f"a photo of {s.token}", [s]) for s in slots]
    hidden = encode_prompts(with_placeholder_rows(model, slots, out.rows), prompts).hidden
    hidden.square().mean().backward()
    assert encoder.outputs[0].weight.grad is not None
    assert float(encoder.outputs[0].weight.grad.abs().sum()) > 0
    assert float(encoder.token_in[1].weight.grad.abs().sum()) > 0
    # The view reads exactly what set_rows would store; the model itself was not written.
    assert all(float(r.abs().sum()) == 0 for s in slots for r in get_rows(model, s))
    for slot, rows in zip(slots, out.rows[0]):
        set_rows(model, slot, [rows.detach()])
    torch.testing.assert_close(encode_prompts(model, prompts).hidden, hidden.detach())


def test_head_costs_at_most_a_tenth_of_the_world_tower():
    """FLOPs of the default head vs the real world's CLIP vision tower (same architecture)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # checkpoints/world's image_encoder: width 192, 4 layers, 8-px patches at 64 px.
    backbone = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            projection_dim=128,
            hidden_act="quick_gelu",
        )
    )
    tower = ImageTower(
        "world", backbone, "transformers", image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    config = EncoderConfig()  # the defaults are sized for this tower
    assert (config.pooled_dim, config.token_dim) == (tower.pooled_dim, tower.token_dim)
    # Frozen for counting: FlopCounterMode's module tracker trips over no-grad views of parameters.
    encoder = ConceptEncoder(config).eval().requires_grad_(False)
    images = torch.zeros(5, 3, 64, 64)

    def flops(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    features = tower(images)
    class_rows = [torch.randn(1, 1, 96)]
    tower_flops = flops(lambda: tower(images))
    head_flops = flops(
        lambda: encoder(features.pooled.unsqueeze(0), features.tokens.unsqueeze(0), class_rows)
    )
    assert tower_flops > 0 and head_flops > 0
    assert head_flops <= tower_flops / 10, (head_flops, tower_flops)  # measured: ~4%


# ---------------------------------------------------------------------------------------
# The file


def test_save_load_round_trip_needs_nothing_else(world_tower, world_model, tmp_path):
    from safetensors import safe_open

    encoder = _shake(ConceptEncoder(_config(world_tower, world_model, offset_scale=0.5)))
    path = save_encoder(tmp_path / "a" / "encoder.safetensors", encoder, metadata={"step": 7})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["config"])["offset_scale"] == 0.5
    assert metadata["step"] == "7" and metadata["format"] == "oneword-encoder/1"
    # Only the file, moved elsewhere: the config travels inside it.
    alone = tmp_path / "elsewhere" / "enc.safetensors"
    alone.parent.mkdir()
    path.rename(alone)
    loaded = load_encoder(alone)
    assert loaded.config == encoder.config
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    # And it predicts a word from images in one call.
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in _world_pixels(2)]
    embedding = encode_concept(
        loaded, world_model, images, "<held-out>", "circle", tower=world_tower
    )
    assert embedding.vectors[0].shape == (2, world_model.widths[0])
    assert embedding.metadata["encoder"] == str(alone)


def test_non_encoder_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"<t>": torch.zeros(1, 32)}, str(tmp_path / "token.safetensors"))
    with pytest.raises(OnewordError, match="not a oneword encoder"):
        load_encoder(tmp_path / "token.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OnewordError, match="not a readable"):
        load_encoder(tmp_path / "junk.safetensors")


def test_mismatched_family_or_width_is_refused(world_tower, world_model):
    sdxl = EncoderConfig(family="sdxl", widths=(32, 48), pooled_dim=world_tower.pooled_dim)
    with pytest.raises(OnewordError, match=r"sdxl.*\[32, 48\].*sd1.*\[32\]"):
        check_compatible(sdxl, world_model)
    wide = ConceptEncoder(_config(world_tower, world_model, widths=(768,)))
    with pytest.raises(OnewordError, match=r"widths \[768\].*widths \[32\]"):
        encode_concept(wide, world_model, [Image.new("RGB", (64, 64))], "<t>", "circle")


# ---------------------------------------------------------------------------------------
# Data


def _sizes(**overrides) -> dict:
    return dict(batch_size=3, references=2, targets=3, resolution=32, seed=0) | overrides


def test_world_source_sets_are_one_identity_in_other_scenes_and_never_held_out():
    source = WorldConceptSets(**_sizes())
    batch = source.batch(5)
    assert batch["references"].shape == (3, 2, 3, 32, 32)
    assert batch["targets"].shape == (3, 3, 3, 32, 32)
    held_out = {i.name for i in HELD_OUT}
    names = {n for i in range(20) for n in source.batch(i)["names"]}
    assert names and not names & held_out
    # References and targets are different images (other scenes of the same identity).
    for refs, targets in zip(batch["references"], batch["targets"]):
        assert not any(torch.equal(r, t) for r in refs for t in targets)
    # Batch i depends only on (seed, rank, i): resumable; ranks get their own streams.
    again = WorldConceptSets(**_sizes()).batch(5)
    assert torch.equal(again["targets"], batch["targets"]) and again["names"] == batch["names"]
    other_rank = WorldConceptSets(**_sizes(rank=1)).batch(5)
    assert not torch.equal(other_rank["targets"], batch["targets"])
    with pytest.raises(OnewordError, match="held out"):
        WorldConceptSets(identities=[HELD_OUT[0], training_identities()[0]], **_sizes())


def test_world_source_resumes_its_stream():
    source = WorldConceptSets(**_sizes(batch_size=1))
    stream = iter(source)
    first = [next(stream)["batch_index"] for _ in range(3)]
    resumed = WorldConceptSets(**_sizes(batch_size=1))
    resumed.load_state_dict({"next_batch": 3})
    assert first == [0, 1, 2] and next(iter(resumed))["batch_index"] == 3


def test_folder_source_reads_suites_and_skips_held_out(tmp_path):
    from oneword.datasets.suite import write_world_suite

    identities = [training_identities()[0], training_identities()[100], HELD_OUT[0]]
    write_world_suite(
        tmp_path / "suite", images_per_concept=3, resolution=32, identities=identities
    )
    source = FolderConceptSets(tmp_path / "suite", **_sizes(references=1, targets=1))
    assert [c[0] for c in source.concepts] == sorted(i.name for i in identities[:2])
    assert {c[1] for c in source.concepts} == {
        identities[0].class_word(),
        identities[1].class_word(),
    }
    batch = source.batch(0)
    assert batch["references"].shape == (3, 1, 3, 32, 32)
    assert all(key.endswith(".png") for row in batch["reference_keys"] for key in row)
    with pytest.raises(OnewordError, match="no subfolder with images"):
        FolderConceptSets(tmp_path / "suite" / identities[0].name, **_sizes())


def _png(colour=(200, 30, 30), size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


class _Trap:
    """Unpickling this creates a file: proof that a pickle member was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_shard_source_never_unpickles(tmp_path):
    marker = tmp_path / "pickle-ran"
    samples = [
        {
            "__key__": f"{i:06d}",
            "png": _png((20 * i, 100, 100)),
            "txt": b"a thing",
            "pyd": pickle.dumps(_Trap(str(marker))),
            "pkl": pickle.dumps(_Trap(str(marker))),
        }
        for i in range(6)
    ]
    _write_tar(tmp_path / "shard-000000.tar", samples)
    source = ShardConceptSets(tmp_path / "shard-000000.tar", shuffle=0, **_sizes(batch_size=2))
    batch = next(iter(source))
    assert batch["references"].shape == (2, 2, 3, 32, 32)
    # Images without an identity are their own concept, seen through augmented views.
    assert all(batch["augmented"])
    assert len({k for row in batch["reference_keys"] + batch["target_keys"] for k in row}) == 2
    assert not marker.exists()


def test_shard_source_skips_and_counts_corrupt_samples_and_stops_when_too_many(tmp_path):
    good = [
        {"__key__": f"{i:06d}", "png": _png((10 * i, 50, 50)), "json": b'{"identity": "a"}'}
        for i in range(40)
    ]
    bad = [
        {"__key__": f"{i:06d}", "png": b"\x89PNG broken", "json": b'{"identity": "a"}'}
        for i in range(40, 44)
    ]
    _write_tar(tmp_path / "shard-000000.tar", good[:20] + bad + good[20:])
    source = ShardConceptSets(
        tmp_path / "shard-000000.tar",
        shuffle=0,
        max_error_rate=0.25,
        **_sizes(batch_size=1, references=2, targets=2),
    )
    stream = iter(source)
    batches = [next(stream) for _ in range(12)]
    assert batches[-1]["stats"]["errors"] == len(bad)
    assert batches[-1]["names"] == ["a"]
    # Mostly broken shards stop the run with a message instead of silently starving it.
    _write_tar(tmp_path / "broken.tar", bad * 5 + good[:2])
    broken = ShardConceptSets(tmp_path / "broken.tar", shuffle=0, **_sizes(batch_size=1))
    with pytest.raises(OnewordError, match="could not be read"):
        next(iter(broken))


def test_shard_source_splits_shards_by_rank_and_needs_enough_of_them(tmp_path):
    for index in range(2):
        samples = [
            {"__key__": f"{index}{i:05d}", "png": _png((index * 100, i * 10, 0))} for i in range(4)
        ]
        _write_tar(tmp_path / f"shard-{index:06d}.tar", samples)
    seen = []
    for rank in range(2):
        source = ShardConceptSets(
            tmp_path, shuffle=0, **_sizes(batch_size=2, rank=rank, world_size=2)
        )
        stream = iter(source)
        seen.append(
            {
                k.split("/")[0]
                for _ in range(3)
                for row in next(stream)["reference_keys"]
                for k in row
            }
        )
    assert seen == [{"shard-000000.tar"}, {"shard-000001.tar"}]
    with pytest.raises(OnewordError, match="too few starves"):
        ShardConceptSets(tmp_path, **_sizes(world_size=2), workers=2)


def test_make_source_refuses_unknown_specs():
    with pytest.raises(OnewordError, match="use world, shards"):
        make_source("laion", **_sizes())


def test_augment_views_changes_pixels_deterministically():
    pixels = render(
        concept_scenes(training_identities()[0], 2, torch.Generator().manual_seed(0)), 32
    )
    a = augment_views(pixels, torch.Generator().manual_seed(1))
    b = augment_views(pixels, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == pixels.shape
    assert torch.equal(a, b) and not torch.equal(a, pixels)


def test_feature_cache_round_trip_and_fingerprint(tmp_path):
    cache = FeatureCache(tmp_path / "cache", {"tower": "world", "model": "m"})
    assert cache.get("tower", "img-1") is None
    cache.put("tower", "img-1", {"pooled": torch.arange(3.0)})
    again = FeatureCache(tmp_path / "cache", {"tower": "world", "model": "m"})
    torch.testing.assert_close(again.get("tower", "img-1")["pooled"], torch.arange(3.0))
    assert again.hits == 1
    with pytest.raises(OnewordError, match="tower"):
        FeatureCache(tmp_path / "cache", {"tower": "open_clip:ViT-L-14", "model": "m"})
