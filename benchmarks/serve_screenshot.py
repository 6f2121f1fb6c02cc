"""Screenshot of `oneword serve` after a run (docs/img/serve.png), with the browser tests' code.

Starts `oneword serve` on the miniature world (its encoder, the default path: encoder +
refinement with the automatic fallback), picks a held-out world concept with one click,
learns its token, tries a prompt, and saves a full-page screenshot. Headless Chromium on
127.0.0.1 only; the server is stopped at the end.

    python benchmarks/serve_screenshot.py --out docs/img/serve.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serve"))

from serve_page import (  # noqa: E402
    chromium,
    fill,
    open_page,
    running_server,
    start,
    wait_status,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Relative to the repository (the server runs there), as the page then shows them.
    parser.add_argument("--model", default="checkpoints/world")
    parser.add_argument("--encoder", default="checkpoints/world-encoder.safetensors")
    parser.add_argument("--concept", default="red-circle-concentric", help="held-out world concept")
    parser.add_argument("--steps", type=int, default=150, help="fallback steps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "serve.png")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        with (
            running_server(args.model, Path(work) / "out", encoder=args.encoder) as server,
            chromium() as browser,
        ):
            page = open_page(browser, server.url, viewport=(1400, 900))
            page.locator("#concept input").fill(args.concept)
            page.locator("#concept input").press("Enter")
            page.locator("#use-concept").click()
            page.locator("#images td.filename").nth(4).wait_for(timeout=60_000)
            fill(page, "steps", args.steps)
            start(page)
            text = wait_status(page, r"Path taken|Error", timeout=900)
            print(text)
            page.locator("#grid img").wait_for(timeout=60_000)
            token = f"<{args.concept}>"
            fill(page, "prompt", f"a photo of {token} on a green background")
            page.locator("#generate").click()
            page.locator("#try-status").get_by_text("images of").wait_for(timeout=120_000)
            page.wait_for_timeout(1000)  # let the gallery paint
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
