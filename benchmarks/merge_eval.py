"""Merge `oneword eval` runs made with the same suite, seed and sampling into one report.

Methods are added run by run; a method present in a later run replaces the earlier one
(e.g. the encoder rows after the encoder was retrained). The merged `results.json` keeps,
per method, the run it came from (`source`: folder, commit, date, threads). Fallback-check
columns are kept only for methods scored with the last run's check and are rated at its
threshold, so one table never mixes two checks or two thresholds. Runs that differ in suite,
concepts, seed, samples, steps or guidance are refused.

    python benchmarks/merge_eval.py runs/eval-merged runs/eval-classic runs/eval-encoder

A run given as FOLDER=TAG has its labels prefixed ("TAG/encoder"), so runs of the same
methods with different encoders (the ablation arms) share one table:

    python benchmarks/merge_eval.py runs/eval-arms runs/eval-a=regress runs/eval-b=shipped

With --pool, runs over disjoint sets of the suite's concepts are joined: the runs are
grouped by concept set, each group is merged as above, and every method present in every
group gets its per-concept rows pooled and its means recomputed over all of them (e.g. the
first 12 concepts from four runs plus concepts 13-24 from a fifth). Methods missing from a
group are left out of the pooled table, since their means would be over other concepts.
The report of world v3.1's 24 concepts was made this way from two halves run side by side:

    python benchmarks/merge_eval.py --pool benchmarks/results/world-v3.1/eval/all-24 \\
        runs/eval-v31/eval-a runs/eval-v31/eval-b

--drop LABEL ... leaves methods out of the report (the second test draw's encoder rows of an
earlier encoder at 25 and 50 steps, which its new runs did not score again).

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

SAME = ("suite", "concepts", "seed", "samples", "identity_samples", "steps", "guidance", "model")


def merge(runs: list[Path], tags: dict[Path, str] | None = None) -> tuple[dict, dict[str, Path]]:
    """Merged results and, per method, the grid file it came with (if any). `tags`: per run,
    a prefix for its labels ("TAG/label")."""
    from oneword.errors import OnewordError
    from oneword.evaluation.metrics import fallback_rates

    merged: dict | None = None
    grids: dict[str, Path] = {}
    for run in runs:
        path, results = run / "results.json", _read(run)
        if merged is None:
            merged = {**results, "methods": {}}
        key = _first_difference(results, merged, SAME)
        if key is not None:
            raise OnewordError(
                f"{path}: {key} is {results.get(key)!r}, but the first run's is "
                f"{merged.get(key)!r}; merge only runs made with the same settings"
            )
        check = results.get("config", {}).get("check") or "loss"
        for label, method in results["methods"].items():
            label = f"{tags[run]}/{label}" if tags and tags.get(run) else label
            method = dict(method)
            # A merged report merged again keeps where its rows first came from.
            method["source"] = method.get("source") or {
                "run": str(run),
                "commit": results.get("commit"),
                "date": results.get("date"),
                "check": check,
                "checkpoints": results.get("checkpoints"),
            }
            merged["methods"][label] = method
            if method.get("grid"):
                grids[label] = run / method["grid"]
        merged["config"] = results.get("config", {})
        merged["commit"], merged["date"] = results.get("commit"), results.get("date")
        # The header names the last run's files; each method's source keeps its own.
        merged["checkpoints"] = results.get("checkpoints")
    assert merged is not None
    config = merged["config"]
    last_check = config.get("check") or "loss"
    threshold, right_identity = config.get("check_threshold"), config.get("right_identity", 0.5)
    for method in merged["methods"].values():
        if method["source"]["check"] != last_check:  # one check per table
            method["fallback"] = None
            method["check_score"] = None
            for row in method.get("per_concept", []):
                row["check_score"] = None
        elif method.get("fallback") is not None and threshold is not None:
            # And one threshold: a score does not depend on it, so rows an earlier run rated
            # at its own threshold are rated again at the last run's.
            method["fallback"] = fallback_rates(method["per_concept"], threshold, right_identity)
    merged["merged_from"] = [str(run) for run in runs]
    return merged, grids


def _first_difference(a: dict, b: dict, keys) -> str | None:
    """The first of `keys` whose values differ between two results (as text), else None."""
    return next((key for key in keys if str(a.get(key)) != str(b.get(key))), None)


def _short(commit) -> str:
    """Abbreviated commit(s): "abc1234", "abc1234+dirty", "abc1234 + def5678" for pooled rows."""
    return " + ".join(
        part[:7] + ("+dirty" if part.endswith("+dirty") else "")
        for part in str(commit).split(" + ")
    )


def _read(run: Path) -> dict:
    from oneword.errors import OnewordError

    path = run / "results.json"
    if not path.is_file():
        raise OnewordError(f"{path} is missing: give folders written by oneword eval")
    return json.loads(path.read_text())


def pool(
    runs: list[Path], tags: dict[Path, str] | None = None
) -> tuple[dict, dict[str, Path], list[str]]:
    """Merge runs per concept set, then pool the methods every set has.

    Returns the pooled results, per method the grid of its first group, and the methods
    left out (present in some concept sets only).
    """
    from oneword.errors import OnewordError
    from oneword.evaluation.harness import summarise_method
    from oneword.evaluation.metrics import fallback_rates

    groups: dict[tuple, list[Path]] = {}
    for run in runs:
        groups.setdefault(tuple(_read(run).get("concepts") or ()), []).append(run)
    seen: set[str] = set()
    for concepts in groups:
        if seen & set(concepts):
            raise OnewordError(
                f"--pool needs disjoint concept sets; {sorted(seen & set(concepts))} appear in "
                "two of them (merge runs over the same concepts without --pool)"
            )
        seen |= set(concepts)
    merged = [merge(group, tags) for group in groups.values()]
    first, grids = merged[0][0], merged[0][1]
    for other, _ in merged[1:]:
        key = _first_difference(other, first, [k for k in SAME if k != "concepts"])
        if key is not None:
            raise OnewordError(
                f"--pool: {key} is {other.get(key)!r} in one concept set and "
                f"{first.get(key)!r} in another; pool only runs made with the same settings"
            )
    labels = [label for label in first["methods"] if all(label in m["methods"] for m, _ in merged)]
    left_out = sorted({label for m, _ in merged for label in m["methods"]} - set(labels))
    config = merged[-1][0]["config"]
    threshold, right_identity = config.get("check_threshold"), config.get("right_identity", 0.5)
    pooled = {**first, "methods": {}, "concepts": [c for g in groups for c in g]}
    for label in labels:
        parts = [m["methods"][label] for m, _ in merged]
        rows = [row for part in parts for row in part.get("per_concept", [])]
        method = summarise_method(label, rows, parts[0].get("grid"))
        checks = {part["source"]["check"] for part in parts}
        same_check = len(checks) == 1 and all(part.get("fallback") is not None for part in parts)
        method["fallback"] = (
            fallback_rates(rows, threshold, right_identity)
            if same_check and threshold is not None
            else None
        )
        method["source"] = {
            "run": " + ".join(part["source"]["run"] for part in parts),
            "commit": " + ".join(str(part["source"]["commit"]) for part in parts),
            "date": parts[-1]["source"]["date"],
            "check": checks.pop() if len(checks) == 1 else "mixed",
            "checkpoints": parts[-1]["source"].get("checkpoints"),
        }
        pooled["methods"][label] = method
    pooled["commit"] = " + ".join(dict.fromkeys(str(m.get("commit")) for m, _ in merged))
    pooled["merged_from"] = [str(run) for run in runs]
    return pooled, {k: v for k, v in grids.items() if k in labels}, left_out


def main(argv: list[str] | None = None) -> int:
    from oneword.evaluation.report import write_report
    from oneword.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the merged report")
    parser.add_argument(
        "runs", nargs="+", help="oneword eval output folders, each optionally FOLDER=TAG"
    )
    parser.add_argument(
        "--pool", action="store_true", help="join runs over disjoint concept sets (see above)"
    )
    parser.add_argument(
        "--drop",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="methods to leave out, e.g. an earlier encoder's rows no later run replaces",
    )
    args = parser.parse_args(argv)
    runs, tags = [], {}
    for spec in args.runs:
        folder, _, tag = spec.rpartition("=") if "=" in spec else (spec, "", "")
        runs.append(Path(folder))
        tags[Path(folder)] = tag
    left_out: list[str] = []
    if args.pool:
        merged, grids, left_out = pool(runs, tags)
    else:
        merged, grids = merge(runs, tags)
    unknown = sorted(set(args.drop) - set(merged["methods"]))
    if unknown:
        parser.error(f"--drop: no method {', '.join(unknown)} in these runs")
    for label in args.drop:
        del merged["methods"][label]
        grids.pop(label, None)
    args.out.mkdir(parents=True, exist_ok=True)
    for label, grid in grids.items():
        if grid.is_file():
            tag = label.partition("/")[0] + "-" if "/" in label else ""  # tagged runs: no clash
            target = args.out / "grids" / f"{tag}{grid.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, target)
            merged["methods"][label]["grid"] = f"grids/{target.name}"
    atomic_write_text(args.out / "results.json", json.dumps(merged, indent=1))
    written = write_report(merged, args.out)
    sources = ["", "Sources (`benchmarks/merge_eval.py`):", ""]
    for label, method in merged["methods"].items():
        source = method["source"]
        encoder = (source.get("checkpoints") or {}).get("encoder")
        sources.append(
            f"- {label}: `{source['run']}` (commit {_short(source['commit'])}, "
            f"{source['date']}, check {source['check']}"
            + (f", encoder `{encoder[:16]}`)" if encoder else ")")
        )
    if left_out:
        sources += ["", f"Left out (not run on every concept set): {', '.join(left_out)}"]
    table = (args.out / "results.md").read_text() + "\n".join(sources) + "\n"
    atomic_write_text(args.out / "results.md", table)
    print((args.out / "results.md").read_text())
    print("wrote", ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
