"""Training the miniature world: stages, export layout, resume, and that diffusers loads it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import root_script

root_script("train_world")  # the root script, importable by name from here on

from train_world import (  # noqa: E402
    PRESETS,
    STAGES,
    StageState,
    WorldTrainConfig,
    train_world,
)


def test_tiny_world_is_a_diffusers_pipeline_with_oracle(tiny_world_dir):
    from diffusers import StableDiffusionPipeline

    for part in (
        "tokenizer",
        "text_encoder",
        "unet",
        "vae",
        "scheduler",
        "image_encoder",
        "oracle",
    ):
        assert (tiny_world_dir / part).is_dir(), part
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world_dir, local_files_only=True)
    assert pipe.text_encoder.dtype == torch.float32  # fp16 on disk, fp32 when loaded
    assert pipe.image_encoder is not None
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red star",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    facts = json.loads((tiny_world_dir / "world.json").read_text())
    assert set(facts["stages"]) == set(STAGES)
    assert "hexagon" in facts["attributes"]["shape"]


def test_stage_resumes_from_its_checkpoint(tmp_path):
    cfg = replace(
        WorldTrainConfig(out=str(tmp_path / "w"), work=str(tmp_path / "work")), **PRESETS["tiny"]
    )
    cfg = replace(cfg, stages=("clip",), clip_steps=2, save_every=1)
    train_world(cfg)
    state = StageState(cfg, "clip")
    assert state.done and torch.load(state.path, weights_only=False)["step"] == 2
    # Undo "done", ask for more steps: training continues from step 2, not from scratch.
    (state.folder / "done").unlink()
    train_world(replace(cfg, clip_steps=3))
    assert torch.load(state.path, weights_only=False)["step"] == 3
    assert json.loads((state.folder / "done").read_text())["steps"] == 3
    # A finished stage is skipped.
    before = state.path.stat().st_mtime_ns
    train_world(replace(cfg, clip_steps=5))
    assert state.path.stat().st_mtime_ns == before


def test_masked_cross_entropy_ignores_unmentioned_attributes():
    from train_world import _masked_cross_entropy

    logits = torch.randn(4, 3)
    labels = torch.tensor([0, -100, 2, -100])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(_masked_cross_entropy(logits, labels), expected)
    nothing = _masked_cross_entropy(logits, torch.full((4,), -100))
    assert nothing.item() == 0.0 and torch.isfinite(nothing)


def test_text_labels_follow_the_caption():
    from oneword.datasets import world
    from train_world import Batches

    _, captions, labels, text_labels = Batches(0, 32, torch.device("cpu")).next_with_mentions(64)
    assert len(captions) == 64
    for attr in world.ATTRIBUTES:
        kept = text_labels[attr] != -100
        assert torch.equal(text_labels[attr][kept], labels[attr][kept])
        assert kept.any()
    # Omitted attributes exist (each is left out 15% of the time) and are masked.
    assert any((text_labels[a] == -100).any() for a in world.ATTRIBUTES)


def test_latent_pool_is_seeded_and_draws_fresh_captions(tiny_world_dir):
    from diffusers import AutoencoderKL

    from train_world import Batches, LatentPool

    vae = AutoencoderKL.from_pretrained(tiny_world_dir / "vae").eval()
    a = LatentPool(vae, 10, seed=3, resolution=64, device=torch.device("cpu"))
    b = LatentPool(vae, 10, seed=3, resolution=64, device=torch.device("cpu"))
    assert torch.equal(a.mean, b.mean) and a.mean.shape == (10, 4, 16, 16)
    assert [s.shape for s in a.scenes] == [s.shape for s in b.scenes]
    batches = Batches(0, 64, torch.device("cpu"))
    latents, captions = a.next(batches, 6, drop_prob=0.0)
    assert latents.shape == (6, 4, 16, 16) and len(captions) == 6 and all(captions)
    # Resuming the stream (generator + caption rng) reproduces the next batch exactly.
    state = batches.state_dict()
    torch.manual_seed(0)
    first = a.next(batches, 6, drop_prob=0.5)
    batches.load_state_dict(state)
    torch.manual_seed(0)
    again = a.next(batches, 6, drop_prob=0.5)
    assert torch.equal(first[0], again[0]) and first[1] == again[1]


def test_latent_pool_cache_is_reused_only_for_the_same_vae_renderer_and_settings(
    tiny_world_dir, tmp_path, monkeypatch
):
    from diffusers import AutoencoderKL

    import train_world as train

    vae = AutoencoderKL.from_pretrained(tiny_world_dir / "vae").eval()
    cpu, cache = torch.device("cpu"), tmp_path / "pool.safetensors"
    fresh = train.LatentPool(vae, 10, seed=3, resolution=64, device=cpu)
    first = train.LatentPool(vae, 10, seed=3, resolution=64, device=cpu, cache=cache)
    assert cache.is_file() and torch.equal(first.mean, fresh.mean)

    encoded = []
    real_render = train.world.render
    monkeypatch.setattr(
        train.world, "render", lambda *a, **k: encoded.append(1) or real_render(*a, **k)
    )
    again = train.LatentPool(vae, 10, seed=3, resolution=64, device=cpu, cache=cache)
    assert not encoded  # loaded, not re-encoded
    assert torch.equal(again.mean, fresh.mean) and torch.equal(again.std, fresh.std)
    assert [s.shape for s in again.scenes] == [s.shape for s in fresh.scenes]

    other_seed = train.LatentPool(vae, 10, seed=4, resolution=64, device=cpu, cache=cache)
    assert encoded and not torch.equal(other_seed.mean, fresh.mean)
    with torch.no_grad():  # another VAE: the cache (now of seed 4) must not be used either
        next(vae.parameters()).add_(0.5)
    encoded.clear()
    train.LatentPool(vae, 10, seed=4, resolution=64, device=cpu, cache=cache)
    assert encoded
    encoded.clear()  # another renderer (world v3 moved the objects): re-encoded too
    train.LatentPool(vae, 10, seed=4, resolution=64, device=cpu, cache=cache)
    assert not encoded
    monkeypatch.setattr(train, "_render_fingerprint", lambda resolution: "another renderer")
    train.LatentPool(vae, 10, seed=4, resolution=64, device=cpu, cache=cache)
    assert encoded
    cache.write_bytes(b"damaged")  # an unreadable cache only costs the encoding
    encoded.clear()
    damaged = train.LatentPool(vae, 10, seed=3, resolution=64, device=cpu, cache=cache)
    assert encoded and damaged.mean.shape == (10, 4, 16, 16)


def test_oracle_can_start_from_a_previous_oracle(tiny_world_dir, tmp_path):
    import shutil

    from oneword.world.oracle import Oracle

    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir / "vae", out / "vae")  # the oracle reads reconstructions
    cfg = replace(
        WorldTrainConfig(out=str(out), work=str(tmp_path / "work")),
        **PRESETS["tiny"],
    )
    cfg = replace(
        cfg,
        stages=("oracle",),
        oracle_steps=1,
        oracle_lr=0.0,
        oracle_init=str(tiny_world_dir / "oracle"),
    )
    train_world(cfg)
    before = Oracle.load(tiny_world_dir / "oracle").state_dict()
    after = Oracle.load(out / "oracle").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0: the init survives


def test_vae_decoder_stage_keeps_the_latent_space(tmp_path):
    """The optional stage trains the decoder only: encoder, quant conv and scaling unchanged."""
    from diffusers import AutoencoderKL

    cfg = replace(
        WorldTrainConfig(out=str(tmp_path / "w"), work=str(tmp_path / "work")), **PRESETS["tiny"]
    )
    train_world(replace(cfg, stages=("vae",)))
    before = AutoencoderKL.from_pretrained(tmp_path / "w" / "vae")
    # Not named: not run, even though it is not done.
    train_world(replace(cfg, stages=("vae",)))
    assert not StageState(cfg, "vae_decoder").done
    train_world(replace(cfg, stages=("vae_decoder",), vae_decoder_steps=2, vae_lr=1e-2))
    after = AutoencoderKL.from_pretrained(tmp_path / "w" / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    b, a = before.state_dict(), after.state_dict()
    kept = [k for k in b if not k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and all(torch.equal(b[k], a[k]) for k in kept)
    assert any(not torch.equal(b[k], a[k]) for k in b if k.startswith("decoder."))
    assert StageState(cfg, "vae_decoder").done


def test_a_unet_with_attention_at_more_levels_starts_as_exactly_the_one_it_grows_from(tmp_path):
    from oneword.errors import OnewordError
    from train_world import build_unet, warm_start_unet

    cfg = replace(WorldTrainConfig(), **PRESETS["tiny"])
    torch.manual_seed(0)
    small = build_unet(cfg, 8).eval()
    small.save_pretrained(tmp_path / "small")
    grown = build_unet(replace(cfg, unet_attention_levels=3), 8).eval()
    assert grown.config.down_block_types[0] == "CrossAttnDownBlock2D"
    info = warm_start_unet(grown, tmp_path / "small")
    assert info["new"] and all(".attentions." in name for name in info["new"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    text = torch.randn(2, 77, cfg.text_width)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, text).sample, small(x, t, text).sample)
    # The new blocks are trainable: after one step the grown model differs.
    grown.train()
    grown(x, t, text).sample.square().mean().backward()
    new_grads = [p.grad for n, p in grown.named_parameters() if n in info["new"]]
    assert any(g is not None and g.abs().sum() > 0 for g in new_grads)
    # Another architecture is refused with the tensor that does not fit.
    other = build_unet(replace(cfg, unet_channels=(16, 32, 48)), 8)
    with pytest.raises(OnewordError, match="not a subset of this UNet"):
        warm_start_unet(other, tmp_path / "small")
    with pytest.raises(OnewordError, match="--unet-attention-levels must be 1..3"):
        build_unet(replace(cfg, unet_attention_levels=4), 8)
    # Per-level head counts: the new 16x16 blocks may have fewer heads than the copied ones.
    mixed = build_unet(replace(cfg, unet_attention_levels=3, unet_attention_heads=(1, 2, 2)), 8)
    assert mixed.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 1
    assert mixed.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2
    with pytest.raises(OnewordError, match="one count or 3"):
        build_unet(replace(cfg, unet_attention_heads=(1, 2)), 8)


def test_object_crops_hold_the_object_on_the_latent_grid():
    from oneword.datasets import world
    from oneword.errors import OnewordError
    from train_world import object_crops

    scenes = [
        world.Scene("circle", "red", "solid", "blue", "small", position)
        for position in world.POSITIONS
    ]
    pixels = world.render(scenes)
    for seed in range(3):
        crops = object_crops(pixels, scenes, 32, 8, torch.Generator().manual_seed(seed))
        assert crops.shape == (5, 3, 32, 32)
        for crop in crops:
            red = (crop[0] > 150) & (crop[2] < 100)  # the object's pixels
            # A small circle is ~17 px across: all of it is inside the crop.
            assert red.sum() >= 150, int(red.sum())
        # Each crop is the render at a corner on the 8-pixel grid.
        for i, crop in enumerate(crops):
            hits = [
                (x, y)
                for y in range(0, 33, 8)
                for x in range(0, 33, 8)
                if torch.equal(pixels[i, :, y : y + 32, x : x + 32], crop)
            ]
            assert hits
    with pytest.raises(OnewordError, match="must be a multiple of 8"):
        object_crops(pixels, scenes, 30, 8, torch.Generator())


@pytest.mark.slow
def test_sixteen_channel_latents_train_and_sample(tmp_path):
    """--vae-latent-channels reaches the VAE, the UNet and the samplers (SD3's VAEs have 16)."""
    from diffusers import StableDiffusionPipeline

    cfg = replace(
        WorldTrainConfig(out=str(tmp_path / "w"), work=str(tmp_path / "work")), **PRESETS["tiny"]
    )
    train_world(replace(cfg, vae_channels=(8, 16, 16, 16), vae_latent_channels=16, vae_crop=32,
                        unet_attention_levels=3, unet_attention_heads=(2,)))  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "w", local_files_only=True)
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 16
    assert pipe.unet.config.sample_size == 8  # 64 px / 8
    assert list(pipe.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3
    image = pipe("a red star", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_stages_side_by_side_wait_for_what_they_read(tmp_path):
    """--jobs 2: CLIP and VAE run at once, the oracle after the VAE, alone with 2 threads.
    Through the script's main, so the parent owns --out and --work (their locks) while its
    stage processes write into them."""
    cfg = replace(
        WorldTrainConfig(out=str(tmp_path / "w"), work=str(tmp_path / "work")), **PRESETS["tiny"]
    )
    train = root_script("train_world")
    args = ["--preset", "tiny", "--out", cfg.out, "--work", cfg.work, "--jobs", "2"]
    assert train.main([*args, "--stages", "clip", "vae", "oracle"]) == 0
    assert all(StageState(cfg, s).done for s in ("clip", "vae", "oracle"))
    assert not list(tmp_path.glob(".*.oneword.lock"))  # released when the run ended
    assert (tmp_path / "work" / "oracle" / "threads").read_text() == "2"
    records = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").open()]
    assert [r for r in records if r["stage"] == "run"][0]["jobs"] == 2
    # A stage whose inputs are neither done nor asked for is refused before anything runs.
    from oneword.errors import OnewordError

    other = replace(cfg, work=str(tmp_path / "work2"), stages=("unet",), jobs=2)
    with pytest.raises(OnewordError, match=r"need \['clip', 'vae'\] done first"):
        train_world(other)


def test_clip_vision_stage_trains_the_vision_tower_only(tmp_path):
    """The UNet reads the text tower: clip_vision must leave text_encoder/ and the text
    projection byte for byte as the clip stage exported them."""
    from transformers import CLIPVisionModelWithProjection

    cfg = replace(
        WorldTrainConfig(out=str(tmp_path / "w"), work=str(tmp_path / "work")), **PRESETS["tiny"]
    )
    out = tmp_path / "w"
    from oneword.errors import OnewordError

    with pytest.raises(OnewordError, match="train the clip stage first"):
        train_world(replace(cfg, stages=("clip_vision",)))
    train_world(replace(cfg, stages=("clip",)))
    text_files = sorted((out / "text_encoder").iterdir()) + [
        out / "image_encoder" / "text_projection.safetensors"
    ]
    text_before = {p.name: p.read_bytes() for p in text_files}
    vision_before = CLIPVisionModelWithProjection.from_pretrained(
        out / "image_encoder"
    ).state_dict()
    train_world(replace(cfg, stages=("clip_vision",), clip_vision_steps=2, clip_lr=1e-2))
    assert StageState(cfg, "clip_vision").done
    assert {p.name: p.read_bytes() for p in text_files} == text_before
    vision_after = CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder").state_dict()
    assert any(not torch.equal(vision_before[k], vision_after[k]) for k in vision_before)


def test_clip_vision_stage_starts_from_an_exported_world(tiny_world_dir, tmp_path):
    """A world whose work folder is gone (only its exported CLIP is left) can still have
    its vision tower trained on: the CLIP is rebuilt from text_encoder/ and image_encoder/."""
    import shutil

    from transformers import CLIPVisionModelWithProjection

    from train_world import _load_exported_clip, build_clip

    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir, out)
    cfg = replace(WorldTrainConfig(out=str(out), work=str(tmp_path / "work")), **PRESETS["tiny"])
    clip = build_clip(cfg)
    _load_exported_clip(clip, out)
    exported = CLIPVisionModelWithProjection.from_pretrained(tiny_world_dir / "image_encoder")
    torch.testing.assert_close(
        clip.visual_projection.weight, exported.visual_projection.weight.float()
    )
    train_world(replace(cfg, stages=("clip_vision",), clip_vision_steps=1))
    assert StageState(cfg, "clip_vision").done
    from oneword.errors import OnewordError

    with pytest.raises(OnewordError, match="other widths"):
        _load_exported_clip(build_clip(replace(cfg, vision_width=48)), out)


def test_a_stop_file_ends_a_stage_early_but_exported(tmp_path):
    cfg = replace(
        WorldTrainConfig(out=str(tmp_path / "w"), work=str(tmp_path / "work")), **PRESETS["tiny"]
    )
    state = StageState(cfg, "vae")
    (state.folder / "stop").touch()
    train_world(replace(cfg, stages=("vae",), vae_steps=50))
    assert state.done and json.loads((state.folder / "done").read_text())["steps"] == 1
    assert (tmp_path / "w" / "vae" / "config.json").is_file()


def test_a_running_stage_follows_its_threads_file_and_ignores_a_bad_one(tmp_path, caplog):
    from train_world import WorldTrainConfig, _follow_threads

    cfg = WorldTrainConfig(work=str(tmp_path))
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    try:
        _follow_threads(cfg, "unet")  # no file: nothing changes
        assert torch.get_num_threads() == before
        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "threads").write_text(f"{wanted}\n")
        _follow_threads(cfg, "unet")
        assert torch.get_num_threads() == wanted
        (tmp_path / "unet" / "threads").write_text("two")
        _follow_threads(cfg, "unet")
        assert torch.get_num_threads() == wanted
        assert "'two' is not a thread count" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_a_world_continued_in_a_new_work_folder_is_still_a_loadable_pipeline(
    tiny_world_dir, tmp_path
):
    """Only the UNet trained on (into a copy of the world, from a fresh work folder): the
    folder gets its model_index.json and a world.json that keeps the other stages' facts."""
    import shutil

    from diffusers import StableDiffusionPipeline

    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir, out)
    (out / "model_index.json").unlink()
    before = json.loads((out / "world.json").read_text())
    cfg = replace(
        WorldTrainConfig(out=str(out), work=str(tmp_path / "work")),
        **PRESETS["tiny"],
        stages=("unet",),
        unet_init=str(tiny_world_dir / "unet"),
    )
    infos = train_world(cfg)
    assert set(infos) == {"unet"}
    facts = json.loads((out / "world.json").read_text())
    assert facts["inherited"]["stages"] == ["clip", "oracle", "vae"]
    assert facts["inherited"]["config"] == before["config"]
    assert facts["stages"]["vae"] == before["stages"]["vae"]
    assert facts["stages"]["unet"]["steps"] == infos["unet"]["steps"]
    assert facts["config"]["unet_init"] == str(tiny_world_dir / "unet")
    StableDiffusionPipeline.from_pretrained(out, safety_checker=None)


def test_exported_weights_are_fp16_on_disk_and_load_as_fp32_without_a_cast_warning(tmp_path, capfd):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from train_world import _save_fp16, build_unet

    cfg = replace(WorldTrainConfig(), **PRESETS["tiny"])
    torch.manual_seed(0)
    unet = build_unet(cfg, 8).eval()
    capfd.readouterr()
    _save_fp16(unet, tmp_path / "unet")
    # diffusers warns (on stderr, its logger does not propagate) about a .to(dtype) cast.
    assert "Casting directly" not in capfd.readouterr().err
    with safe_open(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert loaded.dtype == torch.float32
    assert next(unet.parameters()).dtype == torch.float32  # the trained model is left as it was
    ref = {k: v.half().float() for k, v in unet.state_dict().items()}
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_unet_pattern_settings_reweight_the_pool_draws_and_bad_ones_fail_before_any_stage(
    tiny_world_dir, tmp_path
):
    from diffusers import AutoencoderKL

    from oneword.datasets.world import PATTERNS, UNNAMED_PATTERNS
    from oneword.errors import OnewordError
    from train_world import Batches, LatentPool, unet_pattern_weights

    cfg = replace(WorldTrainConfig(), **PRESETS["tiny"])
    assert unet_pattern_weights(cfg) is None  # the shipped recipe: the renderer's own draw
    quarter = unet_pattern_weights(replace(cfg, unet_unnamed_pattern_weight=0.25))
    assert quarter == tuple(0.25 if p in UNNAMED_PATTERNS else 1.0 for p in PATTERNS)
    by_name = unet_pattern_weights(
        replace(cfg, unet_unnamed_pattern_weight=0.25, unet_pattern_weight={"checkered": 2.0})
    )
    assert dict(zip(PATTERNS, by_name)) == {**dict(zip(PATTERNS, quarter)), "checkered": 2.0}
    assert unet_pattern_weights(replace(cfg, unet_pattern_weight={"split": 1.0})) is None

    vae = AutoencoderKL.from_pretrained(tiny_world_dir / "vae").eval()
    pool = LatentPool(vae, 60, seed=3, resolution=64, device=torch.device("cpu"))
    # Each pattern's weight is spread over the pool's scenes of it: unnamed 0.5 of 4.5.
    weights = pool._scene_weights(quarter)
    unnamed = sum(w for s, w in zip(pool.scenes, weights.tolist()) if s.pattern in UNNAMED_PATTERNS)
    assert abs(unnamed / float(weights.sum()) - 0.5 / 4.5) < 1e-9
    # The draws follow the weights: only striped scenes, so no caption names another pattern.
    striped = tuple(1.0 if p == "striped" else 0.0 for p in PATTERNS)
    _, captions = pool.next(Batches(0, 64, torch.device("cpu")), 400, 0.0, 0.0, striped)
    words = [set(c.replace(",", " ").split()) for c in captions]
    assert not any(w & {"solid", "dotted", "checkered", "dots"} for w in words)
    assert sum(bool(w & {"striped", "stripes"}) for w in words) > 0.7 * len(words)

    for field_name, value, match in (
        ("unet_unnamed_pattern_weight", 0.0, "--unet-unnamed-pattern-weight must be > 0"),
        ("unet_omit_solid", 1.5, "--unet-omit-solid must be in"),
        ("unet_pattern_weight", {"plaid": 2.0}, r"plaid=\.\.\.: no such pattern .*checkered"),
        ("unet_pattern_weight", {"dotted": 0.0}, "dotted=0.0: must be > 0"),
        ("stage_seconds", {"unte": 30.0}, r"--stage-seconds unte=\.\.\.: no such stage .*unet"),
        ("stage_seconds", {"unet": -1.0}, "--stage-seconds unet=-1.0: must be >= 0"),
    ):
        bad = replace(cfg, out=str(tmp_path / "w"), work=str(tmp_path / "work"),
                      **{field_name: value})  # fmt: skip
        with pytest.raises(OnewordError, match=match):
            train_world(bad)
        assert not (tmp_path / "work").exists()  # refused before the first stage


def test_an_out_or_work_that_cannot_be_a_folder_is_refused_before_any_stage(
    tmp_path, capsys, monkeypatch
):
    train = root_script("train_world")
    trained = []
    monkeypatch.setattr(train, "train_world", lambda cfg: trained.append(cfg) or {})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    work = ["--work", str(tmp_path / "work")]
    for args, flag in (
        (["--out", str(blocker), *work], "--out"),
        (["--out", str(blocker / "w"), *work], "--out"),
        (["--out", str(tmp_path / "w"), "--work", str(blocker / "work")], "--work"),
    ):
        assert train.main(["--preset", "tiny", *args]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert line.startswith(f"train_world.py: error: {flag} ") and str(blocker) in line, line
        assert "file" in line and captured.out == ""  # before the config is even printed
    assert trained == [] and not (tmp_path / "work").exists() and not (tmp_path / "w").exists()


def test_an_out_or_work_owned_by_another_run_is_refused_before_any_stage(
    tmp_path, capsys, monkeypatch
):
    import subprocess
    import sys

    train = root_script("train_world")
    trained = []
    monkeypatch.setattr(train, "train_world", lambda cfg: trained.append(cfg) or {})
    out, work = tmp_path / "w", tmp_path / "work"
    # Another run owns --work (the lock is per process, so that run is a process of its own).
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys; from oneword.io import prepare_out_dir; "
         "lock = prepare_out_dir(sys.argv[1]); print('owned', flush=True); sys.stdin.read()",
         str(work)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert owner.stdout.readline().strip() == "owned"
        args = ["--preset", "tiny", "--out", str(out), "--work", str(work)]
        assert train.main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"train_world.py: error: --work {work} is in use by another run")
        assert f"pid {owner.pid}" in line and trained == []
    finally:
        owner.stdin.close()
        owner.wait(timeout=30)
    # That run has ended: the folders are free again, and a run owns both while it trains.
    import os

    def owns_its_folders(cfg):
        for name in ("w", "work"):
            assert (tmp_path / f".{name}.oneword.lock").read_text().strip() == str(os.getpid())
        trained.append(cfg)
        return {}

    monkeypatch.setattr(train, "train_world", owns_its_folders)
    assert train.main(args) == 0 and len(trained) == 1
    assert not list(tmp_path.glob(".*.oneword.lock"))  # released at the end
