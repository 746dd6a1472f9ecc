"""Report rendering: sections (title, text, a figure, tables, notes) to Markdown and HTML.

`eval/report.py` builds the sections from a run's results; this module only formats them.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    title: str
    text: str = ""
    figure: str | None = None  # file name under report_plots/
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def ci(r: dict, key: str = "ci95") -> str:
    v = r.get(key)
    return f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]" if isinstance(v, list) and len(v) == 2 else "–"


def num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "–" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _md_table(t: Table) -> str:
    def cell(x: Any) -> str:
        return str(num(x)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in t.headers) + " |",
             "|" + "|".join("---" for _ in t.headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in t.rows]
    return "\n".join(lines)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(num(x)))}</td>" for x in r) + "</tr>"
                   for r in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1300px;
padding:0 1em;color:#222}h1{border-bottom:2px solid #ddd}h2{margin-top:2em;border-bottom:1px solid #eee}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}.row img{max-width:640px;width:100%;
border:1px solid #eee}.tables{flex:1;min-width:320px;overflow-x:auto}table{border-collapse:collapse;
font-size:0.85em;margin-bottom:1em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f4f4f4}.note{color:#666;font-size:0.9em}"""


def render(sections: list[Section], missing: list[str], run: Path, out: Path, plots: Path,
           inline: bool = False) -> tuple[str, str]:
    """The Markdown and HTML text of the report."""
    inside = plots.resolve().is_relative_to(out.resolve())
    rel_plots = plots.resolve().relative_to(out.resolve()) if inside else plots.resolve()
    title = f"Llama 2 recipe report: {run.resolve().name}"
    md = [f"# {title}", "", f"Run directory: `{run}`", ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p class='note'>Run directory: <code>{html.escape(str(run))}"
            "</code></p>"]
    toc = [f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections)]
    if toc:
        body.append("<ul>" + "".join(toc) + "</ul>")
    for i, s in enumerate(sections):
        md += [f"## {s.title}", ""]
        body.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.text:
            md += [s.text, ""]
            body.append(f"<p>{html.escape(s.text)}</p>")
        img = ""
        if s.figure:
            src = (rel_plots / s.figure).as_posix()
            md += [f"![{s.title}]({src})", ""]
            if inline:
                data = base64.b64encode((plots / s.figure).read_bytes()).decode()
                src = f"data:image/png;base64,{data}"
            img = f"<img src='{html.escape(src)}' alt='{html.escape(s.title)}'>"
        for t in s.tables:
            md += [_md_table(t), ""]
        for n in s.notes:
            md += [f"> {n}", ""]
        tables = "".join(_html_table(t) for t in s.tables)
        notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in s.notes)
        body.append(f"<div class='row'>{img}<div class='tables'>{tables}{notes}</div></div>")
    if missing:
        md += ["## Not in this run", ""] + [f"- {m}" for m in missing] + [""]
        body.append("<h2>Not in this run</h2><ul class='note'>"
                    + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return "\n".join(md) + "\n", page
