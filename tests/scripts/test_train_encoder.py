"""train_encoder.py end to end on the tiny world: files, resume, validation, shards, two processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import root_script

ROOT = Path(__file__).resolve().parents[2]
train_encoder = root_script("train_encoder")  # the root script, imported by name


def _records(out: Path, event: str) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _run(world, out, *extra) -> int:
    args = ["--preset", "tiny", "--model", str(world), "--out", str(out), "--quiet", *extra]
    return train_encoder.main(args)


def test_help_documents_every_option_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_encoder.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in train_encoder.fields(train_encoder.TrainConfig):
        assert "--" + field.name.replace("_", "-") in text
    assert "examples:" in text and "--preset tiny" in text and "torchrun" in text
    assert "--resume" in text and "--preset" in text


def test_tiny_run_writes_the_encoder_checkpoints_log_and_grid(tiny_world_dir, tmp_path):
    from oneword.encoder.model import load_encoder

    out = tmp_path / "run"
    assert _run(tiny_world_dir, out) == 0
    # 1. The final encoder loads from its file alone and has moved away from the class word.
    encoder = load_encoder(out / "encoder.safetensors")
    assert encoder.metadata["step"] == "4"
    assert float(encoder.outputs[0].weight.detach().abs().sum()) > 0
    assert encoder.config.family == "sd1" and encoder.config.tower == "world"
    # 2. Checkpoints (pickle-free: safetensors + JSON) at the preset's interval and the end.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004"]
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and state["data"] == [{"next_batch": 4}]
    # 3. The log: config, the loader's own throughput, training and validation records.
    start = _records(out, "start")[0]
    assert start["config"]["steps"] == 4 and start["encoder"]["widths"] == [32]
    assert len(start["model_sha256"]) == 64 and start["commit"]  # what it ran on
    loader = _records(out, "loader")[0]
    assert loader["loader_images_per_s"] > 0
    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and r["loss"] > 0 for r in train)
    assert train[0]["reg"] == 0.0 and train[-1]["reg"] > 0  # zero-initialised offsets grow
    (val,) = _records(out, "val")
    assert val["concepts"] == 2 and val["loss_encoder"] > 0 and val["loss_classword"] > 0
    assert set(val["oracle"]) == {"shape", "colour", "pattern", "identity"}
    assert val["oracle_samples"] == 4  # 2 concepts x 2 samples, read by the oracle
    assert Path(val["grid"]).is_file() and Path(val["grid"]).parent == out / "val"
    end = _records(out, "end")[0]
    assert end["step"] == 4 and end["images_per_s"] > 0 and end["loader_images_per_s"] > 0


@pytest.mark.slow
def test_resume_continues_the_step_count_and_the_data_stream(tiny_world_dir, tmp_path):
    from oneword.encoder.model import load_encoder

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(tiny_world_dir, whole, "--log-keys", "--val-every", "100") == 0
    assert _run(tiny_world_dir, parts, "--log-keys", "--val-every", "100", "--steps", "2") == 0
    # Without --resume an existing run is never overwritten.
    assert _run(tiny_world_dir, parts, "--val-every", "100") == 2
    assert _run(tiny_world_dir, parts, "--log-keys", "--val-every", "100", "--resume") == 0
    a = load_encoder(whole / "encoder.safetensors").state_dict()
    b = load_encoder(parts / "encoder.safetensors").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)  # bitwise on the CPU
    assert _records(parts, "start")[-1]["resumed_from"] == 2
    assert [r["step"] for r in _records(parts, "train")] == [1, 2, 3, 4]

    def stream(out):
        lines = (out / "ranks" / "rank-0.jsonl").read_text().splitlines()
        return [(r["batch_index"], r["names"]) for r in map(json.loads, lines) if "names" in r]

    assert stream(parts) == stream(whole)
    assert [index for index, _ in stream(whole)] == [0, 1, 2, 3]


def test_resume_refuses_changed_settings_and_missing_runs(tiny_world_dir, tmp_path, capsys):
    assert _run(tiny_world_dir, tmp_path / "none", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    out = tmp_path / "run"
    assert _run(tiny_world_dir, out, "--steps", "1", "--val-every", "100") == 0
    assert _run(tiny_world_dir, out, "--resume", "--lr", "0.1") == 2
    assert "lr: 0.0003 -> 0.1" in capsys.readouterr().err
    # A checkpoint written before a resume key existed resumes with that key's default.
    state_file = out / "checkpoints" / "step-000001" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["regress_space"]
    state_file.write_text(json.dumps(state))
    assert _run(tiny_world_dir, out, "--resume", "--steps", "2", "--val-every", "100") == 0
    assert _run(tiny_world_dir, out, "--resume", "--steps", "3", "--regress-space", "text") == 2


def test_distillation_and_feature_cache_on_folder_data(tiny_world_dir, tmp_path):
    from oneword.datasets.suite import write_world_suite
    from oneword.datasets.world import training_identities
    from oneword.embeddings import TokenEmbedding, save_embedding

    identities = training_identities()[:2]
    suite = write_world_suite(tmp_path / "train-suite", images_per_concept=4, identities=identities)
    distill = tmp_path / "distill"
    for identity in identities:  # stand-ins for `oneword invert --concepts` outputs
        vectors = [torch.full((1, 32), 0.05)]
        save_embedding(
            distill / identity.name / "learned_embeds.safetensors", TokenEmbedding("<t>", vectors)
        )
    extra = ["--data", f"folders:{suite}", "--distill", str(distill), "--val-every", "100"]
    cache = tmp_path / "cache"
    extra += ["--cache-features", str(cache), "--steps", "3", "--references", "1", "--targets", "1"]
    assert _run(tiny_world_dir, tmp_path / "run", *extra) == 0
    train = _records(tmp_path / "run", "train")
    assert all(r["distill"] > 0 for r in train)
    # 4 images per identity, 2 seen per example: by step 3 most reads are cache hits.
    assert train[-1]["cache"]["hits"] > 0
    assert (cache / "cache.json").is_file() and any((cache / "tower").rglob("*.safetensors"))
    (reach,) = _records(tmp_path / "run", "distill_targets")
    assert reach["count"] == 2 and reach["offset_scale"] == 1.0


def test_target_reach_measures_targets_in_class_word_norms():
    c = [torch.tensor([[3.0, 4.0]])]  # ||c|| = 5
    targets = {"near": [torch.tensor([[3.0, 9.0]])], "far": [torch.tensor([[3.0, 34.0]])]}
    reach = train_encoder.target_reach(targets, c, offset_scale=2.0)
    assert reach["offset_over_class_norm"]["min"] == pytest.approx(1.0)  # 5 / 5
    assert reach["offset_over_class_norm"]["max"] == pytest.approx(6.0)  # 30 / 5
    assert reach["beyond_offset_scale"] == pytest.approx(0.5)  # "far" only
    assert train_encoder.target_reach({}, c, 2.0) is None


def test_tensorboard_is_optional(tiny_world_dir, tmp_path, capsys):
    installed = importlib.util.find_spec("tensorboard") is not None
    assert _run(tiny_world_dir, tmp_path / "run", "--tensorboard", "--steps", "1") == 0
    if installed:
        assert any((tmp_path / "run" / "tensorboard").iterdir())
    else:
        assert "tensorboard is not installed" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_and_end_with_identical_weights(
    tiny_world_dir, tmp_path
):
    from oneword.datasets.shards import write_world_shards
    from oneword.datasets.world import training_identities

    # Few identities, so that groups of N + M images of one identity fill up quickly.
    identities = training_identities()[::200]
    write_world_shards(tmp_path / "shards", 96, seed=1, maxcount=24, identities=identities)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", str(ROOT / "train_encoder.py")]
    command += ["--preset", "tiny", "--model", str(tiny_world_dir), "--out", str(out), "--quiet"]
    command += ["--data", f"shards:{tmp_path / 'shards'}", "--log-keys", "--val-every", "100"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    shards, digests = [], []
    for rank in range(2):
        lines = [
            json.loads(x) for x in (out / "ranks" / f"rank-{rank}.jsonl").read_text().splitlines()
        ]
        shards.append({key.split("/")[0] for r in lines if "keys" in r for key in r["keys"]})
        digests.append(lines[-1]["weights_sha1"])
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] <= {"shard-000000.tar", "shard-000002.tar"}  # rank r reads shards r, r+2
    assert digests[0] == digests[1]
    start = _records(out, "start")[0]
    assert start["world_size"] == 2
    assert (out / "encoder.safetensors").is_file()


@pytest.mark.slow
def test_sdxl_model_with_a_transformers_tower_and_a_given_val_suite(
    tiny_sdxl_dir, tiny_clip_vision_dir, tmp_path
):
    from oneword.datasets.suite import write_world_suite
    from oneword.datasets.world import training_identities
    from oneword.encoder.model import load_encoder

    torch.manual_seed(0)
    suite = write_world_suite(
        tmp_path / "suite", images_per_concept=3, identities=training_identities()[:2]
    )
    out = tmp_path / "run"
    extra = ["--tower", f"transformers:{tiny_clip_vision_dir}", "--data", f"folders:{suite}"]
    extra += ["--val-suite", str(suite), "--steps", "2", "--vectors", "2"]
    assert _run(tiny_sdxl_dir, out, *extra) == 0
    encoder = load_encoder(out / "encoder.safetensors")
    assert encoder.config.family == "sdxl" and encoder.config.widths == (32, 48)
    assert encoder.config.num_vectors == 2
    (val,) = _records(out, "val")
    assert val["concepts"] == 2 and "oracle" not in val  # no oracle/ beside an SDXL model
    assert (out / "val" / "step-000002.png").is_file()


@pytest.mark.slow
def test_flux_encoder_predicts_clip_l_and_t5_rows(tiny_flux_dir, tiny_clip_vision_dir, tmp_path):
    """One output head per text encoder width: the encoder trains on FLUX (CLIP-L 32, T5 64)
    and `oneword encode` writes a clip_l + t5 file that FLUX's loaders read."""
    from oneword.cli import main as oneword_main
    from oneword.datasets.suite import write_world_suite
    from oneword.datasets.world import training_identities
    from oneword.embeddings import load_embedding
    from oneword.encoder.model import load_encoder

    suite = write_world_suite(
        tmp_path / "suite", images_per_concept=3, identities=training_identities()[:2]
    )
    out = tmp_path / "run"
    extra = ["--tower", f"transformers:{tiny_clip_vision_dir}", "--data", f"folders:{suite}"]
    extra += ["--val-suite", str(suite), "--steps", "2"]
    assert _run(tiny_flux_dir, out, *extra) == 0
    encoder = load_encoder(out / "encoder.safetensors")
    assert encoder.config.family == "flux" and encoder.config.widths == (32, 64)
    heads = [tuple(layer.weight.shape) for layer in encoder.outputs]
    assert [h[0] for h in heads] == [32, 64]
    (val,) = _records(out, "val")
    assert val["concepts"] == 2

    concept = sorted(p for p in suite.iterdir() if p.is_dir())[0]
    encoded = tmp_path / "encoded"
    code = oneword_main(
        ["encode", "--model", str(tiny_flux_dir), "--encoder", str(out / "encoder.safetensors")]
        + ["--images", str(concept), "--token", "<enc>", "--class-word", "shape"]
        + ["--out", str(encoded), "--device", "cpu", "--refine-steps", "2", "--quiet"]
        + ["--no-samples", "--check", "loss"]
    )
    assert code == 0
    emb = load_embedding(encoded / "learned_embeds.safetensors")
    assert emb.encoder_keys == ("clip_l", "t5") and emb.widths == [32, 64]


def _table_regression_loss(head, regression, model) -> float:
    """mean_k ||v - v*||^2 / ||c||^2 over every target, from all of its images."""
    from oneword.encoder.model import class_word_rows

    losses = []
    with torch.no_grad():
        for index in range(len(regression.table)):
            pooled, tokens = regression.features(index)
            c = class_word_rows(model, regression.table.class_words[index], 1)[0].unsqueeze(0)
            rows = head(pooled.unsqueeze(0), tokens.unsqueeze(0), [c]).rows[0]
            target = regression.rows[0][index].unsqueeze(0)
            losses.append(float(((rows - target).pow(2).sum(-1) / c.pow(2).sum(-1)).mean()))
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_regression_onto_the_target_table_reduces_its_loss(tiny_world_dir, tmp_path):
    from oneword.encoder.features import Featurizer, load_tower
    from oneword.encoder.model import ConceptEncoder, load_encoder
    from oneword.encoder.targets import FactoryConfig, TargetRegression, run_factory
    from oneword.models import load_model

    model = load_model(tiny_world_dir, device="cpu")
    factory = FactoryConfig(steps=10, lr=0.05, identities=4, image_sets=2, images=3, quiet=True)
    run_factory(model, factory, tmp_path / "targets")
    out = tmp_path / "run"
    extra = ["--objective", "regress", "--target-table", str(tmp_path / "targets")]
    extra += ["--steps", "40", "--lr", "1e-2", "--val-every", "100", "--log-every", "10"]
    extra += ["--offset-scale", "30"]  # the targets lie far from the tiny class words
    assert _run(tiny_world_dir, out, *extra) == 0
    train = _records(out, "train")
    assert all(r["regress"] > 0 and r["denoise"] == 0 for r in train)  # no UNet in the loop
    (table,) = _records(out, "target_table")
    assert table["count"] == 8 and table["identities"] == 4
    # On the whole table, the trained head is much closer to the targets than the untrained
    # one (which predicts the class word).
    tower = load_tower("world", model_folder=str(tiny_world_dir))
    regression = TargetRegression(
        train_encoder.load_targets(tmp_path / "targets"),
        Featurizer(tower, model),
        model.resolution,
        "cpu",
    )
    trained = load_encoder(out / "encoder.safetensors")
    untrained = ConceptEncoder(trained.config).eval()
    before = _table_regression_loss(untrained, regression, model)
    after = _table_regression_loss(trained, regression, model)
    assert after < 0.5 * before, (before, after)
    # mix: both terms, here started from the regression run's encoder.
    extra = ["--objective", "mix", "--target-table", str(tmp_path / "targets"), "--steps", "2"]
    extra += ["--init-encoder", str(out / "encoder.safetensors"), "--offset-scale", "30"]
    assert _run(tiny_world_dir, tmp_path / "mix", *extra, "--val-every", "100", "--lr", "1e-9") == 0
    mixed = _records(tmp_path / "mix", "train")
    assert all(r["regress"] > 0 and r["denoise"] > 0 for r in mixed)
    # It starts where the regression run ended: on the same first batch, a fresh head is
    # further from the targets.
    fresh = ["--objective", "mix", "--target-table", str(tmp_path / "targets"), "--steps", "1"]
    fresh += ["--offset-scale", "30", "--val-every", "100"]
    assert _run(tiny_world_dir, tmp_path / "mix0", *fresh) == 0
    assert mixed[0]["regress"] < 0.5 * _records(tmp_path / "mix0", "train")[0]["regress"]
    # In the text encoder's output space (from the rows run's encoder): no UNet either, and
    # the loss is relative to the class word's, so the trained start reads below 1.
    extra = ["--objective", "regress", "--regress-space", "text", "--steps", "4"]
    extra += ["--target-table", str(tmp_path / "targets"), "--offset-scale", "30"]
    extra += ["--init-encoder", str(out / "encoder.safetensors"), "--log-every", "1"]
    assert _run(tiny_world_dir, tmp_path / "text", *extra, "--val-every", "100") == 0
    text = _records(tmp_path / "text", "train")
    assert all(0 < r["regress"] < 1 and r["denoise"] == 0 for r in text), text
    # Through the UNet, on the targets' own images: three forwards, relative to the class word.
    extra[3] = "unet"
    assert _run(tiny_world_dir, tmp_path / "unet", *extra, "--val-every", "100") == 0
    unet = _records(tmp_path / "unet", "train")
    assert all(0 < r["regress"] < 1 and r["denoise"] == 0 for r in unet), unet
    assert all(r["unet_samples_per_s"] > 0 for r in unet)
    assert _run(tiny_world_dir, tmp_path / "bad", "--objective", "regress") == 2
    extra = ["--init-encoder", str(out / "encoder.safetensors"), "--dim", "16", "--steps", "1"]
    assert _run(tiny_world_dir, tmp_path / "bad2", *extra) == 2


def test_a_checkpoint_written_as_an_encoder_file_matches_the_run(tiny_world_dir, tmp_path):
    from oneword.encoder.model import load_encoder

    out = tmp_path / "run"
    extra = ["--steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "5"]
    assert _run(tiny_world_dir, out, *extra, "--val-every", "100", "--lr", "1e-2") == 0
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "encoder_from_checkpoint.py"
    spec = importlib.util.spec_from_file_location("encoder_from_checkpoint", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    final = load_encoder(out / "encoder.safetensors").state_dict()
    for step, same in ((None, True), (2, True), (1, False)):
        file = tmp_path / f"step-{step}.safetensors"
        argv = [str(out), "--out", str(file)] + ([] if step is None else ["--step", str(step)])
        assert script.main(argv) == 0
        written = load_encoder(file)
        assert written.metadata["step"] == str(step or 2)
        equal = all(torch.equal(written.state_dict()[k], v) for k, v in final.items())
        assert equal == same, step
    assert script.main([str(out), "--step", "7", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
