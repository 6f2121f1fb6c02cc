"""`oneword serve` without a browser: the progress hooks of `invert` and `encode` it uses, the
page's limits, one job end to end (files, reset between jobs, cancel), Try it, the parser.

The browser tests are in tests/serve/test_serve_browser.py."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

from oneword.errors import ImageError, OnewordError
from oneword.serve import (
    MAX_IMAGES,
    Cancelled,
    LearnRequest,
    Service,
    check_request,
    describe_event,
    trigger_word,
)
from oneword.serve.page import ProgressLog

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from oneword.datasets.suite import write_concept_images
    from oneword.datasets.world import HELD_OUT

    return write_concept_images(HELD_OUT[0], tmp_path_factory.mktemp("images"), count=3)


@pytest.fixture(scope="module")
def service(tiny_sd1_dir, tmp_path_factory) -> Service:
    return Service(str(tiny_sd1_dir), out=tmp_path_factory.mktemp("out"), device="cpu")


# ---------------------------------------------------------------------------------------
# The library's progress hooks


def test_invert_reports_every_step_and_a_raising_callback_stops_it(tiny_sd1_dir, images, tmp_path):
    from oneword.inversion import InversionConfig, invert
    from oneword.models import load_model

    config = InversionConfig(steps=3, samples=False, quiet=True)
    events = []
    invert(load_model(tiny_sd1_dir, device="cpu"), images, "<p>", "object", config,
           progress=events.append)  # fmt: skip
    assert [(e["stage"], e["step"], e["total"]) for e in events] == [
        ("invert", s, 3) for s in (1, 2, 3)
    ]
    assert all(isinstance(e["loss"], float) and e["loss"] > 0 for e in events)

    def stop_at_two(event):
        if event["step"] == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        invert(load_model(tiny_sd1_dir, device="cpu"), images, "<p>", "object", config,
               tmp_path / "run", progress=stop_at_two)  # fmt: skip
    assert not (tmp_path / "run" / "learned_embeds.safetensors").exists()


@pytest.mark.slow
def test_encode_reports_every_stage(tiny_world_dir, images):
    from oneword.encoder.encode import encode
    from oneword.encoder.features import load_tower
    from oneword.encoder.model import ConceptEncoder, EncoderConfig
    from oneword.models import load_model

    model = load_model(tiny_world_dir, device="cpu")
    tower = load_tower("world", model_folder=tiny_world_dir)
    encoder = ConceptEncoder(
        EncoderConfig(
            tower=tower.spec,
            pooled_dim=tower.pooled_dim,
            token_dim=tower.token_dim,
            family=model.family,
            widths=tuple(model.widths),
            dim=32,
            queries=2,
            heads=2,
        )
    )
    events = []
    # An untrained encoder scores exactly 1.0 > threshold 0.5: the fallback runs.
    result = encode(model, encoder, images, "<e>", class_word="circle", tower=tower,
                    refine_steps=2, fallback_steps=2, check="loss", check_draws=4, threshold=0.5,
                    samples=False, quiet=True, progress=events.append)  # fmt: skip
    stages = [e["stage"] for e in events]
    assert stages == [
        "encoder", "refine", "refine", "checking", "check", "fallback", "fallback", "checking",
        "check",
    ]  # fmt: skip
    first_check, last_check = (e for e in events if e["stage"] == "check")
    assert first_check["after"] == "refined" and first_check["fallback"] is True
    assert first_check["passed"] is False and first_check["threshold"] == 0.5
    assert last_check["after"] == "fallback"
    assert last_check["score"] == pytest.approx(result.score)
    assert result.path_taken == "fallback"
    lines = [describe_event(e)[1] for e in events]
    assert re.match(r"Check \(loss, after refined\): score \d\.\d{3} > threshold 0.5, failed, "
                    r"falling back to full inversion", lines[4])  # fmt: skip
    assert lines[6].startswith("Fallback (full inversion): step 2/2, loss ")
    progress = ProgressLog()
    for event in events:
        progress.add(event)
    assert "scoring the token" not in progress.text()  # each check line ends with its result


# ---------------------------------------------------------------------------------------
# The page's limits


def test_trigger_word_is_a_safe_file_name():
    assert trigger_word("<my-cup>") == "my-cup"
    assert trigger_word("<../../etc>") == "etc"
    assert trigger_word("<a b/c>") == "a-b-c"


def test_check_request_refuses_each_limit_with_one_line(images, tmp_path):
    session = tmp_path / "session"
    assert check_request(images, "  <ok>  ", session) == "<ok>"
    cases = [
        (images, "", "the token name is empty"),
        (images, "<two words>", "must be one word without spaces"),
        (images, "<>", "has no letters or digits"),
        ([], "<t>", "no images: upload 1-20 images"),
        (list(images) * 7, "<t>", "21 images uploaded; the limit is 20"),
    ]
    big = tmp_path / "big.png"
    with open(big, "wb") as handle:
        handle.truncate(21 * 2**20)  # sparse: 21 MB on paper, nothing on disk
    cases.append(([big], "<t>", "big.png is 21.0 MB; the limit is 20 MB per file"))
    (session / "done").mkdir(parents=True)
    cases.append((images, "<done>", "you already learned '<done>'"))
    for files, token, message in cases:
        with pytest.raises(OnewordError, match=re.escape(message)):
            check_request(files, token, session)
    assert MAX_IMAGES == 20


def test_a_bad_image_is_named_by_its_own_file_name(service, tmp_path):
    bad = tmp_path / "upload-cache" / "holiday.jpg"
    bad.parent.mkdir()
    bad.write_text("not an image")
    request = LearnRequest(images=[str(bad)], token="<bad>", path="classic", steps=1)
    with pytest.raises(ImageError) as caught:
        service.learn(request, "session-bad")
    assert str(caught.value).startswith("holiday.jpg is not an image PIL can read")
    assert "upload-cache" not in str(caught.value)
    assert not (service.out / "session-bad").exists()


# ---------------------------------------------------------------------------------------
# Jobs


@pytest.mark.slow
def test_learn_writes_every_layout_and_each_job_starts_from_a_clean_model(service, images):
    from oneword.embeddings import load_embedding

    outputs = []
    for session in ("alice", "bob"):  # the same token for two users: each model slot is reset
        request = LearnRequest(images=[str(p) for p in images], token="<mug>", class_word="mug",
                               path="classic", steps=2)  # fmt: skip
        events = []
        outputs.append(service.learn(request, session, progress=events.append))
        assert [e["stage"] for e in events][-4:] == ["classic", "files", "scenes", "done"]
    first, second = outputs
    assert first.folder == service.out / "alice" / "mug"
    assert second.folder == service.out / "bob" / "mug"
    assert {p.name for p in first.folder.iterdir()} == {
        "images", "kohya", "learned_embeds.safetensors", "log.json", "mug.pt", "scenes.png"
    }  # fmt: skip
    assert first.files["a1111"].name == "mug.pt"
    assert first.files["kohya"] == first.folder / "kohya" / "mug.safetensors"
    vectors = load_embedding(first.files["diffusers"]).vectors[0]
    for name in ("a1111", "kohya"):
        torch.testing.assert_close(load_embedding(first.files[name]).vectors[0], vectors)
    # Same seed, same images, a clean model each time: the same token.
    torch.testing.assert_close(load_embedding(second.files["diffusers"]).vectors[0], vectors)
    assert (
        first.why == "Path taken: classic inversion, 2 steps (this model has no concept encoder)."
    )
    assert first.metadata["steps"] == 2 and first.metadata["trigger word (file name)"] == "mug"
    assert len(first.images) == 3
    with service.pool.slot() as borrowed:
        assert "<mug>" not in borrowed.tokenizers[0].get_vocab()


def test_a_cancelled_job_leaves_nothing_and_the_model_is_free_again(service, images):
    flag = threading.Event()

    def cancel_on_first_step(event):
        if event["stage"] == "classic":
            flag.set()

    request = LearnRequest(images=[str(p) for p in images], token="<gone>", path="classic",
                           steps=1000)  # fmt: skip
    with pytest.raises(Cancelled):
        service.learn(request, "carol", progress=cancel_on_first_step, cancel=flag)
    session = service.out / "carol"
    assert not session.exists() or not any(session.iterdir())
    request.steps, request.token = 1, "<back>"
    assert service.learn(request, "carol").folder.is_dir()


def test_the_pool_lends_each_copy_to_one_job_at_a_time(tiny_sd1_dir):
    from oneword.serve import ModelPool
    from oneword.tokens import add_placeholder

    pool = ModelPool(str(tiny_sd1_dir), size=2, device="cpu")
    with pool.slot() as first, pool.slot() as second:
        assert first is not second
        add_placeholder(first, "<only-here>", "a")
        assert "<only-here>" not in second.tokenizers[0].get_vocab()
    with pool.slot() as again, pool.slot():
        assert "<only-here>" not in again.tokenizers[0].get_vocab()  # reset on borrow
        assert again.text_encoders[0].get_input_embeddings().weight.shape[0] == len(
            again.tokenizers[0]
        )


def test_encoder_paths_need_an_encoder(service, images):
    request = LearnRequest(images=[str(p) for p in images], token="<enc>", path="auto")
    with pytest.raises(OnewordError, match="no concept encoder for its model"):
        service.learn(request, "dave")


def test_try_it_samples_with_a_learned_token_file(service, images):
    request = LearnRequest(images=[str(p) for p in images], token="<try>", path="classic", steps=1)
    out = service.learn(request, "erin")
    samples = service.try_it("a photo of <try>", [out.files["a1111"]], steps=2, num=2)
    assert len(samples) == 2 and samples[0].size == (service.pool.model.resolution,) * 2
    again = service.try_it("a photo of <try>", [out.files["a1111"]], steps=2, num=2)
    assert again[0].tobytes() == samples[0].tobytes()  # seeded
    with pytest.raises(OnewordError, match="the prompt is empty"):
        service.try_it("  ", [])


def test_world_concepts_are_rendered_once(service):
    from oneword.datasets.world import HELD_OUT

    paths = service.concept_images(HELD_OUT[0].name)
    assert len(paths) == 5 and all(p.suffix == ".png" for p in paths)
    assert service.concept_images(HELD_OUT[0].name) == paths
    with pytest.raises(OnewordError, match="no held-out world concept"):
        service.concept_images("nothing")


# ---------------------------------------------------------------------------------------
# The command and the layering


def test_serve_parser_defaults_to_localhost():
    from oneword.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--port", "8000"])
    assert (args.host, args.port, args.model, args.concurrency) == ("127.0.0.1", 8000, "m", 1)
    assert args.func.__module__ == "oneword.cli.serve"


def test_no_library_module_imports_the_page():
    package = ROOT / "oneword"
    for path in package.rglob("*.py"):
        if path.parent in (package / "serve", package / "cli"):
            continue
        text = path.read_text()
        assert not re.search(r"(from|import) [.\w]*serve\b|import gradio", text), path
