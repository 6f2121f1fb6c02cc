"""Encoder arms against a baseline arm, paired over the concepts both scored.

Each arm is one or more `oneword eval` folders (e.g. the two halves `--concepts 0:12` and
`12:24` run side by side) scored with the same suite, seed and sampling. For every method the
baseline and an arm both ran (`encoder`, `encoder+refine:10`, ...), the table gives the arm's
identity and editability over the concepts both scored and its difference from the
baseline's, paired over those concepts, ± one standard error. The rule the encoder rounds
follow (docs/encoder-plan.md): an arm replaces the shipped file only when its
`encoder+refine:10` beats the shipped file's, paired, on the validation split.

    python benchmarks/compare_arms.py --baseline shipped=runs/evalv-shipped \\
        b32-250=runs/evalv-b32-250-a,runs/evalv-b32-250-b --out runs/arms.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

# Settings every run of one table must share (concepts may differ: pairing handles that).
SAME = ("suite", "seed", "samples", "identity_samples", "steps", "guidance", "model")
METRICS = ("identity", "editability")


def load_arm(
    folders: list[Path], reference: tuple[str, dict] | None = None
) -> tuple[dict, dict[str, list[dict]]]:
    """One arm's settings and, per method, its per-concept rows from all its runs. Every run
    must share `SAME` with `reference` (name, settings), or else with the arm's first run; a
    concept scored twice for one method is refused (the halves overlap)."""
    from oneword.errors import OnewordError

    settings: dict | None = None
    rows: dict[str, dict[str, dict]] = {}
    for folder in folders:
        path = folder / "results.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise OnewordError(
                f"{path}: cannot read an `oneword eval` results.json ({error})"
            ) from None
        if settings is None:
            settings = {key: results.get(key) for key in SAME}
        name, expected = reference or (str(folders[0]), settings)
        for key in SAME:
            if str(results.get(key)) != str(expected[key]):
                raise OnewordError(
                    f"{path}: {key} is {results.get(key)!r}, but {name}'s is "
                    f"{expected[key]!r}; compare only runs made with the same settings"
                )
        for label, method in results.get("methods", {}).items():
            seen = rows.setdefault(label, {})
            for row in method.get("per_concept", []):
                if row["concept"] in seen:
                    raise OnewordError(
                        f"{path}: {label} scored {row['concept']} again; give each concept "
                        "once per arm"
                    )
                seen[row["concept"]] = row
    assert settings is not None
    return settings, {label: list(by_concept.values()) for label, by_concept in rows.items()}


def compare(
    baseline: tuple[str, list[Path]],
    arms: list[tuple[str, list[Path]]],
    baseline_method: str | None = None,
) -> str:
    """The markdown table of every arm (the baseline first) against the baseline: each
    method against the baseline's method of the same label, or every method against
    `baseline_method` (e.g. an encoder alone against another with refinement)."""
    from oneword.errors import OnewordError
    from oneword.evaluation.report import _points, paired_difference

    base_name, base_folders = baseline
    base_settings, base_rows = load_arm(base_folders)
    if baseline_method is not None and baseline_method not in base_rows:
        raise OnewordError(
            f"{base_name} has no {baseline_method} rows (it has {', '.join(base_rows)})"
        )
    against = f"{base_name}'s" if baseline_method is None else f"{base_name}'s {baseline_method}"
    lines = [
        f"Against {base_name}, paired over the concepts both scored (± one standard error); "
        f"suite `{base_settings['suite']}`, seed {base_settings['seed']}, "
        f"{base_settings['samples']} samples per prompt"
        + (
            f" ({base_settings['identity_samples']} of the identity prompt)."
            if base_settings["identity_samples"]
            else "."
        ),
        "",
        f"| arm | method | concepts | identity | editability | identity - {against} | "
        f"editability - {against} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    loaded = [(base_name, base_rows)]
    loaded += [(name, load_arm(folders, (base_name, base_settings))[1]) for name, folders in arms]
    for name, rows in loaded:
        labels = list(rows) if baseline_method else [k for k in base_rows if k in rows]
        for label in labels:
            base = base_rows[baseline_method or label]
            ours, theirs = {"per_concept": rows[label]}, {"per_concept": base}
            both = {row["concept"] for row in base}
            common = [row for row in rows[label] if row["concept"] in both]
            means = [
                f"{100 * sum(row[m] for row in common) / len(common):.1f}%" if common else "–"
                for m in METRICS
            ]
            differences = (
                ["–", "–"]
                if name == base_name and baseline_method in (None, label)
                else [_points(paired_difference(ours, theirs, m)) for m in METRICS]
            )
            lines.append(
                f"| {name} | {label} | {len(common)} | {' | '.join(means)} | "
                f"{' | '.join(differences)} |"
            )
    return "\n".join(lines) + "\n"


def _arm(spec: str) -> tuple[str, list[Path]]:
    """NAME=FOLDER[,FOLDER...] -> (NAME, folders)."""
    name, sep, folders = spec.partition("=")
    if not sep or not name or not folders:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=FOLDER[,FOLDER...]")
    return name, [Path(folder) for folder in folders.split(",")]


def main(argv: list[str] | None = None) -> int:
    from oneword.errors import OnewordError
    from oneword.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arms", nargs="+", type=_arm, help="NAME=FOLDER[,FOLDER...] per arm")
    parser.add_argument(
        "--baseline", type=_arm, required=True, help="NAME=FOLDER[,FOLDER...]: the arm to beat"
    )
    parser.add_argument(
        "--baseline-method",
        metavar="LABEL",
        help="pair every method with this one of the baseline (default: the same label)",
    )
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    try:
        table = compare(args.baseline, args.arms, args.baseline_method)
    except OnewordError as error:
        print(f"compare_arms.py: error: {error}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out is not None:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
