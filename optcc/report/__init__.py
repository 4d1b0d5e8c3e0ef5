"""Build reports: ``report.json`` (the machine-readable source of truth, schema in
docs/report.md), ``report.md`` for people, and plots of per-layer numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def fmt_int(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def metric_text(metric: dict[str, Any] | None, name: str | None) -> str:
    if not metric or not name or name not in metric:
        return "–"
    value = metric[name]
    return f"{100 * value:.2f} %" if name in {"accuracy", "agreement"} else f"{value:.4g}"


def pass_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the per-pass summary table (shared by the CLI and report.md)."""
    name = (report.get("metric") or {}).get("name")
    orig = report["original"]
    rows = [[
        "0", "original", "", fmt_int(orig["params"]), fmt_bytes(orig["weight_bytes"]),
        fmt_int(orig["flops"]), metric_text(orig.get("metric"), name), "", "",
    ]]
    for rec in report["passes"]:
        rows.append([
            str(rec["position"]),
            rec["name"] + ("" if rec["modified"] else " (no change)"),
            f"{rec['seconds']:.2f}s",
            fmt_int(rec["params"]),
            fmt_bytes(rec["weight_bytes"]),
            fmt_int(rec["flops"]),
            metric_text(rec.get("metric"), name),
            f"{rec['max_abs_diff']:.2g}",
            rec["tolerance"],
        ])
    return rows


PASS_HEADERS = ["#", "pass", "time", "params", "weights", "FLOPs", "metric", "max Δout", "tolerance"]


def latency_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label in ("original", "final"):
        lat = (report.get(label) or {}).get("latency")
        if lat:
            rows.append([
                label, f"{lat['median_ms']:.3f}", f"{lat['p90_ms']:.3f}",
                str(lat["batch_size"]), str(lat["threads"] or "default"), lat["device"],
            ])
    return rows


LATENCY_HEADERS = ["model", "median ms", "p90 ms", "batch", "threads", "device"]


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _plots(report: dict[str, Any], folder: Path) -> list[str]:
    """Per-layer parameters (original vs final), sparsity and precision, as PNG files."""
    layers = report.get("layers") or {}
    final = layers.get("final") or []
    if not final:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the tables carry the same numbers
        logger.info("matplotlib missing: no plots")
        return []
    original = {layer["name"]: layer for layer in layers.get("original", [])}
    names = [layer["name"] for layer in final]
    x = range(len(names))
    height = max(3.0, 0.22 * len(names) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(15, height), sharey=True)
    before = [original.get(n, {}).get("params", 0) for n in names]
    after = [layer["params"] for layer in final]
    axes[0].barh(x, before, color="#c9d6e3", label="original")
    axes[0].barh(x, after, color="#2c6fbb", height=0.5, label="final")
    axes[0].set_title("parameters per layer")
    axes[0].legend(loc="lower right")
    axes[1].barh(x, [100 * layer["sparsity"] for layer in final], color="#e07b39")
    axes[1].set_title("weight sparsity (%)")
    axes[1].set_xlim(0, 100)
    colors = {"int8": "#3a9d5d", "uint8": "#3a9d5d", "float16": "#d4a017"}
    axes[2].barh(
        x, [1] * len(names), color=[colors.get(layer["precision"], "#888888") for layer in final]
    )
    for i, layer in enumerate(final):
        axes[2].text(0.5, i, layer["precision"] + (" (W8A8)" if layer["int8"] else ""),
                     va="center", ha="center", fontsize=7, color="white")
    axes[2].set_title("weight precision")
    axes[2].set_xticks([])
    axes[0].set_yticks(list(x))
    axes[0].set_yticklabels(names, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(folder / "layers.png", dpi=90)
    plt.close(fig)
    return ["layers.png"]


def render_markdown(report: dict[str, Any], plots: list[str]) -> str:
    name = (report.get("metric") or {}).get("name")
    summary = report.get("summary", {})
    out = [
        f"# optcc build report: {report['recipe']['name']}",
        "",
        f"- model: `{report['model']['source']}` → `{report['final']['artifact']['path']}` "
        f"({report['target']['backend']})",
        f"- optcc {report['optcc_version']}, {report['created']}, {report.get('seconds', 0):.1f} s",
    ]
    if report.get("metric"):
        out.append(f"- metric: {name} on `{report['metric']['data']}`")
    out.append(
        f"- verification: {report['verification']['batch_size']} samples from "
        f"{report['verification']['data']} data, after every pass"
    )
    checks = report["verification"].get("batch_checks")
    if checks:
        line = f"- batch checks: {', '.join(checks['probes']) or 'none'}"
        line += (", samples independent of their batch-mates" if checks["independence"]
                 else ", runs and shapes only")
        line += "".join(f"; {probe} skipped: {why}" for probe, why in checks["skipped"].items())
        if checks.get("coupled_since"):
            line += f"; samples depend on their batch-mates from '{checks['coupled_since']}' on"
        out.append(line)
    out += ["", "## Passes", "", _md_table(PASS_HEADERS, pass_rows(report)), ""]
    out += ["## Latency", "", _md_table(LATENCY_HEADERS, latency_rows(report)), ""]
    if report["final"].get("latency_not_measured"):
        out += [f"Not measured: {report['final']['latency_not_measured']}.", ""]
    out += engine_markdown(report)
    parts = []
    for key, label in (("params_ratio", "parameters"), ("weight_bytes_ratio", "weight bytes"),
                       ("flops_ratio", "FLOPs")):
        if summary.get(key) is not None:
            parts.append(f"{label} ×{summary[key]:.3f}")
    if summary.get("speedup") is not None:
        parts.append(f"speed-up ×{summary['speedup']:.2f}")
    if summary.get("metric_delta") is not None:
        parts.append(f"{name} {100 * summary['metric_delta']:+.2f} points")
    out += ["## Summary", "", ", ".join(parts) or "–", ""]
    layers = report.get("layers", {}).get("final", [])
    if layers:
        original = {layer["name"]: layer for layer in report["layers"]["original"]}
        rows = []
        for layer in layers:
            before = original.get(layer["name"], {})
            rows.append([
                layer["name"], layer["op"], "×".join(map(str, layer["weight_shape"])),
                fmt_int(before.get("params")), fmt_int(layer["params"]), fmt_int(layer["flops"]),
                f"{100 * layer['sparsity']:.1f} %", layer["precision"] + (" W8A8" if layer["int8"] else ""),
            ])
        out += ["## Layers", "", _md_table(
            ["layer", "op", "weight", "params before", "params after", "FLOPs", "sparsity", "precision"],
            rows,
        ), ""]
    for plot in plots:
        out += [f"![per-layer statistics]({plot})", ""]
    for rec in report["passes"]:
        if rec.get("stats") or rec.get("reason"):
            out += [f"### Pass {rec['position']}: {rec['name']}", ""]
            if rec.get("reason"):
                out.append(f"- did not apply: {rec['reason']}")
            for key, value in (rec.get("stats") or {}).items():
                if key != "layers":
                    out.append(f"- {key}: `{json.dumps(value, default=str)[:300]}`")
            for file in rec.get("files") or []:
                out.append(f"- file: [{file}]({file})")
            rows = (rec.get("stats") or {}).get("layers")
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                headers = list(rows[0])
                out += ["", _md_table(headers, [[_cell(row.get(h)) for h in headers] for row in rows])]
            out.append("")
    return "\n".join(out)


def engine_markdown(report: dict[str, Any]) -> list[str]:
    """The TensorRT engine section: built or not (and how to build it), layer precisions,
    sparse tactics, the comparison with ONNX Runtime, the lint summary."""
    info = report["final"]["artifact"].get("info") or {}
    engine = info.get("engine")
    if engine is None:
        return []
    out = ["## TensorRT engine", ""]
    if not engine.get("built"):
        out += [f"**Engine not built here**: {engine.get('reason')}. How to build it:", ""]
        out += [f"{i}. {step}" for i, step in enumerate(engine.get("how_to_build", []), 1)]
        out.append("")
    else:
        layers = engine.get("layers") or {}
        out.append(f"- TensorRT {engine.get('tensorrt')}, {fmt_bytes(engine.get('engine_bytes'))}")
        if layers:
            counts = ", ".join(f"{k}: {v}" for k, v in layers.get("precision_counts", {}).items())
            out.append(f"- layers by precision: {counts}")
            out.append(f"- sparse tactics: {', '.join(layers.get('sparse_layers') or []) or 'none'}")
        check = report["final"]["artifact"].get("check")
        if check:
            verdict = "match" if check["passed"] else "differ: " + ", ".join(check["failed"])
            out.append(f"- outputs vs ONNX Runtime (atol {check['atol']}, rtol {check['rtol']}): "
                       f"{verdict}")
        out.append("")
    lint = info.get("lint") or {}
    if lint:
        out += [f"- TensorRT lint: {lint.get('errors', 0)} error(s), {lint.get('warnings', 0)} "
                "warning(s) (see report.json)", ""]
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_reports(report: dict[str, Any], folder: Path) -> None:
    """Write report.json, report.md and plots into ``folder``."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plots = _plots(report, folder)
    (folder / "report.md").write_text(render_markdown(report, plots))
