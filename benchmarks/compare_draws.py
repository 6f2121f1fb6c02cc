"""Do two draws of the quality-time curve lead to the same conclusions?

The encoder issue asks for a second draw: the test suite written with another seed
(`oneword world suite --seed 1`) and scored with `oneword eval --seed 1`. This reads the two
pooled reports and writes one markdown section: each method against its own draw's classic
plateau in both draws (paired over concepts), the change between them and whether it lies
within two standard errors, and every encoder target met or missed in each.

    python benchmarks/compare_draws.py benchmarks/results/world-v3.1/eval/test-seed0 \\
        benchmarks/results/world-v3.1/eval/test-seed1 --names "seed 0" "seed 1" \\
        --out benchmarks/results/world-v3.1/eval/draws.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))


def _results(folder: Path) -> dict:
    path = folder / "results.json" if folder.is_dir() else folder
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"compare_draws.py: error: cannot read {path}: {error}") from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise SystemExit(f"compare_draws.py: error: {path} is not an `oneword eval` results.json")
    return results


def main(argv: list[str] | None = None) -> int:
    from oneword.evaluation.report import draw_agreement_lines
    from oneword.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="the first draw's report folder (or results.json)")
    parser.add_argument("second", type=Path, help="the second draw's")
    parser.add_argument("--names", nargs=2, default=("first", "second"), metavar=("A", "B"))
    parser.add_argument("--out", type=Path, help="write the section here (default: stdout)")
    args = parser.parse_args(argv)
    first, second = _results(args.first), _results(args.second)
    lines = draw_agreement_lines(first, second, tuple(args.names))
    if not lines:
        print("compare_draws.py: error: both reports need classic rows with times", file=sys.stderr)
        return 2
    sources = [
        f"- {name}: `{folder}`, suite `{r.get('suite')}`, seed {r.get('seed')}, "
        f"{len(r.get('concepts', []))} concepts, {r.get('samples')} samples per prompt, "
        f"commit {r.get('commit')}"
        for name, folder, r in zip(
            args.names, (args.first, args.second), (first, second), strict=True
        )
    ]
    text = "\n".join(
        [f"# Two draws: {args.names[0]} and {args.names[1]}", "", *sources, "", *lines]
    )
    if args.out:
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
