"""Merge `oneword eval` runs made with the same suite, seed and sampling into one report.

Methods are added run by run; a method present in a later run replaces the earlier one
(e.g. the encoder rows after the encoder was retrained). The merged `results.json` keeps,
per method, the run it came from (`source`: folder, commit, date, threads). Fallback-check
columns are kept only for methods scored with the last run's check, so one table never mixes
two checks. Runs that differ in suite, concepts, seed, samples, steps or guidance are refused.

    python benchmarks/merge_eval.py benchmarks/results/eval-world \\
        runs/eval-v2-classic3000 runs/eval-v2 runs/ablate-encoder/eval-distill0.1-offset6 \\
        runs/eval-v2-enc2-refine

Writes OUT/results.json, results.md and tradeoff.png (and check.png), and copies each
method's grid into OUT/grids/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

SAME = ("suite", "concepts", "seed", "samples", "steps", "guidance", "model")


def merge(runs: list[Path]) -> tuple[dict, dict[str, Path]]:
    """Merged results and, per method, the grid file it came with (if any)."""
    from oneword.errors import OnewordError

    merged: dict | None = None
    grids: dict[str, Path] = {}
    for run in runs:
        path = run / "results.json"
        if not path.is_file():
            raise OnewordError(f"{path} is missing: give folders written by oneword eval")
        results = json.loads(path.read_text())
        if merged is None:
            merged = {**results, "methods": {}}
        for key in SAME:
            if str(results.get(key)) != str(merged.get(key)):
                raise OnewordError(
                    f"{path}: {key} is {results.get(key)!r}, but the first run's is "
                    f"{merged.get(key)!r}; merge only runs made with the same settings"
                )
        check = results.get("config", {}).get("check") or "loss"
        for label, method in results["methods"].items():
            method = dict(method)
            method["source"] = {
                "run": str(run),
                "commit": results.get("commit"),
                "date": results.get("date"),
                "check": check,
            }
            merged["methods"][label] = method
            if method.get("grid"):
                grids[label] = run / method["grid"]
        merged["config"] = results.get("config", {})
        merged["commit"], merged["date"] = results.get("commit"), results.get("date")
    assert merged is not None
    last_check = merged["config"].get("check") or "loss"
    for method in merged["methods"].values():
        if method["source"]["check"] != last_check:  # one check per table
            method["fallback"] = None
            method["check_score"] = None
            for row in method.get("per_concept", []):
                row["check_score"] = None
    merged["merged_from"] = [str(run) for run in runs]
    return merged, grids


def main(argv: list[str] | None = None) -> int:
    from oneword.evaluation.report import write_report
    from oneword.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the merged report")
    parser.add_argument("runs", type=Path, nargs="+", help="oneword eval output folders")
    args = parser.parse_args(argv)
    merged, grids = merge(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    for label, grid in grids.items():
        if grid.is_file():
            target = args.out / "grids" / grid.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, target)
            merged["methods"][label]["grid"] = f"grids/{grid.name}"
    atomic_write_text(args.out / "results.json", json.dumps(merged, indent=1))
    written = write_report(merged, args.out)
    sources = ["", "Sources (`benchmarks/merge_eval.py`):", ""]
    for label, method in merged["methods"].items():
        source = method["source"]
        sources.append(
            f"- {label}: `{source['run']}` (commit {str(source['commit'])[:7]}, "
            f"{source['date']}, check {source['check']})"
        )
    table = (args.out / "results.md").read_text() + "\n".join(sources) + "\n"
    atomic_write_text(args.out / "results.md", table)
    print((args.out / "results.md").read_text())
    print("wrote", ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
