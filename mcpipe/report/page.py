"""The report's ``index.html``: one self-contained page that shows the PNGs with the run's numbers and config."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from mcpipe.atomic import write_text_atomic

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #212529; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #dee2e6; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #dee2e6; padding: 0.25em 0.6em; }
th { background: #f1f3f5; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #e9ecef; }
figcaption { color: #495057; font-size: 0.9em; } .note { color: #862e9c; }
pre { background: #f8f9fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class Table:
    header: list[str] | None
    rows: list[list[str]]


@dataclass
class Section:
    """One run's part of the page (or the sweep's overview)."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (PNG path relative to the page, caption)
    notes: list[str] = field(default_factory=list)
    config_text: str = ""


def _table(t: Table) -> str:
    def cell(v: str, tag: str) -> str:
        num = tag == "td" and v[:1].isdigit()
        return f"<{tag}{' class=num' if num else ''}>{html.escape(v)}</{tag}>"
    head = "<tr>" + "".join(cell(h, "th") for h in t.header) + "</tr>" if t.header else ""
    body = "".join("<tr>" + "".join(cell(v, "th" if t.header is None and i == 0 else "td") for i, v in enumerate(r))
                   + "</tr>" for r in t.rows)
    return f"<table>{head}{body}</table>"


def _section(s: Section, level: int) -> str:
    parts = [f"<h{level}>{html.escape(s.title)}</h{level}>"]
    if s.facts:
        parts.append(_table(Table(None, [[k, v] for k, v in s.facts])))
    parts += [_table(t) for t in s.tables]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
    for src, caption in s.figures:
        parts.append(f'<figure><a href="{html.escape(src)}"><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                     f'</a><figcaption>{html.escape(caption)}</figcaption></figure>')
    if s.config_text:
        parts.append(f"<details><summary>config</summary><pre>{html.escape(s.config_text)}</pre></details>")
    return "\n".join(parts)


def write_page(path: Path, title: str, sections: list[Section], *, source: Path) -> Path:
    """Write ``path`` (atomically): the title, where the run lives, then every section."""
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Run folder: <code>{html.escape(str(source))}</code></p>"]
    body += [_section(s, 2) for s in sections]
    text = ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    write_text_atomic(text, path)
    return path
