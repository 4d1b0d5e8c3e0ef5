"""Build reports. ``report.json`` is the machine-readable source of truth (schema in
docs/report.md); everything here is derived from it:

- ``report.html``: the main human report, one self-contained page (summary, tables, plots,
  per-pass decisions), readable offline;
- ``report.md``: the same tables in Markdown, with the plots as PNG files in ``plots/``;
- the tables and summary line ``optcc build`` prints.

:mod:`optcc.report.content` decides what is said, :mod:`~optcc.report.plots` draws,
:mod:`~optcc.report.markdown` and :mod:`~optcc.report.html` render.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from optcc.report.content import (
    LATENCY_HEADERS,
    PASS_HEADERS,
    latency_rows,
    metric_text,
    pass_rows,
    summary_line,
    warnings_of,
)
from optcc.report.format import fmt_bytes, fmt_int

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md", "report.html")

__all__ = [
    "LATENCY_HEADERS",
    "PASS_HEADERS",
    "REPORT_FILES",
    "fmt_bytes",
    "fmt_int",
    "latency_rows",
    "metric_text",
    "pass_rows",
    "summary_line",
    "warnings_of",
    "write_reports",
]


def write_reports(report: dict[str, Any], folder: Path) -> list[str]:
    """Write the plots, ``report.json``, ``report.md`` and ``report.html`` into ``folder``.

    ``report["files"]`` becomes the list of every file in the folder once these are
    written (relative POSIX paths; optcc's hidden ``.optcc-*`` bookkeeping files are not
    listed), which is also returned."""
    from optcc.report import html, markdown, plots

    drawn = plots.draw(report, folder)
    written = {entry["png"] for entry in drawn.values() if entry.get("png")} | set(REPORT_FILES)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and not p.name.startswith(".optcc-")}  # not optcc's bookkeeping
    report["files"] = sorted(present | written, key=_file_order)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(markdown.render(report, drawn))
    (folder / "report.html").write_text(html.render(report, drawn))
    return list(report["files"])


def _file_order(path: str) -> tuple[int, str]:
    """The artifact and reports first, then plots and per-pass files."""
    depth = path.count("/")
    return (depth, path)
