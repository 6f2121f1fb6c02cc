"""Write one of a `train_encoder.py` run's checkpoints as an encoder file, to score it.

A run writes `encoder.safetensors` only at its end; a long run is scored on validation along
the way (docs/encoder-plan.md, round 5) from its `checkpoints/step-XXXXXX/` folders. The
encoder's config comes from the run's own log (its "start" record), the weights from the
checkpoint's `head.*` tensors.

    python benchmarks/encoder_from_checkpoint.py runs/arm-denoise-b32-noreg --step 500 \
        --out runs/arm-denoise-b32-noreg/encoder-500.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a train_encoder.py --out folder")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    parser.add_argument("--out", required=True, help="the encoder file to write")
    args = parser.parse_args(argv)

    from oneword.encoder.model import ConceptEncoder, EncoderConfig, save_encoder
    from oneword.errors import OnewordError
    from oneword.inversion import checkpoint as ckpt

    run = Path(args.run)
    try:
        log = (run / "log.jsonl").read_text().splitlines()
        starts = [r for r in map(json.loads, log) if r.get("event") == "start"]
        if not starts:
            raise OnewordError(f"{run / 'log.jsonl'}: no start record (not a train_encoder.py run)")
        found = ckpt.list_checkpoints(run / "checkpoints")
        if args.step is not None:
            found = [p for p in found if p.name == ckpt.checkpoint_name(args.step)]
        if not found:
            kept = ", ".join(p.name for p in ckpt.list_checkpoints(run / "checkpoints"))
            raise OnewordError(
                f"{run / 'checkpoints'}: no checkpoint"
                + (f" of step {args.step} (kept: {kept or 'none'})" if args.step else "")
            )
        path = found[-1]
        tensors, state = ckpt.load_checkpoint(path)
        encoder = ConceptEncoder(EncoderConfig(**starts[-1]["encoder"]))
        encoder.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    except (OSError, OnewordError) as error:
        print(f"encoder_from_checkpoint.py: {error}", file=sys.stderr)
        return 2
    meta = {"run": str(run), "checkpoint": path.name, "step": str(state["step"])}
    save_encoder(args.out, encoder, metadata=meta)
    print(f"{args.out}: step {state['step']} of {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
