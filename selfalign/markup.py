"""Tables and text as the readers of a run show them: Markdown for the dataset card, HTML for the report, and
the one way a long text is cut short (card examples, plot labels).

Pure string functions with no selfalign imports, so card, report, plots and inspect can all use them.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any


def as_text(value: Any) -> str:
    """A string as it is; anything else as JSON (non-ASCII kept, unknown types through str())."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def shorten(text: Any, limit: int) -> str:
    """`text` on one line (runs of white space made one space), cut to `limit` characters ending in "…".

    >>> shorten("a  b\\nc", 10)
    'a b c'
    >>> shorten("abcdefghij", 5)
    'abcd…'
    """
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- Markdown (the dataset card) ---------------------------------------------------------------------

_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|~])")


def markdown_cell(value: Any) -> str:
    """A table cell: one line, `|` escaped so it cannot end the cell."""
    return as_text(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fence(text: str, language: str = "") -> str:
    """A fenced code block whose fence is longer than any run of backticks in `text`."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def markdown_inline(text: Any, limit: int = 400) -> str:
    """Data shown in running text: shortened, with Markdown/HTML characters escaped so a row cannot restyle
    the card."""
    return _MARKDOWN.sub(r"\\\1", shorten(text, limit))


# -- HTML (the report) -------------------------------------------------------------------------------

def esc(value: Any) -> str:
    """HTML-escaped text; None is empty."""
    return html.escape("" if value is None else str(value))


def html_cell(value: Any) -> str:
    """Numbers with thousands separators (floats to 4 significant digits), dicts and lists as JSON, escaped."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return esc(json.dumps(value, ensure_ascii=False))
    return esc(value)


def html_table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    """A table; the columns in `numeric` (default: those holding only numbers or None) are right-aligned."""
    numeric = numeric if numeric is not None else {
        i for i in range(len(headers)) if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)}
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{html_cell(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
