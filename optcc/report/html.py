"""``report.html``: one self-contained page (inline CSS, plots as inline SVG, a few lines of
script for sortable tables), readable offline and safe to mail or attach to an issue.
Nothing is fetched from the network."""

from __future__ import annotations

import html
from typing import Any

from optcc.report.content import (
    Figure,
    KeyValues,
    Steps,
    Table,
    Text,
    document,
    summary_items,
    warnings_of,
)
from optcc.report.format import fmt_path

CSS = """
:root { --ink: #1d2733; --muted: #5b6776; --line: #dde3ea; --accent: #2c6fbb;
        --good: #2e8b57; --warn-bg: #fff6e0; --warn-line: #e0a800; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Helvetica, Arial,
       sans-serif; color: var(--ink); margin: 0; background: #f6f8fa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff;
       min-height: 100vh; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 16px; }
nav { margin: 0 0 18px; font-size: 13px; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px;
         margin: 8px 0 16px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
               letter-spacing: .04em; }
.card .value { font-size: 26px; font-weight: 600; }
.card .detail { color: var(--muted); font-size: 12px; }
.warning { background: var(--warn-bg); border-left: 4px solid var(--warn-line); padding: 8px 12px;
           margin: 8px 0; border-radius: 4px; }
table { border-collapse: collapse; margin: 6px 0 4px; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; cursor: pointer; user-select: none;
     white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:hover { background: #f7fafd; }
.tablewrap { overflow-x: auto; }
.note { color: var(--muted); font-size: 12px; margin: 2px 0 10px; }
.caption { color: var(--muted); font-size: 12px; margin: 2px 0 14px; }
figure { margin: 10px 0; }
figure svg { max-width: 100%; height: auto; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 6px 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; word-break: break-word; }
details { border: 1px solid var(--line); border-radius: 6px; margin: 8px 0; padding: 6px 12px; }
details > summary { cursor: pointer; font-weight: 600; }
.tabletitle { font-weight: 600; margin-top: 10px; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
code { font-size: 12px; }
"""

# Click a header to sort by that column (numbers by value); click again to reverse.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, index) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var down = th.dataset.order !== "asc";
    th.dataset.order = down ? "asc" : "desc";
    var key = function (row) {
      var text = row.cells[index].textContent.trim();
      var unit = { k: 1e3, M: 1e6, G: 1e9, KiB: 1024, MiB: 1048576, GiB: 1073741824 };
      var m = text.replace(/[,×]/g, "").match(/^(-?[0-9.]+(?:e-?[0-9]+)?)\\s*(k|M|G|KiB|MiB|GiB)?/);
      return m ? parseFloat(m[1]) * (unit[m[2]] || 1) : text.toLowerCase();
    };
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === y) return 0;
      return (x > y ? 1 : -1) * (down ? 1 : -1);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def table(t: Table) -> str:
    def cls(i: int) -> str:
        return ' class="num"' if i < len(t.numeric) and t.numeric[i] else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(t.headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in t.rows
    )
    out = f'<div class="tabletitle">{_e(t.title)}</div>' if t.title else ""
    out += (f'<div class="tablewrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")
    if t.note:
        out += f'<p class="note">{_e(t.note)}</p>'
    return out


def _block(block: Any, plots: dict[str, dict[str, Any]]) -> str:
    if isinstance(block, Table):
        return table(block)
    if isinstance(block, KeyValues):
        items = "".join(
            f'<dt>{_e(k)}</dt><dd><a href="{_e(v)}">{_e(v)}</a></dd>' if k == "file"
            else f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in block.items
        )
        return f'<dl class="kv">{items}</dl>'
    if isinstance(block, Text):
        return f"<p>{_e(block.text)}</p>"
    if isinstance(block, Steps):
        return "<ol>" + "".join(f"<li>{_e(step)}</li>" for step in block.items) + "</ol>"
    if isinstance(block, Figure):
        svg = (plots.get(block.name) or {}).get("svg")
        if not svg:
            return ""
        return f'<figure aria-label="{_e(block.caption)}">{svg}</figure>'
    raise TypeError(type(block).__name__)


def render(report: dict[str, Any], plots: dict[str, dict[str, Any]]) -> str:
    name = report["recipe"]["name"]
    final = report.get("final") or {}
    artifact = (final.get("artifact") or {}).get("path", "–")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>optcc report: {_e(name)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>optcc build report: {_e(name)}</h1>",
        f'<p class="sub">{_e(fmt_path(report["model"]["source"]))} → {_e(artifact)} '
        f'({_e(report["target"]["backend"])})</p>',
    ]
    sections = document(report, set(plots))
    links = [s for s in sections if not s.details]
    nav = "".join(f'<a href="#{_e(s.anchor)}">{_e(s.title)}</a>' for s in links)
    parts.append(f'<nav>{nav}<a href="#details">Pass details</a><a href="#files">Files</a></nav>')
    cards = "".join(
        f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(head)}'
        f'</div><div class="detail">{_e(detail)}</div></div>'
        for label, head, detail in summary_items(report)
    )
    if cards:
        parts.append(f'<section class="cards">{cards}</section>')
    for warning in warnings_of(report):
        parts.append(f'<div class="warning"><b>Warning:</b> {_e(warning)}</div>')
    details_open = False
    for section in sections:
        body = "".join(_block(b, plots) for b in section.blocks)
        if section.details:
            if not details_open:
                parts.append('<h2 id="details">Pass details</h2>')
                details_open = True
            parts.append(f'<details id="{_e(section.anchor)}"><summary>{_e(section.title)}'
                         f"</summary>{body}</details>")
        else:
            parts.append(f'<section id="{_e(section.anchor)}"><h2>{_e(section.title)}</h2>'
                         f"{body}</section>")
    files = report.get("files") or []
    items = "".join(f'<li><a href="{_e(f)}">{_e(f)}</a></li>' for f in files)
    parts.append(f'<h2 id="files">Files</h2><ul>{items}</ul>')
    parts.append(f"<footer>Written by optcc {_e(report['optcc_version'])} from report.json, "
                 "which holds every number on this page.</footer>")
    parts.append(f"</main><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)
