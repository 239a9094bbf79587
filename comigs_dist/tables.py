"""Plain-text and Markdown tables whose columns fit their content.

Owns the one layout of every table the project prints: each column as wide as its widest cell
(header included, wide characters counted twice), numbers right-aligned and text left-aligned
unless told otherwise, two spaces between columns, no trailing blanks. Knows nothing of what the
tables hold.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable, Sequence

# a number as the tables print it: 12, -3.5, 1,234, 1e-3, 45.2%, nan, and "12.1 ± 0.3"
_NUMBER = re.compile(r"[-+]?((\d[\d,]*)?\.?\d+([eE][-+]?\d+)?%?|nan|inf)", re.IGNORECASE)


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: East Asian wide characters take two, combining marks none."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _is_number(cell: str) -> bool:
    return all(_NUMBER.fullmatch(part.strip()) for part in cell.split("±"))


def _cells(row: Sequence[Any]) -> list[str]:
    return ["" if c is None else str(c) for c in row]


def column_align(body: list[list[str]], n_cols: int) -> str:
    """'>' for a column whose filled cells are all numbers ('-' counts as a missing number), else '<'."""
    out = []
    for i in range(n_cols):
        filled = [r[i] for r in body if i < len(r) and r[i] not in ("", "-")]
        out.append(">" if filled and all(_is_number(c) for c in filled) else "<")
    return "".join(out)


def _pad(cell: str, width: int, align: str) -> str:
    fill = " " * (width - display_width(cell))
    return fill + cell if align == ">" else cell + fill


def _widths(rows: list[list[str]], n_cols: int) -> list[int]:
    return [max((display_width(r[i]) for r in rows if i < len(r)), default=0) for i in range(n_cols)]


def format_table(header: Sequence[Any] | None, rows: Iterable[Sequence[Any]], align: str | None = None,
                 footer: Iterable[Sequence[Any]] = (), indent: str = "", gap: int = 2, rule: bool = True) -> str:
    """Rows of cells as aligned text.

    ``header``: column names (None: no header); ``align``: one '<' or '>' per column (default: by
    content, see ``column_align``); ``footer``: rows after a second rule (totals, means);
    ``rule``: a line of dashes under the header and above the footer."""
    body = [_cells(r) for r in rows]
    foot = [_cells(r) for r in footer]
    head = _cells(header) if header is not None else None
    n_cols = max([len(r) for r in body + foot + ([head] if head else [])], default=0)
    align = align or column_align(body, n_cols)
    if len(align) != n_cols:
        raise ValueError(f"align ({align!r}) needs one '<' or '>' per column ({n_cols})")
    widths = _widths(body + foot + ([head] if head else []), n_cols)
    sep = " " * gap

    def line(cells: list[str]) -> str:
        cells = cells + [""] * (n_cols - len(cells))
        return (indent + sep.join(_pad(c, w, a) for c, w, a in zip(cells, widths, align))).rstrip()

    dashes = (indent + sep.join("-" * w for w in widths)).rstrip()
    out = []
    if head is not None:
        out.append(line(head))
        if rule:
            out.append(dashes)
    out += [line(r) for r in body]
    if foot:
        if rule:
            out.append(dashes)
        out += [line(r) for r in foot]
    return "\n".join(out)


def format_markdown(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown (GitHub) table padded so that it also reads aligned as plain text."""
    head, body = _cells(header), [_cells(r) for r in rows]
    n_cols = len(head)
    align = align or column_align(body, n_cols)
    widths = [max(w, 3) for w in _widths([head] + body, n_cols)]
    line = lambda cells: "| " + " | ".join(_pad(c, w, a) for c, w, a in zip(cells + [""] * (n_cols - len(cells)),
                                                                                  widths, align)) + " |"
    marks = "|" + "|".join("-" * (w + 1) + ":" if a == ">" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(head), marks] + [line(r) for r in body])
