"""The human report: report.md and report.html say what a person needs in readable form,
plots appear only when they show something, and the HTML page renders in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DEMO_MODEL, write_recipe

from optcc.build import build
from optcc.report import content, plots
from optcc.report.format import fmt_bytes, fmt_int, fmt_seconds, fmt_value, short_names

RECIPE = f"""\
version: 1
name: report-check
model: {DEMO_MODEL}
target: {{backend: onnxruntime, threads: 1, runs: 6, rounds: 3, warmup: 1}}
data:
  calibration: {{source: digits, split: train, batch_size: 128, limit: 256}}
  evaluation: {{source: digits, split: test, batch_size: 256}}
passes:
  - fold-constants
  - prune-channels: {{ratio: 0.5}}
  - recalibrate-batchnorm
  - fold-batchnorm
  - quantize-int8: {{method: max, max_accuracy_drop: 0.01}}
output: ../../out dir/report check
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One real build that prunes, recalibrates, folds and quantizes with a budget; its
    output folder path has '..' and a space in it."""
    folder = tmp_path_factory.mktemp("report") / "recipes" / "sub"
    folder.mkdir(parents=True)
    result = build(write_recipe(folder, RECIPE))
    return result.output_dir, result.report


def test_every_written_file_is_listed(built: tuple[Path, dict[str, Any]]) -> None:
    out, report = built
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and not p.name.startswith(".optcc-"))
    assert sorted(report["files"]) == on_disk
    assert {"model.onnx", "report.json", "report.md", "report.html", "plots/layers.png",
            "plots/passes.png", "plots/int8.png", "plots/latency.png"} <= set(on_disk)
    assert any(f.startswith("passes/") and f.endswith("calibration.cache") for f in on_disk)
    assert json.loads((out / "report.json").read_text())["files"] == report["files"]


def test_markdown_is_readable(built: tuple[Path, dict[str, Any]]) -> None:
    out, report = built
    md = (out / "report.md").read_text()
    # Nothing raw: no JSON or Python reprs cut off mid-string, no '..' in paths.
    assert '{"' not in md and "{'" not in md and "`[" not in md and "/../" not in md
    assert "0.7477" not in md  # fractions are percentages...
    removed = report["passes"][1]["stats"]["params_removed"]
    assert f"- params removed: {100 * removed:.2f} %" in md
    for title in ("## Passes", "## Latency", "## Layers", "## Pass details", "## Files"):
        assert title in md
    # ... and decisions come with their reasons, as tables.
    assert "**groups**" in md and "**blocked**" in md and "reaches the graph output" in md
    assert re.search(r"\| name \| op \| precision \|( [a-z]+ \|)* reason \| sensitivity \|", md)
    assert "lossy (judged by accuracy)" in md
    for name in ("layers", "passes", "int8", "latency"):
        assert f"](plots/{name}.png)" in md


def test_summary_and_latency_rounds(built: tuple[Path, dict[str, Any]]) -> None:
    _, report = built
    summary = report["summary"]
    low, high = summary["speedup_range"]
    assert low <= summary["speedup"] * 1.0001 and summary["speedup"] <= high * 1.0001
    assert isinstance(summary["speedup_trustworthy"], bool)
    for label in ("original", "final"):
        assert report[label]["latency"]["rounds"] == 3
        assert len(report[label]["latency"]["round_medians_ms"]) == 3
    line = content.summary_line(report)
    assert line.startswith("parameters ×") and "speed-up ×" in line and "accuracy " in line


def test_html_is_one_self_contained_page(built: tuple[Path, dict[str, Any]]) -> None:
    out, report = built
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Offline: nothing is loaded from anywhere; links only point at files beside it.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "<img" not in page and "@import" not in page
    assert page.count("<svg") == 4  # layers, passes, int8, latency: drawn inline
    for anchor in ("build", "passes", "latency", "layers", "details", "files"):
        assert f'id="{anchor}"' in page
    assert page.count("<details") == len(report["passes"])
    for f in report["files"]:
        assert f'href="{f}"' in page


def _layer_panels(report: dict[str, Any]) -> list[str]:
    plt = plots._pyplot()
    fig = plots.layers_figure(report, plt)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    plt.close(fig)
    return titles


def test_plots_skip_empty_panels(built: tuple[Path, dict[str, Any]]) -> None:
    _, report = built
    # Structured pruning leaves no zeros behind: no sparsity panel, but channels shrank.
    assert _layer_panels(report) == ["parameters (weight + bias)", "output channels"]
    sparse = json.loads(json.dumps(report))
    for layer in sparse["layers"]["final"]:
        layer["sparsity"] = 0.5
    sparse["passes"] = []
    assert _layer_panels(sparse) == ["parameters (weight + bias)", "weight sparsity (%)"]
    single_round = json.loads(json.dumps(report))
    for label in ("original", "final"):
        single_round[label]["latency"]["round_medians_ms"] = [1.0]
    plt = plots._pyplot()
    assert plots.latency_figure(single_round, plt) is None
    no_budget = json.loads(json.dumps(report))
    for rec in no_budget["passes"]:
        for row in (rec.get("stats") or {}).get("layers") or []:
            row.pop("sensitivity", None)
    assert plots.int8_figure(no_budget, plt) is None


def test_tolerance_names_the_metric_that_judges_lossy_passes() -> None:
    record = {"tolerance": "lossy (judged by the metric)"}
    assert content.tolerance_text(record, {"metric": {"name": "agreement"}}) == (
        "lossy (judged by agreement)")
    assert content.tolerance_text(record, {"metric": {"name": "accuracy"}}) == (
        "lossy (judged by accuracy)")
    assert content.tolerance_text(record, {"metric": None}) == (
        "lossy (not judged: no evaluation data)")
    exact = {"tolerance": "exact"}
    assert content.tolerance_text(exact, {"metric": {"name": "agreement"}}) == "exact"


def test_agreement_build_says_judged_by_agreement(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"""\
version: 1
model: {DEMO_MODEL}
target: {{backend: onnxruntime, runs: 2, rounds: 2, warmup: 0}}
data:
  evaluation: {{source: random, samples: 16, batch_size: 8}}
passes:
  - prune-channels: {{ratio: 0.25}}
output: out
""")
    result = build(recipe)
    row = content.pass_rows(result.report)[1]
    assert row[-1] == "lossy (judged by agreement)"
    assert "lossy (judged by agreement)" in (result.output_dir / "report.md").read_text()


def test_formatting() -> None:
    assert [fmt_int(n) for n in (950, 1290, 9216, 520_778, 30_747_136, 100_000)] == [
        "950", "1.29k", "9.22k", "520.8k", "30.75M", "100k"]
    assert fmt_bytes(133_283) == "130 KiB" and fmt_bytes(2_083_112) == "1.99 MiB"
    assert fmt_seconds(0.0213) == "0.02 s" and fmt_seconds(159.8) == "2 min 40 s"
    assert fmt_value("params_removed", 0.7477) == "74.77 %"
    assert fmt_value("mean_shift", 0.000104661) == "0.0001047"
    assert fmt_value("calibration_seconds", 1.021) == "1.02 s"
    assert fmt_value("units", 36864) == "36,864" and fmt_value("skipped", {}) == "none"
    assert short_names(["/enc/layer.0/attn/q/MatMul", "/enc/layer.0/ffn/MatMul"]) == [
        "attn/q/MatMul", "ffn/MatMul"]
    assert len(short_names(["x" * 80])[0]) == 34


def test_long_stats_become_tables_cut_with_a_note() -> None:
    stats = {"kept": 3, "per_layer": [{"name": f"l{i}", "share": 0.5} for i in range(100)],
             "reasons": {"a": "too small", "b": "reaches the output"}}
    blocks = content.stats_blocks(stats)
    assert isinstance(blocks[0], content.KeyValues) and blocks[0].items == [("kept", "3")]
    table = next(b for b in blocks if isinstance(b, content.Table) and b.title == "per layer")
    assert len(table.rows) == content.MAX_TABLE_ROWS and table.rows[0] == ["l0", "50.00 %"]
    assert table.note == "40 more rows in report.json"
    reasons = next(b for b in blocks if isinstance(b, content.Table) and b.title == "reasons")
    assert reasons.rows == [["a", "too small"], ["b", "reaches the output"]]


# --------------------------------------------------------------------------- a real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def render_in_chromium(page: Path, png: Path, profile: Path, *, width: int = 1280,
                       height: int = 2400) -> str:
    """Open ``page`` in headless Chromium, offline and with a fresh profile; write a
    screenshot to ``png`` and return the DOM after the page's scripts ran."""
    browser = _chromium()
    assert browser is not None
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}"]
    subprocess.run([*flags, f"--screenshot={png}", page.as_uri()], check=True,
                   capture_output=True, timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120)
    return dom.stdout


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt install chromium)")
def test_report_html_renders_in_headless_chromium(built: tuple[Path, dict[str, Any]],
                                                  tmp_path: Path) -> None:
    import matplotlib.image

    out, report = built
    png = tmp_path / "report.png"
    dom = render_in_chromium(out / "report.html", png, tmp_path / "profile")
    assert dom.count("<svg") == 4 and 'class="card"' in dom
    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.shape[:2] == (2400, 1280)
    ink = (pixels.mean(axis=2) < 0.9).mean()
    assert 0.03 < ink < 0.6, f"page looks blank or broken ({ink:.1%} ink)"

    def share(color: str) -> float:
        rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return float((np.abs(pixels - rgb).max(axis=2) < 0.03).mean())

    # The plots were drawn by the browser: their bar colours cover part of the page.
    assert share(plots.PRECISION_COLORS["int8"]) > 0.002
    assert share(plots.BEFORE) > 0.002


def test_nested_stats_open_up_into_their_own_lines_and_tables() -> None:
    from optcc.report.content import KeyValues, Table, stats_blocks

    blocks = stats_blocks({"kept": 2, "latency": {"threads": 1, "timings": [
        {"shape": "batch 1", "float_ms": 0.08, "int8_ms": 0.04},
        {"shape": "batch 128", "float_ms": 8.1, "int8_ms": 3.2}]}})
    assert isinstance(blocks[0], KeyValues) and blocks[0].items == [("kept", "2")]
    assert isinstance(blocks[1], KeyValues) and blocks[1].items == [("latency threads", "1")]
    table = blocks[2]
    assert isinstance(table, Table) and table.title == "latency timings"
    assert table.headers == ["shape", "float ms", "int8 ms"] and table.rows[1] == ["batch 128", "8.1", "3.2"]
