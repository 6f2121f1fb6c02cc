"""The benchmark report: a markdown table and the reconstruction-vs-editability plot.

The plot follows Fig. 10 of Gal et al. (2023): editability (text similarity) on the x
axis, reconstruction (image similarity) on the y axis, one labelled point per method and
step count, points of one method joined in step order, so the trade-off that more
optimisation buys is visible at a glance.
"""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import ATTRIBUTE_ORDER

# (x metric, y metric, x label, y label, panel title) for each panel of the plot.
PANELS = (
    (
        "editability",
        "identity",
        "editability (oracle)",
        "identity (oracle)",
        "miniature-world oracle",
    ),
    ("clip_t", "clip_i", "CLIP-T (text similarity)", "CLIP-I (image similarity)", "CLIP"),
)
_COLUMNS = (
    ("identity", "identity", "percent"),
    ("editability", "editability", "percent"),
    ("clip_i", "CLIP-I", "cosine"),
    ("clip_t", "CLIP-T", "cosine"),
    ("dino", "DINO", "cosine"),
    ("seconds_per_concept", "s / concept", "seconds"),
    ("unet_passes_per_concept", "UNet passes / concept", "count"),
    ("peak_memory_mib", "peak MiB", "count"),
)


def _checkpoint_lines(digests: dict) -> list[str]:
    named = [f"{name} `{digest[:16]}`" for name, digest in digests.items() if digest]
    return [f"- checkpoints (SHA-256, first 16 hex): {', '.join(named)}"] if named else []


def _format(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "cosine":
        return f"{value:.3f}"
    if kind == "seconds":
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return f"{value:.0f}"


def format_table(results: dict) -> str:
    """The markdown report: run facts, the main table, the per-attribute table."""
    methods = results["methods"]
    lines = [
        f"# oneword eval: {Path(str(results['suite'])).name}",
        "",
        f"- model: `{results['model']}` ({results.get('family')}), device {results['device']}"
        + (f" ({results['cuda_device']})" if results.get("cuda_device") else ""),
        f"- suite: `{results['suite']}`, {len(results.get('concepts', []))} concepts; "
        f"{results['samples']} samples per prompt"
        + (
            f" ({results['identity_samples']} of the identity prompt)"
            if results.get("identity_samples")
            else ""
        )
        + f", {results.get('steps')} DDIM steps, "
        f"guidance {results.get('guidance')}, seed {results['seed']}",
        f"- scorers: oracle {'yes' if results.get('oracle') else 'no'}, "
        f"CLIP {results.get('clip') or '–'}, DINO {results.get('dino') or '–'}",
        f"- commit {results.get('commit') or 'unknown'}, {results.get('date')}",
        *_checkpoint_lines(results.get("checkpoints") or {}),
        "",
        "| method | " + " | ".join(title for _, title, _ in _COLUMNS) + " |",
        "|---|" + "---:|" * len(_COLUMNS),
    ]
    for label, method in methods.items():
        cells = [_format(method.get(key), kind) for key, _, kind in _COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    attributes = [
        a
        for a in ATTRIBUTE_ORDER
        if any(a in (m.get("per_attribute") or {}) for m in methods.values())
    ]
    if attributes:
        lines += [
            "",
            "Oracle accuracy per attribute (over every sample where the prompt or the "
            "concept fixes the value):",
            "",
            "| method | " + " | ".join(attributes) + " |",
            "|---|" + "---:|" * len(attributes),
        ]
        for label, method in methods.items():
            values = method.get("per_attribute") or {}
            cells = [_format(values.get(a), "percent") for a in attributes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += quality_time_lines(results)
    lines += _fallback_lines(methods, _check_name(results))
    lines += [
        "",
        'identity: samples of "a photo of S*" with the concept\'s shape, colour and pattern; '
        "editability: samples of edit prompts where the edit holds and the identity is kept; "
        "CLIP-I/DINO: mean cosine of samples to the concept's images; CLIP-T: of samples to "
        "their prompt without the token (Gal et al.). Seconds, UNet passes and peak memory "
        "are for learning one token (peak memory: CUDA allocator, or the process's RSS on "
        "the CPU).",
    ]
    return "\n".join(lines) + "\n"


def choose_threshold(
    rows: list[dict], right_identity: float = 0.5, catch: float = 0.8, spare: float = 0.1
) -> dict | None:
    """The fallback threshold to carry from a validation run to the test run.

    The check falls back when score > threshold. Wanted: at least `catch` of the wrong
    concepts (identity < right_identity) sent on and at most `spare` of the right ones.
    Raising the threshold sends fewer of both, so the thresholds that meet both form an
    interval [lowest that spares enough right ones, highest that still catches enough
    wrong ones]; its middle is returned. When the interval is empty the targets cannot
    both be met on these rows: the threshold that catches enough wrong ones is returned
    with met False, and "spare" holds the one that spares enough right ones (a product
    may prefer it: every concept sent on costs a full inversion).

    Args:
        rows: per-concept rows with "check_score" and "identity" (one method's).

    Returns:
        {"threshold", "met", "interval" ([low, high] or None), "spare" (the lowest
        threshold sending <= `spare` of the right ones), "wrong", "right"}, or None without
        scored rows of both kinds.
    """
    scored = [r for r in rows if r.get("check_score") is not None and r.get("identity") is not None]
    wrong = sorted(r["check_score"] for r in scored if r["identity"] < right_identity)
    right = sorted(r["check_score"] for r in scored if r["identity"] >= right_identity)
    if not wrong or not right:
        return None
    # Highest threshold sending >= catch of the wrong ones: just below the score of the
    # ceil(catch * n)-th highest wrong score.
    need = math.ceil(catch * len(wrong) - 1e-9)
    high = wrong[len(wrong) - need] if need else math.inf
    # Lowest threshold sending <= spare of the right ones: at the (floor(spare * n) + 1)-th
    # highest right score, so only the floor(spare * n) above it are sent.
    allowed = math.floor(spare * len(right) + 1e-9)
    low = right[len(right) - allowed - 1] if allowed < len(right) else -math.inf
    met = low < high  # the thresholds in [low, high) meet both targets

    def below(value: float) -> float:
        return value - 1e-6 * max(1.0, abs(value))

    if met and math.isfinite(low) and math.isfinite(high):
        threshold = (low + high) / 2
    elif met and math.isfinite(low):
        threshold = low
    else:  # catch enough wrong ones (met with no lower bound, or not met at all)
        threshold = below(high) if math.isfinite(high) else math.inf
    return {
        "threshold": threshold,
        "met": met,
        "interval": [low, high] if met else None,
        "spare": low,
        "wrong": len(wrong),
        "right": len(right),
    }


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "–"


_CHECK_AXIS = {
    "loss": "denoising loss / class word's",
    "clip": "CLIP image distance of samples / class word's",
}


def _check_name(results: dict) -> str:
    """The check the scores come from ("loss" in results written before --check existed)."""
    return results.get("config", {}).get("check") or "loss"


def _fallback_lines(methods: dict, check: str = "loss") -> list[str]:
    """The fallback check's table: how often it would fall back on right and wrong tokens."""
    rated = {label: m["fallback"] for label, m in methods.items() if m.get("fallback")}
    if not rated:
        return []
    first = next(iter(rated.values()))
    lines = [
        "",
        f"Fallback check (`oneword encode --check {check}`, falls back when the score > "
        f"{first['threshold']:g}); a concept is right when its identity is >= "
        f"{100 * first['right_identity']:.0f}%:",
        "",
        "| method | mean score | wrong concepts sent to the fallback | right concepts sent "
        "to the fallback | wrong ones it sends | threshold for >= 80% / <= 10% here |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, rates in rated.items():
        caught = ", ".join(rates["flagged_wrong"][:4]) + (
            ", ..." if len(rates["flagged_wrong"]) > 4 else ""
        )
        # What a validation run hands to the test run (choose it on validation only).
        chosen = choose_threshold(methods[label].get("per_concept", []), rates["right_identity"])
        threshold = "–"
        if chosen is not None:
            threshold = f"{chosen['threshold']:.3g}" + ("" if chosen["met"] else " (not met)")
        lines.append(
            f"| {label} | {_format(methods[label].get('check_score'), 'cosine')} | "
            f"{_share(rates['wrong_flagged'], rates['wrong'])} | "
            f"{_share(rates['right_flagged'], rates['right'])} | {caught or '–'} | {threshold} |"
        )
    return lines


def plot_check(results: dict, path: str | Path) -> Path | None:
    """Check score against identity, one point per concept and method (None if no scores)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io import atomic_path

    points = {
        label: [
            (r["check_score"], r["identity"])
            for r in method.get("per_concept", [])
            if r.get("check_score") is not None and r.get("identity") is not None
        ]
        for label, method in results["methods"].items()
    }
    points = {label: p for label, p in points.items() if p}
    if not points:
        return None
    figure = Figure(figsize=(5.6, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for index, (label, values) in enumerate(points.items()):
        ax.plot(
            [v[0] for v in values],
            [v[1] for v in values],
            "o",
            color=f"C{index % 10}",
            alpha=0.7,
            label=label,
        )
    config = results.get("config", {})
    if config.get("check_threshold") is not None:
        ax.axvline(config["check_threshold"], color="grey", ls="--", lw=1, label="threshold")
    if config.get("right_identity") is not None:
        ax.axhline(config["right_identity"], color="grey", ls=":", lw=1)
    axis = _CHECK_AXIS.get(_check_name(results), "score")
    ax.set_xlabel(f"check score ({axis}; lower is better)")
    ax.set_ylabel("identity (oracle)")
    ax.set_title("the fallback check against the oracle, one point per concept")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def _steps(method: dict) -> float:
    return method.get("steps") or 0


def _place_labels(ax, points: list[tuple[float, float, str, str]], fontsize: int = 8) -> None:
    """Label each (x, y, text, colour) point without a label covering another label or
    another point's marker.

    Greedy, in display points: each label goes right of its point at the first vertical
    offset (0, -10, +10, -20, ...) whose box misses every marker and every label placed so
    far; a label moved away from its point gets a thin leader line.
    """
    to_points = 72.0 / ax.figure.dpi
    height, char, marker = fontsize * 1.25, fontsize * 0.6, 3.5
    # x0, y0, x1, y1 in points: the markers first (a label starts right of its own one).
    boxes: list[tuple[float, float, float, float]] = []
    for x, y, _, _ in points:
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        boxes.append((px - marker, py - marker, px + marker, py + marker))
    order = sorted(points, key=lambda p: -ax.transData.transform((p[0], p[1]))[1])
    for x, y, text, colour in order:
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        width = char * len(text)
        for shift in [0.0] + [s * k * height for k in range(1, 12) for s in (-1, 1)]:
            box = (px + 5, py + 2 + shift, px + 5 + width, py + 2 + shift + height)
            if not any(
                box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes
            ):
                break
        boxes.append(box)
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(5, 2 + shift),
            fontsize=fontsize,
            arrowprops=(
                {"arrowstyle": "-", "color": colour, "alpha": 0.5, "lw": 0.6}
                if abs(shift) > height
                else None
            ),
        )


def curves(methods: dict, x_key: str, y_key: str) -> dict[str, list[tuple]]:
    """The trade-off figure's curves: curve name -> [(steps, x, y, label)] sorted by steps.

    One curve per method and settings: "encoder+refine:50:lr=1e-2" joins
    "encoder+refine:10:lr=1e-2", not "encoder+refine:50". Methods without both values
    are left out.
    """
    found: dict[str, list] = {}
    for label, method in methods.items():
        x, y = method.get(x_key), method.get(y_key)
        if x is None or y is None:
            continue
        settings = (method.get("arg") or "").partition(":")[2]
        name = f"{method.get('method', label)} {settings}".strip()
        found.setdefault(name, []).append((_steps(method), x, y, label))
    return {name: sorted(points) for name, points in found.items()}


def plot_tradeoff(results: dict, path: str | Path) -> Path | None:
    """Write the trade-off figure (one panel per available metric pair); None if no
    method has any pair measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io import atomic_path

    methods = results["methods"]
    panels = [
        panel
        for panel in PANELS
        if any(
            m.get(panel[0]) is not None and m.get(panel[1]) is not None for m in methods.values()
        )
    ]
    if not panels:
        return None
    # A Figure with its own Agg canvas: no pyplot, no global backend switch.
    figure = Figure(figsize=(5.2 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    colours: dict[str, str] = {}
    to_label = []
    for ax, (x_key, y_key, x_label, y_label, title) in zip(axes, panels):
        labelled = []
        for name, points in curves(methods, x_key, y_key).items():
            colour = colours.setdefault(name, f"C{len(colours) % 10}")
            if len(points) > 1:  # one method at growing step counts: the trade-off curve
                ax.plot(
                    [p[1] for p in points], [p[2] for p in points], "-", color=colour, alpha=0.5
                )
            for _, x, y, label in points:
                ax.plot([x], [y], "o", color=colour)
                labelled.append((x, y, label, colour))
        ax.margins(0.15)
        ax.ticklabel_format(useOffset=False)
        to_label.append((ax, labelled))
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    figure.suptitle(f"reconstruction vs editability: {Path(str(results['suite'])).name}")
    figure.draw_without_rendering()  # final layout first: labels are placed in display space
    for ax, labelled in to_label:
        _place_labels(ax, labelled)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


# ---------------------------------------------------------------------------------------
# Quality against time: classic's plateau and what reaches it how fast


def standard_error(method: dict, metric: str) -> float | None:
    """Standard error over concepts of a metric's mean (sample std / sqrt(n)); None with
    fewer than two concepts measured."""
    values = [r[metric] for r in method.get("per_concept", []) if r.get(metric) is not None]
    return _standard_error(values)


def _standard_error(values: list[float]) -> float | None:
    """Sample std / sqrt(n) of the mean of `values`; None under two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return (variance / len(values)) ** 0.5


def paired_difference(a: dict, b: dict, metric: str) -> dict | None:
    """Method a's metric minus method b's, paired over the concepts both measured: the mean
    difference, its standard error (None under two concepts) and the number of concepts.
    Pairing removes the concepts' own spread, which dominates one method's error bar."""
    first = {r["concept"]: r[metric] for r in a.get("per_concept", []) if r.get(metric) is not None}
    both = [
        first[r["concept"]] - r[metric]
        for r in b.get("per_concept", [])
        if r.get(metric) is not None and r["concept"] in first
    ]
    if not both:
        return None
    return {"mean": sum(both) / len(both), "se": _standard_error(both), "n": len(both)}


def _points(difference: dict | None) -> str:
    """A paired difference of shares in percentage points, e.g. "-4.2 ± 3.1"."""
    if difference is None:
        return "–"
    se = difference["se"]
    return f"{100 * difference['mean']:+.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def classic_plateau(methods: dict, reference: str = "classic") -> dict | None:
    """Classic inversion's plateau and the time it needed to reach it.

    The plateau is the best mean identity over the `reference` method's step counts
    ("classic:10", "classic:25", ...; one run per concept with snapshots, so the seconds
    are those of the run when it passed that step). Two ways of reaching it are given:
    the first step count whose identity equals the best ("reached"), and the first whose
    identity is within one standard error of it ("within_se"), for a noisy curve.

    Returns:
        {"label", "steps", "identity", "identity_se", "editability", "editability_se",
        "seconds", "within_se": {"label", "steps", "seconds", "identity"}}, or None when
        no `reference` row has an identity and a time.
    """
    rows = sorted(
        (
            (m.get("steps") or 0, label, m)
            for label, m in methods.items()
            if m.get("method", label.partition(":")[0]) == reference
            and m.get("identity") is not None
            and m.get("seconds_per_concept") is not None
        ),
        key=lambda row: (row[0], row[1]),
    )
    if not rows:
        return None
    best = max(m["identity"] for _, _, m in rows)
    steps, label, plateau = next(row for row in rows if row[2]["identity"] >= best)
    se = standard_error(plateau, "identity") or 0.0
    near_steps, near_label, near = next(row for row in rows if row[2]["identity"] >= best - se)
    return {
        "label": label,
        "steps": steps,
        "identity": plateau["identity"],
        "identity_se": standard_error(plateau, "identity"),
        "editability": plateau.get("editability"),
        "editability_se": standard_error(plateau, "editability"),
        "seconds": plateau["seconds_per_concept"],
        "within_se": {
            "label": near_label,
            "steps": near_steps,
            "seconds": near["seconds_per_concept"],
            "identity": near["identity"],
        },
    }


def _with_se(method: dict, metric: str) -> str:
    value, se = method.get(metric), standard_error(method, metric)
    if value is None:
        return "–"
    return _format(value, "percent") + (f" ± {100 * se:.1f}" if se is not None else "")


def quality_time_lines(results: dict) -> list[str]:
    """The quality-time table: every method's identity and editability (± one standard error
    over concepts) against its seconds per concept, relative to classic's plateau."""
    methods = results["methods"]
    plateau = classic_plateau(methods)
    if plateau is None:
        return []
    near = plateau["within_se"]
    lines = [
        "",
        f"Quality against time. Classic's plateau: {_format(plateau['identity'], 'percent')} "
        f"identity at {plateau['label']}, first reached after "
        f"{_format(plateau['seconds'], 'seconds')} s per concept (within one standard error "
        f"of it from {near['label']}, {_format(near['seconds'], 'seconds')} s); ± is one "
        "standard error over concepts.",
        "",
        "| method | identity | editability | s / concept | identity / plateau's | identity "
        "- plateau's, paired (points) | editability - plateau's, paired | time to plateau / "
        "time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = methods[plateau["label"]]
    ordered = sorted(
        methods.items(), key=lambda item: (item[1].get("seconds_per_concept") or 0, item[0])
    )
    for label, method in ordered:
        seconds, identity = method.get("seconds_per_concept"), method.get("identity")
        share = "–"
        if identity is not None and plateau["identity"]:
            share = f"{100 * identity / plateau['identity']:.0f}%"
        speed = f"{plateau['seconds'] / seconds:.1f}x" if seconds else "–"
        lines.append(
            f"| {label} | {_with_se(method, 'identity')} | {_with_se(method, 'editability')} | "
            f"{_format(seconds, 'seconds')} | {share} | "
            f"{_points(paired_difference(method, best, 'identity'))} | "
            f"{_points(paired_difference(method, best, 'editability'))} | {speed} |"
        )
    return lines + equal_steps_lines(methods) + encoder_target_lines(results)


def equal_steps_lines(methods: dict) -> list[str]:
    """The encoder's head start at equal step counts: encoder+refine:k minus classic:k (from
    the class word), paired over concepts, for every k both were run at; with their seconds,
    since the refined path also pays for the prediction."""
    pairs = sorted(
        (m["steps"], label)
        for label, m in methods.items()
        if m.get("method") == "encoder+refine"
        and m.get("steps")
        and f"classic:{m['steps']}" in methods
    )
    if not pairs:
        return []
    lines = [
        "",
        "At equal steps, the encoder's start against the class word's (paired over concepts, "
        "points):",
        "",
        "| steps | identity | editability | seconds: encoder + refinement / classic |",
        "|---:|---:|---:|---:|",
    ]
    for steps, label in pairs:
        ours, classic = methods[label], methods[f"classic:{steps}"]
        seconds = (
            f"{_format(ours.get('seconds_per_concept'), 'seconds')} / "
            f"{_format(classic.get('seconds_per_concept'), 'seconds')}"
        )
        lines.append(
            f"| {steps} | {_points(paired_difference(ours, classic, 'identity'))} | "
            f"{_points(paired_difference(ours, classic, 'editability'))} | {seconds} |"
        )
    return lines


# The encoder's targets on the quality-time curve (docs/encoder-plan.md): alone, at least
# this share of classic's plateau identity, no less editability, in under this many seconds;
# with at most this many refinement steps, the plateau's quality (a paired difference no
# lower than minus one standard error) at least this many times sooner than classic.
ALONE_SHARE, ALONE_SECONDS, REFINE_STEPS, SPEEDUP = 0.9, 0.1, 10, 20.0
# The fallback check, at a threshold chosen on validation: it sends at least this share of
# the wrong concepts on to full inversion and at most this share of the right ones.
CATCH, SPARE = 0.8, 0.1


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def encoder_targets(results: dict) -> list[dict]:
    """The encoder's targets checked against classic's plateau in this report: one entry for
    the encoder alone, one per refinement step count up to `REFINE_STEPS` and one per
    encoder method the fallback check rated.

    Returns:
        [{"subject": "encoder alone" | LABEL | "fallback on LABEL", "checks": {name: met},
        "line": the markdown line, saying met or missed and by how much}]; empty without a
        plateau.
    """
    methods = results["methods"]
    plateau = classic_plateau(methods)
    if plateau is None:
        return []
    best = methods[plateau["label"]]
    targets = []
    alone = methods.get("encoder")
    if alone and alone.get("identity") is not None and alone.get("seconds_per_concept") is not None:
        share = alone["identity"] / plateau["identity"] if plateau["identity"] else 0.0
        edit = paired_difference(alone, best, "editability")
        checks = {
            "identity": share >= ALONE_SHARE,
            "editability": edit is not None and edit["mean"] >= 0,
            "seconds": alone["seconds_per_concept"] < ALONE_SECONDS,
        }
        line = (
            f"- encoder alone: identity {100 * share:.0f}% of the plateau's (target >= "
            f"{100 * ALONE_SHARE:.0f}%: {_verdict(checks['identity'])}); editability "
            f"{_points(edit)} points against the plateau's (target >= 0: "
            f"{_verdict(checks['editability'])}); "
            f"{_format(alone['seconds_per_concept'], 'seconds')} s per concept (target < "
            f"{ALONE_SECONDS:g} s: {_verdict(checks['seconds'])})"
        )
        targets.append({"subject": "encoder alone", "checks": checks, "line": line})
    refined = sorted(
        (m["steps"], label, m)
        for label, m in methods.items()
        if m.get("method") == "encoder+refine"
        and m.get("steps") is not None
        and m["steps"] <= REFINE_STEPS
        and m.get("seconds_per_concept")
    )
    for _, label, method in refined:
        checks, parts = {}, []
        for metric in ("identity", "editability"):
            d = paired_difference(method, best, metric)
            checks[metric] = d is not None and d["mean"] >= -(d["se"] or 0.0)
            parts.append(f"{metric} {_points(d)} points ({_verdict(checks[metric])})")
        speedup = plateau["seconds"] / method["seconds_per_concept"]
        checks["speed"] = speedup >= SPEEDUP
        near = plateau["within_se"]
        line = (
            f"- {label}: against the plateau, paired (target >= minus one standard error): "
            f"{', '.join(parts)}; {speedup:.1f}x less time than classic needed to first reach "
            f"it (target >= {SPEEDUP:g}x: {_verdict(checks['speed'])}"
        )
        if near["label"] != plateau["label"]:  # a noisy curve: its first point near the best
            line += (
                f"; {near['seconds'] / method['seconds_per_concept']:.1f}x against "
                f"{near['label']}, the first within one standard error of it"
            )
        line += ")"
        targets.append({"subject": label, "checks": checks, "line": line})
    for label, method in methods.items():
        rates = method.get("fallback")
        if not rates or not label.startswith("encoder"):
            continue
        caught = rates["wrong_flagged"] / rates["wrong"] if rates["wrong"] else None
        spared = rates["right_flagged"] / rates["right"] if rates["right"] else None
        checks = {
            "wrong sent on": caught is not None and caught >= CATCH,
            "right sent on": spared is None or spared <= SPARE,
        }
        line = (
            f"- the fallback check on {label}'s tokens (threshold {rates['threshold']:g}): "
            f"sends {_share(rates['wrong_flagged'], rates['wrong'])} of the wrong concepts "
            f"(target >= {100 * CATCH:.0f}%: {_verdict(checks['wrong sent on'])}) and "
            f"{_share(rates['right_flagged'], rates['right'])} of the right ones (target <= "
            f"{100 * SPARE:.0f}%: {_verdict(checks['right sent on'])})"
        )
        targets.append({"subject": f"fallback on {label}", "checks": checks, "line": line})
    return targets


def encoder_target_lines(results: dict) -> list[str]:
    """`encoder_targets` as a markdown section; empty without a plateau or encoder rows."""
    targets = encoder_targets(results)
    if not targets:
        return []
    plateau = classic_plateau(results["methods"])
    return [
        "",
        f"The encoder's targets against classic's plateau ({plateau['label']}):",
        "",
    ] + [target["line"] for target in targets]


def _between(first: dict | None, second: dict | None) -> tuple[str, bool | None]:
    """Second minus first, two independent estimates: "+2.1 ± 3.0" (points; the standard
    errors added in quadrature) and whether it lies within two standard errors of zero."""
    if first is None or second is None:
        return "–", None
    se = math.hypot(first["se"] or 0.0, second["se"] or 0.0)
    difference = {"mean": second["mean"] - first["mean"], "se": se}
    return _points(difference), abs(difference["mean"]) <= 2 * se


def draw_agreement_lines(first: dict, second: dict, names: tuple[str, str]) -> list[str]:
    """Do two draws of the same benchmark (suites and samples of different seeds) lead to the
    same conclusions? For every method both scored: its identity and editability minus
    classic's plateau in each draw (paired over concepts, the quantities the targets read)
    and the change between the draws, within two standard errors or not; then every target
    of `encoder_targets`, met or missed in each.

    Args:
        first, second: two `oneword eval` results (results.json) with classic rows.
        names: what to call them ("seed 0", "seed 1").
    """
    plateaus = [classic_plateau(r["methods"]) for r in (first, second)]
    if None in plateaus:
        return []
    a, b = names
    lines = [
        f"Classic's plateau: {plateaus[0]['label']} in {a} "
        f"({_format(plateaus[0]['identity'], 'percent')} identity, "
        f"{_format(plateaus[0]['seconds'], 'seconds')} s), {plateaus[1]['label']} in {b} "
        f"({_format(plateaus[1]['identity'], 'percent')}, "
        f"{_format(plateaus[1]['seconds'], 'seconds')} s). Points against each draw's own "
        f"plateau, paired over concepts; {b} - {a} with the two standard errors added in "
        "quadrature; agrees: within two standard errors.",
        "",
        f"| method | identity: {a} | {b} | {b} - {a} | agrees | editability: {a} | {b} | "
        f"{b} - {a} | agrees |",
        "|---|---:|---:|---:|:-:|---:|---:|---:|:-:|",
    ]
    bests = [r["methods"][p["label"]] for r, p in zip((first, second), plateaus, strict=True)]
    agree = {True: "yes", False: "**no**", None: "–"}
    for label in [m for m in first["methods"] if m in second["methods"]]:
        cells = []
        for metric in ("identity", "editability"):
            d = [
                paired_difference(r["methods"][label], best, metric)
                for r, best in zip((first, second), bests, strict=True)
            ]
            change, within = _between(*d)
            cells += [_points(d[0]), _points(d[1]), change, agree[within]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    targets = [{t["subject"]: t["checks"] for t in encoder_targets(r)} for r in (first, second)]
    both = [s for s in targets[0] if s in targets[1]]
    if both:
        lines += ["", f"| target | check | {a} | {b} | same verdict |", "|---|---|---|---|:-:|"]
        for subject in both:
            for check, met in targets[0][subject].items():
                other = targets[1][subject].get(check)
                if other is None:
                    continue
                lines.append(
                    f"| {subject} | {check} | {_verdict(met)} | {_verdict(other)} | "
                    f"{agree[met == other]} |"
                )
    return lines


def plot_quality_time(results: dict, path: str | Path) -> Path | None:
    """Identity and editability against seconds per concept (log axis), one curve per method
    and settings (step counts joined), error bars of one standard error, classic's plateau
    as a dashed line and the time it first reached it as a dotted one. None without times."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io import atomic_path

    methods = {
        label: m
        for label, m in results["methods"].items()
        if m.get("seconds_per_concept") and m.get("identity") is not None
    }
    # The class word learns nothing: its microseconds would stretch the log axis over five
    # decades, so it is a floor line, not a point.
    floor = methods.pop("classword", None)
    if not methods:
        return None
    plateau = classic_plateau(methods)
    figure = Figure(figsize=(10.4, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    colours: dict[str, str] = {}
    for ax, metric in zip(axes, ("identity", "editability")):
        labelled = []
        for name, points in curves(methods, "seconds_per_concept", metric).items():
            colour = colours.setdefault(name, f"C{len(colours) % 10}")
            xs, ys = [p[1] for p in points], [p[2] for p in points]
            errors = [standard_error(methods[p[3]], metric) or 0.0 for p in points]
            style = "o-" if len(points) > 1 else "o"
            ax.errorbar(
                xs, ys, yerr=errors, fmt=style, color=colour, alpha=0.8, capsize=2, label=name
            )
            labelled += [(x, y, p[3], colour) for x, y, p in zip(xs, ys, points)]
        if plateau is not None and plateau.get(metric) is not None:
            ax.axhline(plateau[metric], color="grey", ls="--", lw=1, label="classic's plateau")
            ax.axvline(plateau["seconds"], color="grey", ls=":", lw=1)
        if floor is not None and floor.get(metric) is not None:
            ax.axhline(floor[metric], color="black", ls="-.", lw=0.8, label="the class word")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per concept (log)")
        ax.set_ylabel(f"{metric} (oracle)")
        ax.set_title(f"{metric} against time")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        figure.draw_without_rendering()
        _place_labels(ax, labelled, fontsize=7)
    figure.suptitle(f"quality against time: {Path(str(results['suite'])).name}")
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write results.md, tradeoff.png, quality_time.png and check.png into `out_dir`;
    returns name -> path."""
    from ..io import atomic_write_text

    out = Path(out_dir)
    written = {"table": atomic_write_text(out / "results.md", format_table(results))}
    plot = plot_tradeoff(results, out / "tradeoff.png")
    if plot is not None:
        written["plot"] = plot
    quality_time = plot_quality_time(results, out / "quality_time.png")
    if quality_time is not None:
        written["quality_time"] = quality_time
    check = plot_check(results, out / "check.png")
    if check is not None:
        written["check"] = check
    return written
