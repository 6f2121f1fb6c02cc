"""The Gradio page over a `Service`: `build_app` and `serve` (see `oneword.serve`)."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from ..errors import OnewordError
from .service import (
    DEFAULT_STEPS,
    MAX_FILE_MB,
    MAX_IMAGES,
    MAX_STEPS,
    PATHS,
    TRY_MAX_IMAGES,
    TRY_MAX_STEPS,
    Cancelled,
    LearnOutput,
    LearnRequest,
    Service,
)

log = logging.getLogger("oneword.serve")

# ---------------------------------------------------------------------------------------
# The page


def describe_event(event: dict) -> tuple[str, str]:
    """(stage key, one progress line) for an event of `Service.learn`."""
    stage = event["stage"]
    if stage == "images":
        return stage, f"Images: {event['count']} uploaded, checking and fitting them"
    if stage == "model":
        waiting = "waiting for a free model (queue)" if event["waiting"] else "ready"
        return stage, f"Model: {waiting}"
    if stage == "encoder":
        return stage, f"Encoder: prediction in {event['seconds']:.2f} s"
    if stage in ("refine", "fallback", "classic"):
        name = {
            "refine": "Refinement",
            "fallback": "Fallback (full inversion)",
            "classic": "Classic inversion",
        }[stage]
        loss = "" if event.get("loss") is None else f", loss {event['loss']:.4f}"
        return stage, f"{name}: step {event['step']}/{event['total']}{loss}"
    if stage == "checking":  # replaced by the result line (same key) when it is done
        return (
            f"check-{event['after']}",
            f"Check ({event['check']}, after {event['after']}): scoring the token against the "
            "class word ...",
        )
    if stage == "check":
        sign = "<=" if event["passed"] else ">"
        verdict = "passed" if event["passed"] else "failed"
        then = ", falling back to full inversion" if event["fallback"] else ""
        return (
            f"check-{event['after']}",
            f"Check ({event['check']}, after {event['after']}): score {event['score']:.3f} "
            f"{sign} threshold {event['threshold']:g}, {verdict}{then}",
        )
    if stage == "files":
        return stage, "Files: writing the diffusers, AUTOMATIC1111 and kohya layouts"
    if stage == "scenes":
        return stage, f"New scenes: sampling {event['prompts']} prompts x 4 seeds"
    if stage == "done":
        return stage, "Done."
    return stage, str(event)


class ProgressLog:
    """Progress lines, one per stage, the latest value of each (a step counter updates)."""

    def __init__(self):
        self.lines: dict[str, str] = {}

    def add(self, event: dict) -> None:
        key, line = describe_event(event)
        self.lines[key] = line

    def text(self) -> str:
        return "\n".join(self.lines.values())


LIMITS = (
    f"Limits: 1-{MAX_IMAGES} images (PNG, JPEG, WebP, ...), {MAX_FILE_MB} MB and "
    f"{64_000_000 // 1_000_000} megapixels per image; steps 1-{MAX_STEPS}."
)


def build_app(service: Service):
    """The Gradio page over `service` (not launched)."""
    import gradio as gr

    from ..datasets import world

    model = service.pool.model
    has_encoder = service.encoder is not None
    concepts = [identity.name for identity in world.HELD_OUT]
    path_choices = [(label, key) for key, label in PATHS.items()]
    if not has_encoder:
        path_choices = [(PATHS["classic"], "classic")]

    def session_of(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "local"

    def pick_concept(name):
        if not name:
            return gr.skip(), gr.skip(), gr.skip(), None, "Pick a concept first."
        identity = next(i for i in world.HELD_OUT if i.name == name)
        paths = [str(p) for p in service.concept_images(name)]
        return (
            paths,
            f"<{name}>",
            identity.class_word(),
            name,
            f"World concept {name}: {len(paths)} images (class word {identity.class_word()!r}).",
        )

    def learn(files, token, class_word, path, steps, refine_steps, concept, request: gr.Request):
        session = session_of(request)
        images = [getattr(f, "name", f) for f in (files or [])]
        job = LearnRequest(
            images=images,
            token=token,
            class_word=class_word,
            path=path,
            steps=int(steps or 0),
            refine_steps=int(refine_steps or 0),
            concept=concept or None,  # cleared when the user uploads or clears images
        )
        flag = service.cancel_flag(session)
        events: queue.Queue = queue.Queue()
        box: dict = {}

        def work():
            try:
                box["out"] = service.learn(job, session, progress=events.put, cancel=flag)
                log.info("session %s: learned %s in %s", session, job.token, box["out"].folder)
            except Cancelled as error:
                box["error"] = error
                log.info("session %s: job cancelled, nothing written", session)
            except BaseException as error:  # reported in the page, never a dead worker
                box["error"] = error
                if not isinstance(error, OnewordError):
                    log.exception("session %s: job failed", session, exc_info=error)
            finally:
                events.put(None)

        worker = threading.Thread(target=work, name=f"learn-{session}", daemon=True)
        worker.start()
        progress, keep = ProgressLog(), gr.skip()
        finished = False
        try:
            while not finished:
                try:  # drain what arrived, then show it (a step may take milliseconds)
                    event = events.get(timeout=0.3)
                    while event is not None:
                        progress.add(event)
                        event = events.get_nowait()
                    finished = True
                except queue.Empty:
                    pass
                yield (progress.text(), keep, keep, keep, keep, keep, keep, keep, keep, keep)
        finally:
            # Closed before the job ended (the tab went away): stop the worker too.
            if not finished:
                flag.set()
                log.info("session %s: page gone, cancelling its job", session)
        worker.join()
        error = box.get("error")
        if isinstance(error, Cancelled):
            yield (f"{progress.text()}\nStopped: nothing was written.",) + (keep,) * 9
            return
        if error is not None:
            message = str(error) if isinstance(error, OnewordError) else repr(error)
            text = f"Error: {message}\nNothing was written; the page is ready for another try."
            yield (text,) + (keep,) * 9
            return
        out: LearnOutput = box["out"]
        files_out = out.files
        yield (
            f"{progress.text()}\n{out.why}",
            f"**{out.why}**  \n`{out.summary}`",
            [str(p) for p in out.images],
            str(files_out["grid"]),
            gr.DownloadButton(
                f"diffusers ({files_out['diffusers'].name})", str(files_out["diffusers"])
            ),
            gr.DownloadButton(
                f"AUTOMATIC1111 ({files_out['a1111'].name})", str(files_out["a1111"])
            ),
            gr.DownloadButton(f"kohya ({files_out['kohya'].name})", str(files_out["kohya"])),
            out.metadata,
            str(files_out["diffusers"]),
            f"a photo of {out.token}",
        )

    def stop(request: gr.Request):
        log.info("session %s: stop (Stop pressed or page closed)", session_of(request))
        service.cancel(session_of(request))

    def try_it(prompt, learned, uploaded, seed, steps, guidance, num):
        embeddings = [p for p in (learned, getattr(uploaded, "name", uploaded)) if p]
        try:
            images = service.try_it(
                prompt,
                embeddings,
                seed=int(seed),
                steps=int(steps),
                guidance=guidance,
                num=int(num),
            )
        except OnewordError as error:
            return gr.skip(), f"Error: {error}"
        tokens = ", ".join(Path(p).name for p in embeddings) or "no token file"
        return images, f"{len(images)} images of `{prompt}` with {tokens}, seed {int(seed)}"

    # Gradio finds the request parameter by its type; this module's annotations are strings.
    for handler in (learn, stop):
        handler.__annotations__["request"] = gr.Request

    encoder_line = (
        f"concept encoder `{service.encoder_path}`" if has_encoder else "no concept encoder"
    )
    # Uploads and results are copied into Gradio's cache: clear files older than a day, hourly.
    with gr.Blocks(title="oneword", delete_cache=(3600, 24 * 3600)) as app:
        gr.Markdown(
            "# oneword: a new word from a few images\n"
            f"Model: `{model.source}` ({model.family}, {model.resolution} px), {encoder_line}. "
            f"{service.concurrency} job(s) at a time; more wait in a queue. {LIMITS}"
        )
        concept_state = gr.State(None)
        learned_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("## Learn")
                files = gr.File(
                    label=f"Images of the concept (1-{MAX_IMAGES}, drag and drop)",
                    file_count="multiple",
                    elem_id="images",
                )
                with gr.Row():
                    concept = gr.Dropdown(
                        concepts,
                        value=concepts[0],
                        label="or a held-out concept of the built-in world",
                        elem_id="concept",
                        scale=3,
                    )
                    use_concept = gr.Button("Use it", elem_id="use-concept", scale=1)
                with gr.Row():
                    token = gr.Textbox(label="Token name", value="<my-concept>", elem_id="token")
                    class_word = gr.Textbox(
                        label="Class word", value="object", elem_id="class-word"
                    )
                path = gr.Radio(
                    path_choices,
                    value="auto" if has_encoder else "classic",
                    label="Path",
                    elem_id="path",
                )
                with gr.Row():
                    steps = gr.Number(
                        DEFAULT_STEPS,
                        label=f"Classic / fallback steps (1-{MAX_STEPS})",
                        precision=0,
                        elem_id="steps",
                    )
                    refine_steps = gr.Number(
                        service.encode_config.refine_steps,
                        label="Refinement steps",
                        precision=0,
                        elem_id="refine-steps",
                        visible=has_encoder,
                    )
                with gr.Row():
                    learn_button = gr.Button("Learn the token", variant="primary", elem_id="learn")
                    stop_button = gr.Button("Stop", elem_id="stop")
                status = gr.Textbox(label="Progress", lines=8, interactive=False, elem_id="status")
            with gr.Column(scale=2):
                gr.Markdown("## Result")
                why = gr.Markdown(elem_id="why")
                with gr.Row():
                    training = gr.Gallery(
                        label="Training images", columns=2, height=480, elem_id="training"
                    )
                    # The grid labels its own rows with their prompts.
                    grid = gr.Image(
                        label="New scenes",
                        show_label=False,
                        type="filepath",
                        height=480,
                        elem_id="grid",
                    )
                with gr.Row():
                    download_diffusers = gr.DownloadButton(
                        "diffusers", elem_id="download-diffusers"
                    )
                    download_a1111 = gr.DownloadButton("AUTOMATIC1111", elem_id="download-a1111")
                    download_kohya = gr.DownloadButton("kohya", elem_id="download-kohya")
                metadata = gr.JSON(label="Metadata", elem_id="metadata")
                gr.Markdown("## Try it")
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", scale=3, elem_id="prompt")
                    token_file = gr.File(
                        label="Token file (optional, any layout)", scale=1, elem_id="token-file"
                    )
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    try_steps = gr.Slider(1, TRY_MAX_STEPS, 30, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 12.0, 5.0, step=0.5, label="Guidance")
                    num = gr.Slider(1, TRY_MAX_IMAGES, 4, step=1, label="Images")
                try_button = gr.Button("Generate", elem_id="generate")
                try_status = gr.Markdown(elem_id="try-status")
                gallery = gr.Gallery(label="Images", columns=4, height=260, elem_id="gallery")

        use_concept.click(
            pick_concept, [concept], [files, token, class_word, concept_state, status]
        )
        files.upload(lambda: None, None, [concept_state])
        files.clear(lambda: None, None, [concept_state])
        learn_button.click(
            lambda: "Queued: waiting for a free model.", None, [status], queue=False
        ).then(
            learn,
            [files, token, class_word, path, steps, refine_steps, concept_state],
            [
                status,
                why,
                training,
                grid,
                download_diffusers,
                download_a1111,
                download_kohya,
                metadata,
                learned_state,
                prompt,
            ],
            concurrency_id="model",
            concurrency_limit=service.concurrency,
        )
        # Stop sets the job's cancel flag (no `cancels=`): the job ends at its next step and
        # the page still gets its last message, "Stopped: nothing was written".
        stop_button.click(stop, None, None, queue=False)
        try_button.click(
            try_it,
            [prompt, learned_state, token_file, seed, try_steps, guidance, num],
            [gallery, try_status],
            concurrency_id="model",
            concurrency_limit=service.concurrency,
        )
        # A closed or reloaded tab: stop its job at the next step (queued ones are dropped
        # by Gradio's queue itself).
        app.unload(stop)
    return app


def serve(
    model: str,
    *,
    encoder: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    out: str | Path = "runs/serve",
    concurrency: int = 1,
    device: str | None = None,
) -> None:
    """Load the model, build the page and serve it until interrupted (blocking)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OnewordError("the web page needs Gradio: pip install 'oneword[serve]'") from None
    service = Service(model, encoder=encoder, out=out, concurrency=concurrency, device=device)
    app = build_app(service)
    service.out.mkdir(parents=True, exist_ok=True)
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    print(f"oneword serve: http://{host}:{port} (model {model}, out {service.out})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: the page has no login; anyone who can reach it can use it and "
            "download what it wrote",
            host,
        )
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{MAX_FILE_MB}mb",
        allowed_paths=[str(service.out)],
        show_error=True,
        quiet=True,
        share=False,
    )
