"""The benchmark report: a markdown table and the reconstruction-vs-editability plot.

The plot follows Fig. 10 of Gal et al. (2023): editability (text similarity) on the x
axis, reconstruction (image similarity) on the y axis, one labelled point per method and
step count, points of one method joined in step order, so the trade-off that more
optimisation buys is visible at a glance.
"""

from __future__ import annotations

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
        f"{results['samples']} samples per prompt, {results.get('steps')} DDIM steps, "
        f"guidance {results.get('guidance')}, seed {results['seed']}",
        f"- scorers: oracle {'yes' if results.get('oracle') else 'no'}, "
        f"CLIP {results.get('clip') or '–'}, DINO {results.get('dino') or '–'}",
        f"- commit {results.get('commit') or 'unknown'}, {results.get('date')}",
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
        "to the fallback | wrong ones it sends |",
        "|---|---:|---:|---:|---|",
    ]
    for label, rates in rated.items():
        caught = ", ".join(rates["flagged_wrong"][:4]) + (
            ", ..." if len(rates["flagged_wrong"]) > 4 else ""
        )
        lines.append(
            f"| {label} | {_format(methods[label].get('check_score'), 'cosine')} | "
            f"{_share(rates['wrong_flagged'], rates['wrong'])} | "
            f"{_share(rates['right_flagged'], rates['right'])} | {caught or '–'} |"
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


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write results.md, tradeoff.png and check.png into `out_dir`; returns name -> path."""
    from ..io import atomic_write_text

    out = Path(out_dir)
    written = {"table": atomic_write_text(out / "results.md", format_table(results))}
    plot = plot_tradeoff(results, out / "tradeoff.png")
    if plot is not None:
        written["plot"] = plot
    check = plot_check(results, out / "check.png")
    if check is not None:
        written["check"] = check
    return written
