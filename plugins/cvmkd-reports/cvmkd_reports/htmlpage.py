"""The report's blocks (``document.py``) as one self-contained HTML page: inline CSS, plots as
base64 ``data:`` URIs, no JavaScript and nothing fetched from anywhere."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

from cvmkd_reports.document import Block

CSS = """
:root { --ink: #1d2330; --muted: #6b7280; --line: #e5e7eb; --head: #f3f4f6; --accent: #1f4e79; }
* { box-sizing: border-box; }
body { margin: 0; background: #eef0f3; color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 36px 60px; background: #fff; min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 14px; color: var(--accent); }
h2 { font-size: 20px; margin: 38px 0 10px; padding-bottom: 6px; border-bottom: 2px solid var(--line); color: var(--accent); }
h3 { font-size: 16px; margin: 24px 0 8px; }
h4 { font-size: 14px; margin: 18px 0 6px; color: #374151; }
p { margin: 8px 0; max-width: 980px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--head); padding: 1px 4px; border-radius: 3px; }
nav { margin: 6px 0 18px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; }
nav a:hover { text-decoration: underline; }
.banner { border-radius: 8px; padding: 14px 18px; margin: 12px 0 18px; border-left: 8px solid; }
.banner .title { font-size: 18px; font-weight: 700; }
.banner .text { margin-top: 4px; }
.banner.passed { background: #e7f6ec; border-color: #1e8e3e; color: #14532d; }
.banner.failed { background: #fdecea; border-color: #c62828; color: #7f1d1d; }
.banner.none { background: #f3f4f6; border-color: #9ca3af; color: #374151; }
.facts { display: grid; grid-template-columns: repeat(auto-fit, minmax(165px, 1fr)); gap: 10px; margin: 10px 0 14px; }
.fact { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fafbfc; }
.fact .label { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.fact .value { font-size: 16px; font-weight: 600; margin-top: 2px; }
.note { background: #fff8e6; border-left: 4px solid #f0ad4e; padding: 8px 12px; border-radius: 4px; }
.wrap { overflow-x: auto; margin: 8px 0 14px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th { background: var(--head); font-weight: 600; text-align: left; padding: 7px 9px; border-bottom: 2px solid #d1d5db; vertical-align: bottom; }
td { padding: 5px 9px; border-bottom: 1px solid var(--line); vertical-align: top; }
tbody tr:nth-child(even) td { background: #fafbfc; }
th.r, td.r { text-align: right; }
td .sub { display: block; font-size: 10.5px; color: var(--muted); white-space: nowrap; }
td.up .sub { color: #15803d; font-weight: 600; }
td.down .sub { color: #b42318; font-weight: 600; }
td.good { color: #166534; background: #e9f7ef !important; }
td.bad { color: #b42318; background: #fdeeed !important; }
td.good .sub, td.bad .sub { color: inherit; opacity: .8; }
td.best { font-weight: 700; background: #fff6d6 !important; }
td.muted { color: #9aa1ad; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.kv td { word-break: break-word; }
table.hp td:first-child { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
table.hp td:last-child { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { font-size: 12.5px; color: var(--muted); margin-top: 4px; }
.missing-plot { color: var(--muted); font-style: italic; }
.examples { display: grid; gap: 10px; margin: 8px 0 14px; }
.example { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; background: #fcfcfd; }
.example .title { font-size: 12px; font-weight: 600; color: var(--muted); margin-bottom: 4px; }
.example dl { display: grid; grid-template-columns: 92px 1fr; gap: 2px 10px; margin: 0; }
.example dt { color: var(--muted); font-size: 12.5px; }
.example dd { margin: 0; }
.groups { columns: 3 380px; column-gap: 18px; margin: 8px 0 14px; }
.group { break-inside: avoid; margin: 0 0 14px; border: 1px solid var(--line); border-radius: 6px; padding: 6px 8px 2px; }
.group .title { font-weight: 600; color: var(--accent); margin: 0 0 2px 2px; }
.group .wrap { margin: 0; }
.group table { width: 100%; }
.group th { display: none; }
ul { margin: 6px 0 12px; padding-left: 22px; }
li { margin: 2px 0; }
"""


def _text(value: Any) -> str:
    """Escaped text, with `code` spans."""
    escaped = html.escape(" ".join(str(value).split()))
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _cell(value: Any, align: str, tag: str = "td") -> str:
    classes = ["r"] if align == "r" else []
    if isinstance(value, dict):
        if value.get("mark"):
            classes.append(value["mark"])
        inner = _text(value.get("text", ""))
        if value.get("sub"):
            inner += f'<span class="sub">{_text(value["sub"])}</span>'
    else:
        inner = _text(value)
    attr = f' class="{" ".join(classes)}"' if classes else ""
    return f"<{tag}{attr}>{inner}</{tag}>"


def _table(block: Block, css: str = "") -> str:
    align = block["align"]
    head = "".join(_cell(c, align[i], "th") for i, c in enumerate(block["columns"]))
    body = "\n".join("<tr>" + "".join(_cell(c, align[i]) for i, c in enumerate(row)) + "</tr>" for row in block["rows"])
    attr = f' class="{css}"' if css else ""
    return f'<div class="wrap"><table{attr}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>'


def _block(block: Block, section: str | None) -> str:
    kind = block["type"]
    if kind == "heading":
        level = block["level"]
        anchor = f' id="{html.escape(block["anchor"])}"' if block.get("anchor") else ""
        return f"<h{level}{anchor}>{_text(block['text'])}</h{level}>"
    if kind == "banner":
        text = f'<div class="text">{_text(block["text"])}</div>' if block["text"] else ""
        return f'<div class="banner {block["state"]}"><div class="title">{_text(block["title"])}</div>{text}</div>'
    if kind == "facts":
        cards = "".join(
            f'<div class="fact"><div class="label">{_text(label)}</div><div class="value">{_text(value)}</div></div>'
            for label, value in block["items"]
        )
        return f'<div class="facts">{cards}</div>'
    if kind == "para":
        css = ' class="note"' if block.get("style") == "note" else ""
        return f"<p{css}>{_text(block['text'])}</p>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{_text(item)}</li>" for item in block["items"]) + "</ul>"
    if kind == "table":
        css = {"run": "kv", "hyperparameters": "kv hp"}.get(section or "", "")
        return _table(block, css)
    if kind == "plot":
        plot = block["plot"]
        if plot.get("missing"):
            return f'<p class="missing-plot">Plot “{_text(plot["title"])}” not drawn: {_text(plot["missing"])}.</p>'
        data = base64.b64encode(plot["png"]).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(plot["title"])}">'
            f"<figcaption>{_text(plot['title'])}</figcaption></figure>"
        )
    if kind == "examples":
        items = []
        for item in block["items"]:
            fields = "".join(f"<dt>{_text(label)}</dt><dd>{_text(text)}</dd>" for label, text in item["fields"])
            items.append(f'<div class="example"><div class="title">{_text(item["title"])}</div><dl>{fields}</dl></div>')
        return f'<div class="examples">{"".join(items)}</div>'
    if kind == "groups":
        cards = "".join(
            f'<div class="group"><div class="title">{_text(title)}</div>{_table(inner, "kv hp")}</div>'
            for title, inner in block["items"]
        )
        return f'<div class="groups">{cards}</div>'
    raise ValueError(f"unknown block type {kind!r}")


def render(blocks: list[Block], title: str) -> str:
    sections = [
        (b["anchor"], b["text"]) for b in blocks if b["type"] == "heading" and b["level"] == 2 and b.get("anchor")
    ]
    nav = "<nav>" + "".join(f'<a href="#{html.escape(a)}">{_text(t)}</a>' for a, t in sections) + "</nav>"
    body: list[str] = []
    section: str | None = None
    for index, block in enumerate(blocks):
        if block["type"] == "heading" and block["level"] == 2:
            section = block.get("anchor")
        body.append(_block(block, section))
        if index == 0:
            body.append(nav)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )
