"""`oneword serve`: a web page from images to a token file, over the library's Python API.

The page (Gradio, the toolkit AUTOMATIC1111 and Hugging Face Spaces are built on) does what
the command line does, with the same functions: `encode` (encoder, refinement, check,
fallback) or `invert` (classic inversion) to learn, `export_embedding` for the layouts other
tools read, `generate_with_embeddings` to try a token. What lives here is only what a
long-lived, shared server needs on top:

1. `check_request`: the page's limits (count, bytes, pixels, token name), checked before
   any work, each failure one line naming the file or the token.
2. `ModelPool`: `concurrency` copies of the model, each handed to one job at a time and
   reset to its own vocabulary first, so users never see (or collide with) each other's
   tokens.
3. `Service.learn`: one job, written into a temporary folder that becomes
   OUT/<session>/<trigger>/ only when everything is there (a failed or cancelled job leaves
   nothing); its progress callback raises `Cancelled` once the job's cancel flag is set
   (the tab was closed or Stop was pressed), which ends the training loop at its next step.
4. `build_app`: the page; `serve`: build and launch it (`page.py`; 1-3 are `service.py`).

This module sits at the top, beside the CLI: it imports the library, no library module
imports it.
"""

from .page import build_app, describe_event, serve
from .service import (
    MAX_FILE_MB,
    MAX_IMAGES,
    PATHS,
    Cancelled,
    LearnOutput,
    LearnRequest,
    ModelPool,
    Service,
    check_request,
    scene_prompts,
    trigger_word,
)

__all__ = [
    "MAX_FILE_MB",
    "MAX_IMAGES",
    "PATHS",
    "Cancelled",
    "LearnOutput",
    "LearnRequest",
    "ModelPool",
    "Service",
    "build_app",
    "check_request",
    "describe_event",
    "scene_prompts",
    "serve",
    "trigger_word",
]
