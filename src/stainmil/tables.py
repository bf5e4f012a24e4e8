"""Tables the CLI prints, in three forms: plain text that fits a terminal (full names, never cut), markdown and
JSON. Plain text has no colours or box drawing, so it pipes into ``grep`` and ``cut`` as it looks."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence

FORMATS = ("text", "markdown", "json")


def render_table(rows: Sequence[dict], columns: Sequence[str] | None = None, fmt: str = "text") -> str:
    """``rows`` (dicts with the same keys) as ``fmt``; ``columns``: which keys, in order (default: all)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {FORMATS}")
    columns = list(columns or (rows[0].keys() if rows else []))
    if fmt == "json":
        return json.dumps([{c: row[c] for c in columns} for row in rows], indent=2, default=str) + "\n"
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
        return "\n".join(lines) + "\n"
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(row[c], numbers.Number) for row in rows) for c in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(v) for v in cells]) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
