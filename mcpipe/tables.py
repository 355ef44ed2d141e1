"""Plain-text tables for the terminal (sweep results, report summaries)."""

from __future__ import annotations


def align_columns(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: columns left-aligned to their widest cell, two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])
