"""The server's jobs without any page: the limits, the model pool, `Service.learn` and
`Service.try_it` (see `oneword.serve`)."""

from __future__ import annotations

import copy
import json
import logging
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImageError, OnewordError

log = logging.getLogger("oneword.serve")

# Limits stated on the page (and enforced here and by Gradio's upload limit).
MAX_IMAGES = 20  # images per concept: textual inversion needs 3-5, more only adds time
MAX_FILE_MB = 20  # bytes per uploaded file (Gradio refuses bigger uploads before they land)
MAX_STEPS = 5000  # classic / fallback steps (Gal et al. train 5k)
DEFAULT_STEPS = 150  # the demo's budget: a fallback or a classic run of a few minutes on a CPU
MAX_TOKEN_CHARS = 64
TRY_MAX_IMAGES = 8
TRY_MAX_STEPS = 100
# The learning paths the page offers, in the order shown.
PATHS = {
    "auto": "encoder + refinement, automatic fallback",
    "encoder": "encoder alone",
    "classic": "classic inversion",
}


class Cancelled(OnewordError):
    """A job stopped because its user left or pressed Stop."""


# ---------------------------------------------------------------------------------------
# Helpers


def trigger_word(token: str) -> str:
    """The file-name form of a token, which AUTOMATIC1111 and ComfyUI use as the trigger word.

    "<my-cup>" -> "my-cup"; characters a file name cannot hold become "-".
    """
    return re.sub(r"[^\w.-]+", "-", token).strip(".-_")


def _file_label(path: str | Path) -> str:
    """An uploaded file's own name (Gradio keeps it as the last part of the cached path)."""
    return Path(path).name


def check_request(images: Sequence[str | Path], token: str, session_dir: Path) -> str:
    """The page's limits, before any work; returns the cleaned token.

    Args:
        images: uploaded image paths.
        token: the new word as typed.
        session_dir: this user's output folder (a token learned there before is refused).

    Raises:
        OnewordError: one line saying which limit and what to do.
    """
    token = (token or "").strip()
    if not token:
        raise OnewordError('the token name is empty; type a new word such as "<my-cup>"')
    if re.search(r"\s", token) or len(token) > MAX_TOKEN_CHARS:
        raise OnewordError(
            f"token {token!r} must be one word without spaces, at most {MAX_TOKEN_CHARS} "
            'characters, e.g. "<my-cup>"'
        )
    if not trigger_word(token):
        raise OnewordError(f'token {token!r} has no letters or digits; use e.g. "<my-cup>"')
    if (session_dir / trigger_word(token)).exists():
        raise OnewordError(
            f"you already learned {token!r} (file name {trigger_word(token)}) in this session; "
            "pick another token name"
        )
    if not images:
        raise OnewordError(
            f"no images: upload 1-{MAX_IMAGES} images of the concept, or pick a world concept"
        )
    if len(images) > MAX_IMAGES:
        raise OnewordError(
            f"{len(images)} images uploaded; the limit is {MAX_IMAGES} (3-5 are usually enough)"
        )
    for path in images:
        size = Path(path).stat().st_size
        if size > MAX_FILE_MB * 1024 * 1024:
            raise OnewordError(
                f"{_file_label(path)} is {size / 2**20:.1f} MB; the limit is {MAX_FILE_MB} MB "
                "per file"
            )
    return token


def load_request_images(images: Sequence[str | Path], resolution: int) -> list:
    """Open and fit the uploaded images (`oneword.images`); errors name the user's file."""
    from ..images import load_images

    fitted = []
    for path in images:
        try:
            fitted += load_images([path], resolution)
        except ImageError as error:
            # The cached upload path means nothing to the user; their file name does.
            raise ImageError(str(error).replace(str(path), _file_label(path))) from None
    return fitted


def scene_prompts(token: str, model, concept: str | None = None) -> list[str]:
    """Prompts of the result grid: the concept alone, then in new scenes.

    The world's edit prompts (those valid for a held-out concept) on a world model, as
    `oneword demo` shows them; classic inversion's sample prompts on any other model.
    """
    from ..datasets import world
    from ..inversion.templates import OBJECT_SAMPLE_PROMPTS

    folder = model.extra.get("folder") if isinstance(model.extra, dict) else None
    if concept is not None:
        identity = next(i for i in world.HELD_OUT if i.name == concept)
        edits = [template for template, _ in world.edit_prompts(identity)[:6]]
    elif folder and (Path(folder) / "world.json").is_file():
        edits = [template for template, _ in world.EDIT_PROMPTS[:6]]
    else:
        edits = list(OBJECT_SAMPLE_PROMPTS[1:])
    return [f"a photo of {token}"] + [template.format(token) for template in edits]


# ---------------------------------------------------------------------------------------
# Models shared by the jobs


class ModelPool:
    """`size` loaded copies of one model; `slot()` lends one, reset to its base vocabulary.

    A job adds its token to the model it borrows (`add_placeholder`); the reset (the base
    embedding put back, the tokenizers copied afresh from the pristine ones) makes the
    next job start from the model as loaded.
    """

    def __init__(self, source: str, *, size: int = 1, device: str | None = None):
        from ..models import load_model

        self.source = source
        self._free: queue.Queue = queue.Queue()
        self.models = []
        for _ in range(size):
            model = load_model(source, device=device)
            pristine = [copy.deepcopy(tokenizer) for tokenizer in model.tokenizers]
            self.models.append(model)
            self._free.put((model, pristine))

    @property
    def model(self):
        """The first copy, for facts (family, widths, resolution); do not add tokens to it."""
        return self.models[0]

    @staticmethod
    def reset(model, pristine) -> None:
        """Drop every token added to `model` since it was loaded."""
        from ..tokens import PlaceholderEmbedding

        for text_encoder in model.text_encoders:
            table = text_encoder.get_input_embeddings()
            if isinstance(table, PlaceholderEmbedding):
                text_encoder.set_input_embeddings(table.base)
        model.tokenizers[:] = [copy.deepcopy(tokenizer) for tokenizer in pristine]

    @contextmanager
    def slot(self) -> Iterator:
        """Borrow a model (waiting for a free one), reset before use."""
        model, pristine = self._free.get()
        try:
            self.reset(model, pristine)
            yield model
        finally:
            self._free.put((model, pristine))


# ---------------------------------------------------------------------------------------
# Jobs


@dataclass
class LearnRequest:
    """What the Learn form sends.

    Attributes:
        images: uploaded image paths (1..MAX_IMAGES).
        token: the new word, e.g. "<my-cup>".
        class_word: the concept's class ("cup"); the initializer and the check's reference.
        path: a key of `PATHS`.
        steps: classic steps, or the fallback's steps on the "auto" path.
        refine_steps: refinement steps after the encoder ("auto" path); None: the
            service's `encode_config`.
        concept: the held-out world concept the images show, if picked on the page.
        seed: seeds learning and the grid.
    """

    images: list[str]
    token: str
    class_word: str = ""
    path: str = "auto"
    steps: int = DEFAULT_STEPS
    refine_steps: int | None = None
    concept: str | None = None
    seed: int = 0


@dataclass
class LearnOutput:
    """A finished job: its folder, files, and what the page shows."""

    folder: Path
    token: str
    trigger: str
    files: dict[str, Path]
    images: list[Path]
    why: str
    summary: str
    metadata: dict = field(default_factory=dict)


def _why(path: str, log_data: dict, has_encoder: bool) -> str:
    """One line: which path was taken and why (check score and threshold)."""
    if log_data.get("method") == "classic":
        reason = "chosen on the page" if has_encoder else "this model has no concept encoder"
        return f"Path taken: classic inversion, {log_data['steps_done']} steps ({reason})."
    check, threshold = log_data["check"], log_data["threshold"]
    scores, taken = log_data["scores"], log_data["path_taken"]
    first = scores.get(log_data.get("checked")) if log_data.get("checked") else None
    if first is None:
        return f"Path taken: {taken} (no quality check)."
    verdict = "passed" if first <= threshold else "failed"
    sign = "<=" if first <= threshold else ">"
    measured = f"check {check}: score {first:.3f} {sign} threshold {threshold:g}, {verdict}"
    if taken == "fallback":
        steps = log_data["fallback"]["steps_done"]
        return (
            f"Path taken: fallback to full inversion ({steps} steps), because the {measured}; "
            f"after it the score is {scores['fallback']:.3f} (lower is better)."
        )
    if taken == "encoder":
        return f"Path taken: encoder alone (chosen on the page: no refinement, no fallback); {measured}."
    if not log_data["config"]["fallback"]:
        return f"Path taken: encoder + refinement; {measured} (fallback off)."
    return f"Path taken: encoder + refinement, no fallback needed: {measured}."


class Service:
    """The server's state and its two jobs, `learn` and `try_it`, without any page.

    Args:
        model: diffusers folder or hub id.
        encoder: concept encoder file for this model, or None (classic inversion only).
        out: root of the output folders (one per browser session, one per token inside).
        concurrency: jobs at once (= model copies in memory).
        device: "cpu", "cuda", ... (default: CUDA if available).
        encode_config: `EncodeConfig` defaults for the encoder paths (tests shorten them).
        sample_steps: DDIM steps of the result grid.
    """

    def __init__(
        self,
        model: str,
        *,
        encoder: str | None = None,
        out: str | Path = "runs/serve",
        concurrency: int = 1,
        device: str | None = None,
        encode_config=None,
        sample_steps: int = 30,
    ):
        from ..encoder.encode import EncodeConfig

        if not isinstance(concurrency, int) or not 1 <= concurrency <= 16:
            raise OnewordError(f"--concurrency must be an integer in 1..16, got {concurrency!r}")
        self.out = Path(out).resolve()
        self.concurrency = concurrency
        self.sample_steps = sample_steps
        self.encode_config = encode_config or EncodeConfig()
        self.encoder = self.tower = None
        encoder_path = Path(encoder) if encoder else None
        if encoder_path is not None and not encoder_path.is_file():
            raise OnewordError(
                f"no encoder at {encoder_path}; pass --encoder FILE for this model, or leave "
                "it out to offer classic inversion only"
            )
        self.pool = ModelPool(model, size=concurrency, device=device)
        if encoder_path is not None:
            from ..clip import load_tower
            from ..encoder.model import check_compatible, load_encoder

            first = self.pool.model
            self.encoder = load_encoder(encoder_path, device=first.device)
            check_compatible(self.encoder.config, first)  # refused at start, not per job
            folder = first.extra.get("folder") if isinstance(first.extra, dict) else None
            self.tower = load_tower(
                self.encoder.config.tower, model_folder=folder, device=first.device
            )
        self.encoder_path = encoder_path
        self._cancel: dict[str, threading.Event] = {}
        self._running: set[tuple[Path, str]] = set()
        self._lock = threading.Lock()

    # -- cancel flags, one per browser session --------------------------------------------

    def cancel_flag(self, session: str) -> threading.Event:
        """A fresh flag for the session's next job (a new job clears an old cancel)."""
        with self._lock:
            flag = self._cancel[session] = threading.Event()
            return flag

    def cancel(self, session: str) -> None:
        """Stop the session's running job at its next step (tab closed, or Stop)."""
        with self._lock:
            flag = self._cancel.get(session)
        if flag is not None:
            flag.set()

    def session_dir(self, session: str) -> Path:
        return self.out / trigger_word(session or "local")

    # -- the world's held-out concepts ------------------------------------------------------

    def concept_images(self, name: str) -> list[Path]:
        """The images of a held-out world concept (5 scenes, rendered once, shared)."""
        from ..datasets import world
        from ..datasets.suite import write_concept_images
        from ..io import atomic_dir

        if name not in {identity.name for identity in world.HELD_OUT}:
            raise OnewordError(f"no held-out world concept named {name!r}")
        folder = self.out / "world-concepts" / name
        with self._lock:
            if not folder.is_dir():
                identity = next(i for i in world.HELD_OUT if i.name == name)
                with atomic_dir(folder) as tmp:
                    write_concept_images(identity, tmp)
        return sorted(folder.glob("*.png"))

    # -- learn -----------------------------------------------------------------------------

    def learn(
        self,
        request: LearnRequest,
        session: str,
        *,
        progress: Callable[[dict], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> LearnOutput:
        """Learn a token for the request's images; files land in OUT/<session>/<trigger>/.

        Args:
            request: the form.
            session: the browser session (its own output folder).
            progress: called with the library's progress events (`encode`, `invert`) and
                {"stage": "images"|"model"|"scenes"|"files", ...} around them.
            cancel: when set, the job raises `Cancelled` at its next step or stage.

        Raises:
            OnewordError: bad input (nothing written) or `Cancelled`.
        """
        cancel = cancel or threading.Event()

        def report(event: dict) -> None:
            if cancel.is_set():
                raise Cancelled("stopped: the page was closed or Stop was pressed")
            if progress is not None:
                progress(event)

        started = time.perf_counter()
        session_dir = self.session_dir(session)
        token = check_request(request.images, request.token, session_dir)
        if request.path not in PATHS:
            raise OnewordError(f"path must be one of {', '.join(PATHS)}, got {request.path!r}")
        if request.path != "classic" and self.encoder is None:
            raise OnewordError(
                "this server has no concept encoder for its model (start it with --encoder "
                "FILE); choose classic inversion"
            )
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise OnewordError(f"steps must be a whole number in 1..{MAX_STEPS}")
        report({"stage": "images", "count": len(request.images)})
        images = load_request_images(request.images, self.pool.model.resolution)
        trigger = trigger_word(token)
        with self._lock:  # the same token twice at once in one session (a double click)
            if (session_dir, trigger) in self._running:
                raise OnewordError(f"{token!r} is being learned already; wait for it")
            self._running.add((session_dir, trigger))
        try:
            return self._learn(request, token, trigger, images, session_dir, report, started)
        finally:
            with self._lock:
                self._running.discard((session_dir, trigger))

    def _learn(self, request, token, trigger, images, session_dir, report, started) -> LearnOutput:
        from ..embeddings import export_embedding
        from ..io import atomic_dir, atomic_write_text

        class_word = (request.class_word or "").strip() or "object"
        report({"stage": "model", "waiting": True})
        with self.pool.slot() as model, atomic_dir(session_dir / trigger) as tmp:
            report({"stage": "model", "waiting": False})
            # 1. The training images, as the model sees them.
            for index, image in enumerate(images):
                (tmp / "images").mkdir(exist_ok=True)
                image.save(tmp / "images" / f"{index:02d}.png")
            # 2. Learn: the CLI's own functions, with the page's progress and cancel.
            if request.path == "classic":
                from ..inversion import InversionConfig, invert

                config = InversionConfig(
                    steps=request.steps, seed=request.seed, samples=False, quiet=True
                )
                result = invert(
                    model,
                    images,
                    token,
                    class_word,
                    config,
                    tmp,
                    class_word=class_word,
                    progress=lambda event: report(event | {"stage": "classic"}),
                )
                shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # nothing to resume here
                summary = f"{token}: classic inversion, {result.log['steps_done']} steps"
            else:
                from ..encoder.encode import encode

                settings = dict(seed=request.seed, samples=False, quiet=True)
                if request.path == "encoder":
                    settings |= dict(refine_steps=0, fallback=False)
                else:
                    settings |= dict(
                        refine_steps=request.refine_steps, fallback_steps=request.steps
                    )
                result = encode(
                    model,
                    self.encoder,
                    images,
                    token,
                    class_word=class_word,
                    config=self.encode_config,
                    out_dir=tmp,
                    tower=self.tower,
                    progress=report,
                    **settings,
                )
                summary = result.summary()
            # 3. The layouts other tools read; the file name is their trigger word.
            report({"stage": "files"})
            diffusers_file = result.files["embedding"]
            files = {
                "diffusers": diffusers_file,
                "a1111": export_embedding(diffusers_file, "a1111", tmp / f"{trigger}.pt"),
                "kohya": export_embedding(
                    diffusers_file, "kohya", tmp / "kohya" / f"{trigger}.safetensors"
                ),
            }
            # 4. New scenes.
            from ..images import save_grid
            from ..sampling import generate

            prompts = scene_prompts(token, model, request.concept)
            report({"stage": "scenes", "prompts": len(prompts)})
            samples = generate(
                model,
                prompts,
                placeholders=[result.placeholder],
                num_per_prompt=4,
                steps=self.sample_steps,
                seed=request.seed,
            )
            files["grid"] = save_grid(samples, tmp / "scenes.png", columns=4, labels=prompts)
            log_data = json.loads((tmp / "log.json").read_text())
            score = log_data.get("score")
            why = _why(request.path, log_data, self.encoder is not None)
            metadata = {
                "token": token,
                "trigger word (file name)": trigger,
                "class word": class_word,
                "model": str(model.source),
                "family": model.family,
                "path": log_data.get("path_taken", "classic"),
                "steps": log_data["steps_done"],
                "seconds": round(time.perf_counter() - started, 1),
                "check": log_data.get("check"),
                "check score": None if score is None else round(score, 4),
                "threshold": log_data.get("threshold"),
                "images": len(images),
            }
            # log.json names the files where they will be once the folder is in place.
            folder = session_dir / trigger
            log_data["files"] = {
                name: str(folder / path.relative_to(tmp)) for name, path in files.items()
            }
            files["metadata"] = atomic_write_text(
                tmp / "log.json", json.dumps(log_data, indent=2) + "\n"
            )
            report({"stage": "done"})  # a cancel up to here leaves nothing behind
        return LearnOutput(
            folder=folder,
            token=token,
            trigger=trigger,
            files={name: folder / path.relative_to(tmp) for name, path in files.items()},
            images=sorted((folder / "images").glob("*.png")),
            why=why,
            summary=summary,
            metadata=metadata,
        )

    # -- try it ----------------------------------------------------------------------------

    def try_it(
        self,
        prompt: str,
        embeddings: Sequence[str | Path],
        *,
        seed: int = 0,
        steps: int = 30,
        guidance: float = 5.0,
        num: int = 4,
    ) -> list:
        """Sample `num` images of a prompt with the given token files (`generate`'s path)."""
        import warnings

        from ..generate import generate_with_embeddings

        prompt = (prompt or "").strip()
        if not prompt:
            raise OnewordError("the prompt is empty; write one that uses your token")
        if not 1 <= int(num) <= TRY_MAX_IMAGES or not 1 <= int(steps) <= TRY_MAX_STEPS:
            raise OnewordError(
                f"images must be 1..{TRY_MAX_IMAGES} and steps 1..{TRY_MAX_STEPS}, got "
                f"{num} and {steps}"
            )
        with self.pool.slot() as model, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a prompt without the token is fine
            return generate_with_embeddings(
                model,
                list(embeddings),
                [prompt],
                num_per_prompt=int(num),
                steps=int(steps),
                guidance=float(guidance),
                seed=int(seed),
            )
