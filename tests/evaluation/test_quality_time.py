"""The quality-time report on synthetic rows: classic's plateau, the seconds to first reach
it, standard errors over concepts, the table and the log-time plot."""

from __future__ import annotations

import pytest
from PIL import Image

from oneword.evaluation.report import (
    choose_threshold,
    classic_plateau,
    draw_agreement_lines,
    encoder_target_lines,
    encoder_targets,
    format_table,
    paired_difference,
    plot_quality_time,
    quality_time_lines,
    standard_error,
    write_report,
)


def _method(label: str, identities: list[float], seconds: float, editability: float) -> dict:
    name, _, arg = label.partition(":")
    steps = int(arg.split(":")[0]) if arg and arg.split(":")[0].isdigit() else None
    rows = [
        {"concept": f"c{i}", "identity": v, "editability": editability, "seconds": seconds}
        for i, v in enumerate(identities)
    ]
    return {
        "method": name,
        "arg": arg or None,
        "steps": steps,
        "identity": sum(identities) / len(identities),
        "editability": editability,
        "seconds_per_concept": seconds,
        "per_concept": rows,
    }


def _results() -> dict:
    # Classic rises to 0.5 at 100 steps and stays there (150: the same mean, later).
    methods = {
        "classword": _method("classword", [0.0, 0.0, 0.0, 0.0], 0.0, 0.1),
        "classic:10": _method("classic:10", [0.0, 0.25, 0.25, 0.0], 1.0, 0.2),
        "classic:50": _method("classic:50", [0.25, 0.5, 0.5, 0.5], 5.0, 0.3),
        "classic:100": _method("classic:100", [0.5, 0.5, 0.5, 0.5], 10.0, 0.35),
        "classic:150": _method("classic:150", [0.25, 0.75, 0.5, 0.5], 15.0, 0.4),
        "encoder": _method("encoder", [0.25, 0.25, 0.5, 0.5], 0.05, 0.3),
        "encoder+refine:10": _method("encoder+refine:10", [0.5, 0.5, 0.5, 0.75], 0.5, 0.36),
    }
    return {
        "suite": "runs/suite-test",
        "model": "checkpoints/world",
        "family": "sd1",
        "device": "cpu",
        "samples": 4,
        "seed": 0,
        "concepts": ["c0", "c1", "c2", "c3"],
        "methods": methods,
    }


def test_standard_error_over_concepts():
    method = _method("classic:50", [0.25, 0.5, 0.5, 0.5], 5.0, 0.3)
    # mean 0.4375, sample variance 0.015625, n 4 -> se 0.0625
    assert standard_error(method, "identity") == pytest.approx(0.0625)
    assert standard_error(method, "editability") == pytest.approx(0.0)
    assert standard_error(_method("x", [0.5], 1.0, 0.1), "identity") is None


def test_classic_plateau_and_the_seconds_to_first_reach_it():
    plateau = classic_plateau(_results()["methods"])
    assert plateau["identity"] == pytest.approx(0.5)
    assert plateau["label"] == "classic:100"  # the first to reach 0.5, not 150 (also 0.5)
    assert plateau["seconds"] == pytest.approx(10.0) and plateau["steps"] == 100
    assert plateau["editability"] == pytest.approx(0.35)
    assert plateau["identity_se"] == pytest.approx(0.0)
    # Within one standard error: classic:100 has se 0, so it is classic:100 again; with a
    # noisier plateau, classic:50 (0.4375) would count.
    assert plateau["within_se"]["label"] == "classic:100"
    methods = _results()["methods"]
    methods["classic:100"] = _method("classic:100", [0.25, 0.75, 0.75, 0.25], 10.0, 0.35)
    methods["classic:150"] = _method("classic:150", [0.25, 1.0, 0.75, 0.25], 15.0, 0.4)
    noisy = classic_plateau(methods)
    assert noisy["label"] == "classic:150" and noisy["identity"] == pytest.approx(0.5625)
    assert noisy["within_se"]["label"] == "classic:50"  # 0.4375 >= 0.5625 - 0.1875
    assert classic_plateau({"encoder": methods["encoder"]}) is None


def test_the_quality_time_table_and_plot(tmp_path):
    results = _results()
    lines = quality_time_lines(results)
    text = "\n".join(lines)
    assert "first reached after 10 s per concept" in text
    encoder = next(line for line in lines if line.startswith("| encoder |"))
    # identity 37.5% ± 7.2, 75% of the plateau, 200x less time than classic needed.
    assert "37.5% ± 7.2" in encoder and "| 75% |" in encoder and "200.0x" in encoder
    refine = next(line for line in lines if line.startswith("| encoder+refine:10 |"))
    assert "| 112% |" in refine and "20.0x" in refine
    # Paired against the plateau (classic:100, 0.5 on every concept): -12.5 ± 7.2 and +6.2 ±
    # 6.2 identity points, -5.0 and +1.0 editability points (no spread: no error bar).
    assert "| -12.5 ± 7.2 | -5.0 ± 0.0 |" in encoder
    assert "| +6.2 ± 6.2 | +1.0 ± 0.0 |" in refine
    # At equal steps: encoder+refine:10 against classic:10, +43.8 ± 12.0 and +16.0 points.
    assert "| 10 | +43.8 ± 12.0 | +16.0 ± 0.0 | 0.50 / 1.00 |" in text
    assert text in format_table(results)  # results.md holds it
    path = plot_quality_time(results, tmp_path / "quality_time.png")
    with Image.open(path) as image:
        assert image.size[0] > image.size[1] > 300
    written = write_report(results, tmp_path / "report")
    assert written["quality_time"].is_file() and (tmp_path / "report" / "results.md").is_file()
    # Without timed rows there is no plot and no table.
    empty = {**results, "methods": {}}
    assert plot_quality_time(empty, tmp_path / "none.png") is None
    assert quality_time_lines(empty) == []


def test_paired_difference_uses_only_the_concepts_both_measured():
    a = _method("encoder", [0.25, 0.5, 1.0], 0.05, 0.3)
    b = _method("classic:100", [0.5, 0.5], 10.0, 0.35)  # concepts c0, c1 only
    d = paired_difference(a, b, "identity")
    assert d["n"] == 2 and d["mean"] == pytest.approx(-0.125)
    assert d["se"] == pytest.approx(0.125)  # differences -0.25 and 0: sd 0.177 / sqrt(2)
    assert paired_difference(a, {"per_concept": []}, "identity") is None
    one = paired_difference(a, _method("x", [0.0], 1.0, 0.1), "identity")
    assert one["n"] == 1 and one["se"] is None


def test_the_encoder_targets_say_met_or_missed_by_how_much():
    results = _results()
    lines = encoder_target_lines(results)
    alone = next(line for line in lines if line.startswith("- encoder alone"))
    # 75% of the plateau (missed), editability 5 points under it (missed), 0.05 s (met).
    assert "identity 75% of the plateau's (target >= 90%: **missed**)" in alone
    assert "editability -5.0 ± 0.0 points against the plateau's (target >= 0: **missed**)" in alone
    assert "0.05 s per concept (target < 0.1 s: met)" in alone
    refine = next(line for line in lines if line.startswith("- encoder+refine:10"))
    assert "identity +6.2 ± 6.2 points (met)" in refine
    assert "editability +1.0 ± 0.0 points (met)" in refine
    assert "20.0x less time" in refine and "(target >= 20x: met)" in refine
    # Slower refinement misses the speed target; lower identity misses by more than one se.
    methods = results["methods"]
    methods["encoder+refine:10"] = _method("encoder+refine:10", [0.25, 0.25, 0.25, 0.5], 1.0, 0.36)
    refine = next(line for line in encoder_target_lines(results) if "refine:10" in line)
    assert "identity -18.8 ± 6.2 points (**missed**)" in refine
    assert "10.0x less time" in refine and "(target >= 20x: **missed**)" in refine
    # A noisy plateau also gets the speed-up against its first point within one standard
    # error: classic:150 at 0.75 on one concept makes 0.625 the best, se 0.125, and
    # classic:100 (0.5, 10 s) the first within it.
    noisy = {**methods, "classic:150": _method("classic:150", [0.5, 1.0, 0.5, 0.5], 15.0, 0.4)}
    refine = next(
        line for line in encoder_target_lines({**results, "methods": noisy}) if "refine:10" in line
    )
    assert "15.0x less time" in refine and "; 10.0x against classic:100, the first within" in refine
    # The fallback check: 4 of 5 wrong concepts sent is enough, 2 of 10 right ones too many.
    rates = {"threshold": 0.775, "wrong": 5, "wrong_flagged": 4, "right": 10, "right_flagged": 2}
    methods["encoder"]["fallback"] = rates
    check = next(line for line in encoder_target_lines(results) if "fallback" in line)
    assert "on encoder's tokens (threshold 0.775)" in check
    assert "sends 4/5 (80%) of the wrong concepts (target >= 80%: met)" in check
    assert "2/10 (20%) of the right ones (target <= 10%: **missed**)" in check
    # More than 10 refinement steps are not held to these targets; no encoder rows, no lines.
    methods["encoder+refine:50"] = _method("encoder+refine:50", [1.0] * 4, 2.0, 0.5)
    assert not any("refine:50" in line for line in encoder_target_lines(results))
    only_classic = {k: v for k, v in methods.items() if k.startswith("classic")}
    assert encoder_target_lines({**results, "methods": only_classic}) == []


def test_two_draws_agree_or_not_within_two_standard_errors(tmp_path):
    import copy
    import importlib.util
    import json
    from pathlib import Path

    first = _results()
    second = copy.deepcopy(first)
    methods = second["methods"]
    # The second draw: the same plateau (classic:100, 0.5); the encoder alone 0.25 lower on
    # every concept against it; refinement's identity the same against the plateau.
    methods["encoder"] = _method("encoder", [0.0, 0.0, 0.25, 0.25], 0.05, 0.3)
    lines = draw_agreement_lines(first, second, ("seed 0", "seed 1"))
    assert lines[0].startswith("Classic's plateau: classic:100 in seed 0 (50.0% identity")
    row = {}  # the first table's rows (the verdicts' table starts with the same labels)
    for line in lines:
        if line.startswith("| "):
            row.setdefault(line.split(" | ")[0][2:], line)
    # identity vs plateau: seed 0 -12.5 ± 7.2 (differences -.25 -.25 0 0), seed 1 -37.5 ±
    # 7.2; change -25.0 ± 10.2 (quadrature): outside two standard errors.
    assert "| -12.5 ± 7.2 | -37.5 ± 7.2 | -25.0 ± 10.2 | **no** |" in row["encoder"]
    assert row["encoder+refine:10"].count("| yes |") == 2
    assert row["classic:100"].startswith("| classic:100 | +0.0 ± 0.0 | +0.0 ± 0.0 | +0.0 ± 0.0 |")
    # The targets: 75% -> 38% of the plateau's identity, missed in both (same verdict).
    verdicts = [line for line in lines if line.startswith("| encoder alone |")]
    assert "| encoder alone | identity | **missed** | **missed** | yes |" in verdicts
    assert len(verdicts) == 3  # identity, editability, seconds
    checks = {t["subject"]: t["checks"] for t in encoder_targets(first)}
    assert checks["encoder+refine:10"] == {"identity": True, "editability": True, "speed": True}
    # A draw without classic rows says nothing.
    bare = {**second, "methods": {"encoder": methods["encoder"]}}
    assert draw_agreement_lines(first, bare, ("a", "b")) == []
    # The script: two report folders in, one markdown section out.
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_draws.py"
    spec = importlib.util.spec_from_file_location("compare_draws", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, results in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    out = tmp_path / "draws.md"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--names", "seed 0", "seed 1"]
    assert script.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Two draws: seed 0 and seed 1") and row["encoder"] in text
    (tmp_path / "b" / "results.json").write_text("[]")
    with pytest.raises(SystemExit, match="is not an `oneword eval` results.json"):
        script.main(argv)


def _scored(pairs: list[tuple[float, float]]) -> list[dict]:
    return [{"concept": f"c{i}", "identity": v, "check_score": c} for i, (v, c) in enumerate(pairs)]


def test_choose_threshold_meets_both_fallback_targets_when_it_can():
    # Wrong ones (identity < 0.5) score 1.0 .. 1.4, right ones 0.5 .. 0.95. 4 of 5 wrong
    # ones sent needs t < 1.1; at most 1 of 10 right ones sent needs t >= 0.9.
    rows = _scored(
        [(0.0, 1.0 + 0.1 * i) for i in range(5)] + [(1.0, 0.5 + 0.05 * i) for i in range(10)]
    )
    chosen = choose_threshold(rows)
    assert chosen["met"] and chosen["interval"] == pytest.approx([0.9, 1.1])
    assert chosen["threshold"] == pytest.approx(1.0)
    # 10 wrong, 10 right, overlapping: sending >= 8 wrong needs t < 0.3 (the 8th highest
    # wrong score); sparing all but 1 right needs t >= 0.8 (the 2nd highest right score).
    wrong = [(0.0, s) for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    right = [(1.0, s) for s in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    chosen = choose_threshold(_scored(wrong + right))
    assert not chosen["met"] and chosen["interval"] is None
    assert 0.2 < chosen["threshold"] < 0.3  # still catches 8 of the 10 wrong ones
    flagged = sum(r["check_score"] > chosen["threshold"] for r in _scored(wrong))
    assert flagged == 8
    # The other end: at 0.8 only the right one scoring 0.9 is sent, and 2 of the wrong ones.
    assert chosen["spare"] == pytest.approx(0.8)
    assert sum(r["check_score"] > chosen["spare"] for r in _scored(right)) == 1
    assert sum(r["check_score"] > chosen["spare"] for r in _scored(wrong)) == 2
    assert choose_threshold(_scored(right)) is None  # no wrong concept: nothing to choose
