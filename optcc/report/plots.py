"""Plots of a build report, drawn with matplotlib from ``report.json``.

Each plot is drawn only when it has something to show: the per-layer figure adds a
channels panel when a pass reported channel counts and a sparsity panel only when some
layer is actually sparse; the INT8 figure exists only when an accuracy budget measured
per-layer sensitivity; the latency figure only when there were several rounds. Axes switch
to a log scale when values span more than two decades. Every figure is written as a PNG
(for report.md and for pasting elsewhere) and as inline SVG text (for report.html).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optcc.report.format import short_names

logger = logging.getLogger(__name__)

BEFORE = "#b9c7d6"
PRECISION_COLORS = {"float32": "#2c6fbb", "float16": "#c98b12", "bfloat16": "#c98b12",
                    "int8": "#2e8b57", "uint8": "#2e8b57", "int4": "#7a4fb0"}
OTHER = "#777777"
MAX_LAYERS = 80  # larger models plot their largest layers
LOG_SPAN = 100.0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "svg.fonttype": "none",  # text stays text in the SVG: sharp and searchable
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 10,
        "axes.titleweight": "bold",
        "axes.titlelocation": "left",
    })
    return plt


def _log_axis(axis: Any, values: list[float]) -> None:
    """Log scale with plain tick labels (1k, 10k, 60) instead of powers of ten; 1-2-5
    steps when the values span less than three decades, 1-2-3-5-7 within two."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from optcc.report.format import fmt_int

    positive = [v for v in values if v > 0]
    span = max(positive) / min(positive) if positive else 1.0
    subs = (1.0,) if span > 1000 else (1.0, 2.0, 5.0) if span > 100 else (1.0, 2.0, 3.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt_int(round(v, 6))))
    axis.set_minor_formatter(NullFormatter())


def _wants_log(values: list[float]) -> bool:
    positive = [v for v in values if v and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > LOG_SPAN


def _channel_counts(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Output channels before and after, per layer, from any pass that reported them
    (``out_before``/``out_after`` in its per-layer stats, as prune-channels does)."""
    found: dict[str, tuple[int, int]] = {}
    for rec in report.get("passes", []):
        rows = (rec.get("stats") or {}).get("layers")
        if isinstance(rows, list):
            for row in rows:
                if isinstance(row, dict) and {"name", "out_before", "out_after"} <= set(row):
                    first = found.get(row["name"], (row["out_before"], row["out_after"]))[0]
                    found[row["name"]] = (first, row["out_after"])
    return found


def layers_figure(report: dict[str, Any], plt: Any) -> Any | None:
    layers = (report.get("layers") or {}).get("final") or []
    if not layers:
        return None
    original = {layer["name"]: layer for layer in (report.get("layers") or {}).get("original", [])}
    title_note = ""
    if len(layers) > MAX_LAYERS:
        keep = sorted(layers, key=lambda x: original.get(x["name"], x)["params"], reverse=True)
        keep_names = {layer["name"] for layer in keep[:MAX_LAYERS]}
        title_note = f" ({MAX_LAYERS} largest of {len(layers)})"
        layers = [layer for layer in layers if layer["name"] in keep_names]
    names = [layer["name"] for layer in layers]
    channels = _channel_counts(report)
    panels = ["params"]
    if any(name in channels and channels[name][0] != channels[name][1] for name in names):
        panels.append("channels")
    if any(layer["sparsity"] >= 0.01 for layer in layers):
        panels.append("sparsity")
    n = len(names)
    y = list(range(n))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 + 3.6 * len(panels), 0.26 * n + 1.7), sharey=True,
        squeeze=False,
    )
    axes = axes[0]
    precisions = sorted({layer["precision"] for layer in layers})
    colors = [PRECISION_COLORS.get(layer["precision"], OTHER) for layer in layers]
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "params":
            before = [original.get(name, {}).get("params", 0) for name in names]
            after = [layer["params"] for layer in layers]
            ax.barh([v - 0.2 for v in y], before, height=0.4, color=BEFORE)
            ax.barh([v + 0.2 for v in y], after, height=0.4, color=colors)
            ax.set_title("parameters (weight + bias)" + title_note)
            if _wants_log(before + after):
                ax.set_xscale("log")
                _log_axis(ax.xaxis, before + after)
            if n <= 40:  # the kept share, next to each final bar
                for i, (b, a) in enumerate(zip(before, after, strict=True)):
                    if b and a != b:
                        ax.annotate(f"{a / b:.0%}", (a, i + 0.2), textcoords="offset points",
                                    xytext=(3, 0), va="center", fontsize=7, color="#444444")
        elif panel == "channels":
            before = [channels.get(name, (0, 0))[0] for name in names]
            after = [channels.get(name, (0, 0))[1] for name in names]
            ax.barh([v - 0.2 for v in y], before, height=0.4, color=BEFORE)
            ax.barh([v + 0.2 for v in y], after, height=0.4, color=colors)
            ax.set_title("output channels")
        else:
            ax.barh(y, [100 * layer["sparsity"] for layer in layers], height=0.6, color="#d9702b")
            ax.set_xlim(0, 100)
            ax.set_title("weight sparsity (%)")
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(short_names(names), fontsize=8)
    axes[0].invert_yaxis()
    from matplotlib.patches import Patch

    handles = [Patch(color=BEFORE, label="original")] + [
        Patch(color=PRECISION_COLORS.get(p, OTHER), label=f"final ({p})") for p in precisions
    ]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), frameon=False,
               bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    return fig


def passes_figure(report: dict[str, Any], plt: Any) -> Any | None:
    records = report.get("passes") or []
    if not records:
        return None
    orig = report["original"]
    labels = ["original"] + [f"{r['position']}. {r['name']}" for r in records]
    steps = [orig, *records]
    metric = (report.get("metric") or {}).get("name")
    values = [((s.get("metric") or {}).get(metric) if metric else None) for s in steps]
    has_metric = sum(v is not None for v in values) >= 2
    fig, axes = plt.subplots(2 if has_metric else 1, 1, figsize=(max(6.0, 0.9 * len(labels) + 2), 4.6 if has_metric else 2.8),
                             sharex=True, squeeze=False)
    axes = [a[0] for a in axes]
    x = list(range(len(labels)))
    if has_metric:
        ax = axes[0]
        points = [(i, 100 * v) for i, v in enumerate(values) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#2c6fbb")
        for i, v in points:
            ax.annotate(f"{v:.1f}", (i, v), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        ax.set_ylabel(f"{metric} (%)")
        low = min(p[1] for p in points)
        ax.set_ylim(max(0.0, low - 8), 112)
        ax.set_title(f"{metric} after each pass")
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    ax = axes[-1]
    width = 0.27
    series = [("params", "parameters", "#2c6fbb"), ("weight_bytes", "weight bytes", "#2e8b57"),
              ("flops", "FLOPs", "#d9702b")]
    for k, (key, label, color) in enumerate(series):
        base = orig.get(key)
        if not base:
            continue
        share = [100 * (s.get(key) or 0) / base for s in steps]
        ax.bar([i + (k - 1) * width for i in x], share, width=width, label=label, color=color)
    ax.set_ylabel("% of original")
    ax.set_title("model size after each pass")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="upper right", frameon=False, fontsize=8, ncol=3, bbox_to_anchor=(1.0, 1.18))
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def int8_figure(report: dict[str, Any], plt: Any) -> Any | None:
    """Per-layer INT8 sensitivity (output MSE relative to the output's mean square, with
    only that layer quantized: 1e-4 is a 1 % RMS error),
    when a quantization pass with an accuracy budget measured it."""
    rows: list[dict[str, Any]] = []
    budget = None
    for rec in report.get("passes", []):
        layers = (rec.get("stats") or {}).get("layers")
        if isinstance(layers, list) and any(
            isinstance(r, dict) and r.get("sensitivity") is not None for r in layers
        ):
            rows = [r for r in layers if r.get("sensitivity") is not None]
            budget = (rec.get("stats") or {}).get("budget")
    if not rows:
        return None
    rows = rows[:MAX_LAYERS]
    names = short_names([r["name"] for r in rows])
    values = [max(float(r["sensitivity"]), 1e-12) for r in rows]
    colors = ["#2e8b57" if str(r.get("precision", "")).endswith("int8") else "#d9702b" for r in rows]
    fig, ax = plt.subplots(figsize=(8.0, 0.26 * len(rows) + 1.5))
    ax.barh(range(len(rows)), values, color=colors, height=0.6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    if _wants_log(values):
        ax.set_xscale("log")  # powers of ten suit errors spanning 1e-7 to 1e-2
    ax.set_xlabel("output MSE / mean square of the output, with only this layer in INT8")
    title = "INT8 sensitivity per layer"
    if budget is not None:
        title += f" (budget: {100 * budget:.2g} points)"
    ax.set_title(title)
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=label) for c, label in
               (("#2e8b57", "INT8"), ("#d9702b", "kept in float")) if c in colors]
    ax.legend(handles=handles, loc="lower right", frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def latency_figure(report: dict[str, Any], plt: Any) -> Any | None:
    orig = (report.get("original") or {}).get("latency") or {}
    final = (report.get("final") or {}).get("latency") or {}
    a, b = orig.get("round_medians_ms") or [], final.get("round_medians_ms") or []
    if len(a) < 2 or len(a) != len(b):
        return None
    rounds = list(range(1, len(a) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 2.8))
    left.plot(rounds, a, marker="o", color=BEFORE, label="original")
    left.plot(rounds, b, marker="o", color="#2c6fbb", label="final")
    if max(a + b) / max(min(a + b), 1e-9) > 5:
        left.set_yscale("log")
        _log_axis(left.yaxis, a + b)
    left.set_title("median latency per round (ms)")
    left.set_xlabel("round")
    left.legend(frameon=False, fontsize=8)
    ratios = [x / y for x, y in zip(a, b, strict=True) if y]
    right.plot(rounds[: len(ratios)], ratios, marker="o", color="#2e8b57")
    overall = orig["median_ms"] / final["median_ms"] if final.get("median_ms") else None
    if overall:
        right.axhline(overall, color="#999999", linestyle="--", linewidth=1)
        right.annotate(f"overall ×{overall:.3g}", (rounds[-1], overall), textcoords="offset points",
                       xytext=(0, 5), ha="right", fontsize=8, color="#555555")
    right.set_ylim(0, max(ratios) * 1.25)
    right.set_title("speed-up per round")
    right.set_xlabel("round")
    for ax in (left, right):
        ax.set_xticks(rounds)
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable[[dict[str, Any], Any], Any | None]] = {
    "layers": layers_figure,
    "passes": passes_figure,
    "int8": int8_figure,
    "latency": latency_figure,
}


def draw(report: dict[str, Any], folder: Path | None) -> dict[str, dict[str, Any]]:
    """Draw every plot that has something to show. Returns ``{name: {"png": relative path
    or None, "svg": svg text}}``; PNGs go to ``folder/plots/`` when a folder is given.
    Without matplotlib there are no plots: the tables carry the same numbers."""
    try:
        plt = _pyplot()
    except ImportError:
        logger.info("matplotlib is not installed: the report has no plots")
        return {}
    drawn: dict[str, dict[str, Any]] = {}
    for name, make in FIGURES.items():
        try:
            fig = make(report, plt)
        except Exception:  # a plot must never fail a build that succeeded
            logger.warning("could not draw the %s plot", name, exc_info=True)
            continue
        if fig is None:
            continue
        entry: dict[str, Any] = {"png": None}
        if folder is not None:
            (folder / "plots").mkdir(exist_ok=True)
            fig.savefig(folder / "plots" / f"{name}.png", dpi=110)
            entry["png"] = f"plots/{name}.png"
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        svg = buffer.getvalue()
        entry["svg"] = svg[svg.index("<svg"):]  # drop the XML prologue for inlining
        plt.close(fig)
        drawn[name] = entry
    return drawn
