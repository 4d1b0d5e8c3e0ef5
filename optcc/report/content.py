"""What a build report says, independent of how it is drawn: sections of tables, key/value
lists, figures and warnings, all derived from ``report.json``. The Markdown, HTML and
terminal renderers draw the same content."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optcc.report.format import (
    fmt_bytes,
    fmt_diff,
    fmt_int,
    fmt_path,
    fmt_pct,
    fmt_ratio,
    fmt_seconds,
    fmt_value,
    humanize,
)

MAX_TABLE_ROWS = 60  # longer per-pass tables are cut; report.json has every row


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str | None = None
    note: str | None = None
    numeric: list[bool] = field(default_factory=list)  # right-aligned columns


@dataclass
class KeyValues:
    items: list[tuple[str, str]]


@dataclass
class Text:
    text: str


@dataclass
class Steps:
    items: list[str]


@dataclass
class Figure:
    name: str  # a key of the plots dict: "layers", "passes", ...
    caption: str


@dataclass
class Section:
    title: str
    blocks: list[Any]
    details: bool = False  # rendered collapsible where the medium allows
    anchor: str = ""


# --------------------------------------------------------------------------- helpers
def metric_name(report: dict[str, Any]) -> str | None:
    return (report.get("metric") or {}).get("name")


def metric_text(metric: dict[str, Any] | None, name: str | None) -> str:
    if not metric or not name or name not in metric:
        return "–"
    value = metric[name]
    return fmt_pct(value) if name in {"accuracy", "agreement"} else f"{value:.4g}"


def tolerance_text(record: dict[str, Any], report: dict[str, Any]) -> str:
    """A pass's tolerance as the table shows it: lossy passes name the metric that judges
    them (accuracy or agreement), or say that nothing did."""
    text = str(record.get("tolerance", "–"))
    if text.startswith("lossy"):
        name = metric_name(report)
        if name is None:
            return "lossy (not judged: no evaluation data)"
        return f"lossy (judged by {name})"
    return text


def _numeric(headers: list[str], *numeric: str) -> list[bool]:
    return [h in numeric for h in headers]


# --------------------------------------------------------------------------- tables
PASS_HEADERS = ["#", "pass", "time", "params", "weights", "FLOPs", "metric", "max Δout",
                "tolerance"]


def pass_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row for the original model, one per pass."""
    name = metric_name(report)
    orig = report["original"]
    rows = [["0", "original", "", fmt_int(orig["params"]), fmt_bytes(orig["weight_bytes"]),
             fmt_int(orig["flops"]), metric_text(orig.get("metric"), name), "", ""]]
    for rec in report["passes"]:
        rows.append([
            str(rec["position"]),
            rec["name"] + ("" if rec["modified"] else " (no change)"),
            fmt_seconds(rec["seconds"]),
            fmt_int(rec["params"]),
            fmt_bytes(rec["weight_bytes"]),
            fmt_int(rec["flops"]),
            metric_text(rec.get("metric"), name),
            fmt_diff(rec["max_abs_diff"]),
            tolerance_text(rec, report),
        ])
    return rows


def pass_table(report: dict[str, Any]) -> Table:
    note = None
    skipped = [f"{rec['name']}: {rec['reason']}" for rec in report["passes"]
               if not rec["modified"] and rec.get("reason")]
    if skipped:
        note = "No change — " + "; ".join(skipped)
    return Table(PASS_HEADERS, pass_rows(report), note=note,
                 numeric=_numeric(PASS_HEADERS, "#", "time", "params", "weights", "FLOPs",
                                  "metric", "max Δout"))


LATENCY_HEADERS = ["model", "median ms", "p90 ms", "rounds (min–max ms)", "spread", "batch",
                   "threads", "device"]


def latency_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label in ("original", "final"):
        lat = (report.get(label) or {}).get("latency")
        if lat:
            medians = lat.get("round_medians_ms") or [lat["median_ms"]]
            rows.append([
                label, f"{lat['median_ms']:.3f}", f"{lat['p90_ms']:.3f}",
                f"{len(medians)} ({min(medians):.3f}–{max(medians):.3f})",
                fmt_pct(lat.get("spread", 0.0), 0), str(lat["batch_size"]),
                str(lat["threads"] or "default"), lat["device"],
            ])
    return rows


def latency_blocks(report: dict[str, Any]) -> list[Any]:
    rows = latency_rows(report)
    blocks: list[Any] = []
    if rows:
        blocks.append(Table(LATENCY_HEADERS, rows,
                            numeric=_numeric(LATENCY_HEADERS, "median ms", "p90 ms", "spread",
                                             "batch")))
    not_measured = (report.get("final") or {}).get("latency_not_measured")
    if not_measured:
        blocks.append(Text(f"Not measured: {not_measured}."))
    return blocks


def engine_blocks(report: dict[str, Any]) -> list[Any]:
    """The TensorRT engine: built or not (and how to build it), layer precisions, sparse
    tactics, the comparison with ONNX Runtime, the lint summary."""
    artifact = (report.get("final") or {}).get("artifact") or {}
    info = artifact.get("info") or {}
    engine = info.get("engine")
    if engine is None:
        return []
    blocks: list[Any] = []
    if not engine.get("built"):
        blocks.append(Text(f"Engine not built here: {engine.get('reason')}. How to build it:"))
        steps = engine.get("how_to_build") or []
        blocks.append(Steps(list(steps)))
    else:
        items = [("TensorRT", f"{engine.get('tensorrt')}, {fmt_bytes(engine.get('engine_bytes'))}")]
        layers = engine.get("layers") or {}
        if layers:
            counts = ", ".join(f"{k}: {v}" for k, v in layers.get("precision_counts", {}).items())
            items.append(("layers by precision", counts))
            items.append(("sparse tactics", ", ".join(layers.get("sparse_layers") or []) or "none"))
        check = artifact.get("check")
        if check:
            verdict = "match" if check["passed"] else "differ: " + ", ".join(check["failed"])
            items.append((f"outputs vs ONNX Runtime (atol {check['atol']}, rtol {check['rtol']})",
                          verdict))
        blocks.append(KeyValues(items))
    lint = info.get("lint") or {}
    if lint:
        blocks.append(KeyValues([("TensorRT lint", f"{lint.get('errors', 0)} error(s), "
                                  f"{lint.get('warnings', 0)} warning(s) (see report.json)")]))
    return blocks


def speedup_text(summary: dict[str, Any]) -> str | None:
    if summary.get("speedup") is None:
        return None
    text = f"speed-up {fmt_ratio(summary['speedup'])}"
    low_high = summary.get("speedup_range")
    if low_high and low_high[0] != low_high[1]:
        text += f" ({fmt_ratio(low_high[0])}–{fmt_ratio(low_high[1])} across rounds)"
    return text


def summary_items(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, headline, detail) for the summary: size, compute, speed, metric."""
    summary = report.get("summary") or {}
    orig, final = report.get("original") or {}, report.get("final") or {}
    items = []
    if summary.get("params_ratio") is not None:
        items.append(("parameters", fmt_ratio(summary["params_ratio"]),
                      f"{fmt_int(orig['params'])} → {fmt_int(final['params'])}"))
    if summary.get("weight_bytes_ratio") is not None:
        items.append(("weights", fmt_ratio(summary["weight_bytes_ratio"]),
                      f"{fmt_bytes(orig['weight_bytes'])} → {fmt_bytes(final['weight_bytes'])}"))
    if summary.get("flops_ratio") is not None:
        items.append(("FLOPs per sample", fmt_ratio(summary["flops_ratio"]),
                      f"{fmt_int(orig['flops'])} → {fmt_int(final['flops'])}"))
    if summary.get("speedup") is not None:
        detail = (f"{orig['latency']['median_ms']:.3g} → {final['latency']['median_ms']:.3g} ms"
                  f" per batch of {final['latency']['batch_size']}")
        low_high = summary.get("speedup_range")
        if low_high:
            detail += f"; rounds {fmt_ratio(low_high[0])}–{fmt_ratio(low_high[1])}"
        items.append(("speed-up", fmt_ratio(summary["speedup"]), detail))
    name = metric_name(report)
    if name and orig.get("metric") and final.get("metric"):
        delta = summary.get("metric_delta")
        unit = " pts" if name in {"accuracy", "agreement"} else ""
        scale = 100 if unit else 1
        items.append((name, f"{scale * (delta or 0):+.2f}{unit}",
                      f"{metric_text(orig['metric'], name)} → {metric_text(final['metric'], name)}"))
    return items


def summary_line(report: dict[str, Any]) -> str:
    """The one-line summary the CLI prints under its tables."""
    parts = []
    for label, headline, _ in summary_items(report):
        if label == "speed-up":
            parts.append(speedup_text(report["summary"]) or "")
        else:
            parts.append(f"{label} {headline}")
    return ", ".join(p for p in parts if p)


def warnings_of(report: dict[str, Any]) -> list[str]:
    """What a reader must not miss: untrustworthy timing, BatchNorm left unfolded, and
    anything the build itself recorded."""
    out = list(report.get("warnings") or [])
    summary = report.get("summary") or {}
    if summary.get("speedup_trustworthy") is False:
        from optcc.backends.base import Speedup

        low, high = summary["speedup_range"]
        rounds = len(((report.get("final") or {}).get("latency") or {}).get("round_medians_ms") or [])
        out.append(Speedup(summary["speedup"], low, high, rounds).warning() or "")
    final = report.get("final") or {}
    histogram = final.get("op_histogram") or {}
    if histogram.get("BatchNormalization") and any(
        layer.get("op") in {"Conv", "ConvTranspose"} for layer in (report.get("layers") or {}).get("final", [])
    ):
        out.append(f"the final model still has {histogram['BatchNormalization']} "
                   "BatchNormalization node(s): add fold-batchnorm at the end of the recipe to "
                   "fold them into the convolutions")
    return out


def layer_table(report: dict[str, Any]) -> Table | None:
    layers = (report.get("layers") or {}).get("final") or []
    if not layers:
        return None
    original = {layer["name"]: layer for layer in report["layers"].get("original", [])}
    headers = ["layer", "op", "weight before", "weight after", "params before", "params after",
               "FLOPs after", "sparsity", "precision"]
    rows = []
    for layer in layers:
        before = original.get(layer["name"], {})
        shape_before = "×".join(map(str, before.get("weight_shape", []))) or "–"
        rows.append([
            layer["name"], layer["op"], shape_before, "×".join(map(str, layer["weight_shape"])),
            fmt_int(before.get("params")), fmt_int(layer["params"]), fmt_int(layer["flops"]),
            fmt_pct(layer["sparsity"], 1), layer["precision"] + (" W8A8" if layer["int8"] else ""),
        ])
    gone = [name for name in original if name not in {layer["name"] for layer in layers}]
    note = f"Layers removed: {', '.join(gone)}" if gone else None
    return Table(headers, rows, note=note,
                 numeric=_numeric(headers, "params before", "params after", "FLOPs after",
                                  "sparsity"))


# --------------------------------------------------------------------------- pass details
def stats_blocks(stats: dict[str, Any], prefix: str = "") -> list[Any]:
    """A pass's own statistics for people: scalars as a key/value list, lists of records
    and mappings as tables (at most MAX_TABLE_ROWS rows; report.json has all). A mapping
    that holds records of its own is opened up the same way, its keys prefixed with its
    name, instead of being run together on one line."""
    blocks: list[Any] = []
    scalars: list[tuple[str, str]] = []
    for key, value in stats.items():
        name = f"{prefix}{key}"
        table = _as_table(name, value)
        if table is not None:
            blocks.append(table)
        elif isinstance(value, dict) and any(isinstance(v, dict | list) and v for v in value.values()):
            blocks.extend(stats_blocks(value, prefix=f"{name} "))
        else:
            scalars.append((humanize(name), fmt_value(key, value)))
    return ([KeyValues(scalars)] if scalars else []) + blocks


def _as_table(key: str, value: Any) -> Table | None:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        headers = list(dict.fromkeys(k for row in value for k in row))
        rows = [[fmt_value(h, row.get(h)) for h in headers] for row in value]
    elif isinstance(value, dict) and len(value) > 1 and all(isinstance(v, dict) for v in value.values()):
        inner = list(dict.fromkeys(k for row in value.values() for k in row))
        headers = ["name", *inner]
        rows = [[str(name), *(fmt_value(h, row.get(h)) for h in inner)] for name, row in value.items()]
    elif isinstance(value, dict) and value and all(
        not isinstance(v, dict | list) for v in value.values()
    ) and len(value) > 3:
        headers = ["name", humanize(key)]
        rows = [[str(name), fmt_value(key, v)] for name, v in value.items()]
    elif isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
        headers = ["name", humanize(key)]
        rows = [[str(name), v] for name, v in value.items()]
    else:
        return None
    note = None
    if len(rows) > MAX_TABLE_ROWS:
        note = f"{len(rows) - MAX_TABLE_ROWS} more rows in report.json"
        rows = rows[:MAX_TABLE_ROWS]
    numeric = [bool(rows) and all(_looks_numeric(r[i]) for r in rows) for i in range(len(headers))]
    return Table([humanize(h) for h in headers], rows, title=humanize(key), note=note,
                 numeric=numeric)


def _looks_numeric(cell: str) -> bool:
    text = cell.replace(",", "").replace(" %", "").replace(" s", "").rstrip("kMG")
    try:
        float(text)
    except ValueError:
        return cell == "–"
    return True


def pass_sections(report: dict[str, Any]) -> list[Section]:
    sections = []
    for rec in report["passes"]:
        blocks: list[Any] = []
        if not rec["modified"]:
            blocks.append(Text(f"Did not apply: {rec.get('reason') or 'no reason given'}."))
        stats = stats_blocks(rec.get("stats") or {})
        if rec.get("options"):
            options = ("options", fmt_value("options", rec["options"]))
            if stats and isinstance(stats[0], KeyValues):
                stats[0].items.insert(0, options)
            else:
                stats.insert(0, KeyValues([options]))
        blocks += stats
        for file in rec.get("files") or []:
            blocks.append(KeyValues([("file", file)]))
        sections.append(Section(f"{rec['position']}. {rec['name']}", blocks, details=True,
                                anchor=f"pass-{rec['position']}"))
    return sections


# --------------------------------------------------------------------------- the whole report
def header_items(report: dict[str, Any]) -> list[tuple[str, str]]:
    final = report.get("final") or {}
    artifact = (final.get("artifact") or {}).get("path", "–")
    items = [
        ("model", fmt_path(report["model"]["source"])),
        ("inputs", ", ".join(report["model"].get("inputs", []))),
        ("artifact", f"{artifact} ({report['target']['backend']})"),
        ("recipe", fmt_path(report["recipe"]["file"])),
        ("built", f"{report['created'].replace('T', ' ').replace('+00:00', ' UTC')} by optcc "
                  f"{report['optcc_version']} in {fmt_seconds(report.get('seconds'))}"),
    ]
    if report.get("metric"):
        items.append(("metric", f"{report['metric']['name']} on {report['metric']['data']}"))
    items.append(("verification", f"{report['verification']['batch_size']} samples from "
                                  f"{report['verification']['data']} data, after every pass"))
    checks = report["verification"].get("batch_checks")
    if checks:
        line = ", ".join(checks["probes"]) or "none"
        line += (", samples independent of their batch-mates" if checks["independence"]
                 else ", runs and shapes only")
        line += "".join(f"; {probe} skipped: {why}" for probe, why in checks["skipped"].items())
        if checks.get("coupled_since"):
            line += f"; samples depend on their batch-mates from '{checks['coupled_since']}' on"
        items.append(("batch checks", line))
    return items


def document(report: dict[str, Any], figures: set[str]) -> list[Section]:
    """Every section of the human report, in reading order; ``figures`` names the plots
    that were drawn (a figure is referenced only when it exists)."""
    sections = [Section("Build", [KeyValues(header_items(report))], anchor="build")]
    passes: list[Any] = [pass_table(report)]
    if "passes" in figures:
        passes.append(Figure("passes", "Metric and model size after each pass"))
    sections.append(Section("Passes", passes, anchor="passes"))
    latency = latency_blocks(report)
    if "latency" in figures:
        latency.append(Figure("latency", "Median latency of each interleaved round"))
    sections.append(Section("Latency", latency, anchor="latency"))
    engine = engine_blocks(report)
    if engine:
        sections.append(Section("TensorRT engine", engine, anchor="engine"))
    layers = layer_table(report)
    if layers is not None:
        blocks: list[Any] = []
        if "layers" in figures:
            blocks.append(Figure("layers", "Per-layer size before and after"))
        if "int8" in figures:
            blocks.append(Figure("int8", "INT8 sensitivity per layer"))
        sections.append(Section("Layers", [*blocks, layers], anchor="layers"))
    sections += pass_sections(report)
    return sections
