"""The report's blocks (``document.py``) as Markdown; plots are referenced as ``plots/<name>.png``."""

from __future__ import annotations

from typing import Any

from cvmkd_reports.document import Block

PLOTS_DIR = "plots"


def _inline(text: Any) -> str:
    return " ".join(str(text).split())


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        text = _inline(value.get("text", ""))
        if value.get("sub"):
            text += f" ({_inline(value['sub'])})"
        if value.get("mark") == "best" and text:
            text = f"**{text}**"
    else:
        text = _inline(value)
    return text.replace("|", "\\|") or " "


def _table(block: Block) -> list[str]:
    columns = block["columns"]
    align = block["align"]
    lines = ["| " + " | ".join(_cell(c) or " " for c in columns) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    for row in block["rows"]:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def _block(block: Block) -> list[str]:
    kind = block["type"]
    if kind == "heading":
        return ["#" * block["level"] + " " + _inline(block["text"])]
    if kind == "banner":
        symbol = {"passed": "✅", "failed": "❌"}.get(block["state"], "⚪")
        lines: list[str] = [f"> {symbol} **{_inline(block['title'])}**"]  # declared once for every branch below
        if block["text"]:
            lines += [">", f"> {_inline(block['text'])}"]
        return lines
    if kind == "facts":
        labels = [label for label, _ in block["items"]]
        return _table({"columns": labels, "align": "l" * len(labels), "rows": [[value for _, value in block["items"]]]})
    if kind == "para":
        text = _inline(block["text"])
        return [f"> **Note:** {text}" if block.get("style") == "note" else text]
    if kind == "list":
        return [f"- {_inline(item)}" for item in block["items"]]
    if kind == "table":
        return _table(block)
    if kind == "plot":
        plot = block["plot"]
        if plot.get("missing"):
            return [f"*Plot “{plot['title']}” not drawn: {_inline(plot['missing'])}.*"]
        return [f"![{plot['title']}]({PLOTS_DIR}/{plot['file']})"]
    if kind == "examples":
        lines = []
        for item in block["items"]:
            lines.append(f"**{_inline(item['title'])}**")
            lines.append("")
            lines += [f"- *{label}*: {_inline(text)}" for label, text in item["fields"]]
            lines.append("")
        return lines[:-1] if lines else lines
    if kind == "groups":
        lines = []
        for title, inner in block["items"]:
            lines += [f"**{_inline(title)}**", "", *_table(inner), ""]
        return lines[:-1]
    raise ValueError(f"unknown block type {kind!r}")


def render(blocks: list[Block]) -> str:
    parts = ["\n".join(_block(block)) for block in blocks]
    return "\n\n".join(parts) + "\n"
