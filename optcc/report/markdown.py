"""``report.md``: the report's content as GitHub-flavoured Markdown, plots as PNG links."""

from __future__ import annotations

from typing import Any

from optcc.report import content
from optcc.report.content import Table


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(t: Table) -> list[str]:
    out = [f"**{t.title}**", ""] if t.title else []
    align = [("---:" if (t.numeric[i] if i < len(t.numeric) else False) else "---")
             for i in range(len(t.headers))]
    out.append("| " + " | ".join(_cell(h) for h in t.headers) + " |")
    out.append("|" + "|".join(align) + "|")
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        out += ["", f"*{t.note}*"]
    return out + [""]


def _block(block: Any, plots: dict[str, dict[str, Any]]) -> list[str]:
    if isinstance(block, Table):
        return table(block)
    if isinstance(block, content.KeyValues):
        return [f"- {key}: {value}" for key, value in block.items] + [""]
    if isinstance(block, content.Text):
        return [block.text, ""]
    if isinstance(block, content.Steps):
        return [f"{i}. {step}" for i, step in enumerate(block.items, 1)] + [""]
    if isinstance(block, content.Figure):
        png = (plots.get(block.name) or {}).get("png")
        return [f"![{block.caption}]({png})", ""] if png else []
    raise TypeError(type(block).__name__)


def render(report: dict[str, Any], plots: dict[str, dict[str, Any]]) -> str:
    out = [f"# optcc build report: {report['recipe']['name']}", ""]
    items = content.summary_items(report)
    if items:
        out += table(Table(["", *[label for label, _, _ in items]],
                           [["change", *[head for _, head, _ in items]],
                            ["", *[detail for _, _, detail in items]]]))
    for warning in content.warnings_of(report):
        out += [f"> **Warning:** {warning}", ""]
    sections: list[content.Section] = content.document(report, set(plots))
    in_details = False
    for section in sections:
        if section.details and not in_details:
            out += ["## Pass details", ""]
            in_details = True
        out += [("### " if section.details else "## ") + section.title, ""]
        for block in section.blocks:
            out += _block(block, plots)
    files = report.get("files")
    if files:
        out += ["## Files", "", *[f"- [{f}]({f})" for f in files], ""]
    return "\n".join(out).rstrip() + "\n"
