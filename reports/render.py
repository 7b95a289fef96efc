"""Write a report: Markdown (the main document), CSV and LaTeX per table, one self-contained HTML page.

The HTML page embeds its plots as base64 PNGs and its style inline, so it can be mailed or archived
as a single file and opens offline. The files are written as one set (``write_report``): a failure
leaves the previous report whole, never a new report.md beside an old report.html.

Text from records is untrusted: each format escapes it on top of ``cgh.records.display_text``
(control characters and terminal escapes removed; names already cut to a display length where the
tables are built): ``md_text``, ``html_text``, ``latex_escape``.
"""
from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cgh.errors import CghError
from cgh.io import atomic_write_bytes
from cgh.records import display_text, utc_now
from reports.collect import Collection
from reports.plots import all_plots, comparison_plots
from reports.tables import DASH, Table, paper_tables, ranking_tables, summary_table

NOTES = (
    "Paper columns hold the numbers published in the paper (`reports/reference/paper_results.csv`, "
    "with table, row and line provenance); \"-\" means no number (not run, or not printed in the paper). "
    "Ours: mean, or mean ± sample std (n) when several runs fall into one cell. Δ = ours − paper, "
    "shown whatever the settings: read it together with \"Ours setting\" (pretraining dataset, backbone, "
    "epochs), which marks every reproduction and how it differs from the paper's setting."
)


@dataclass
class Report:
    title: str
    collection: Collection
    sources: list[str]
    summary: Table
    paper: list[Table]
    rankings: list[Table]
    plots: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    comparison_plots: dict[str, tuple[str, bytes]] = field(default_factory=dict)   # one per summary column

    @property
    def tables(self) -> list[Table]:
        return [self.summary] + self.paper + self.rankings


def build_report(collection: Collection, sources: list[str], title: str = "CGH report",
                 reference_sha: str | None = None) -> Report:
    """Every table and plot of the records; ``reference_sha``: the checkpoint the comparison view
    measures differences to (default: the paper's CGH numbers)."""
    recs = collection.records
    summary = summary_table(recs, reference_sha)
    return Report(title, collection, [str(s) for s in sources], summary, paper_tables(recs),
                  ranking_tables(recs), all_plots(recs), comparison_plots(summary))


# ------------------------------------------------------------------------------------------------
# Markdown


def md_text(text) -> str:
    """Text for Markdown (also printed on the terminal): no control characters or escape codes, no raw
    HTML (``<script>`` shows as text), and no ``|`` or backtick that would break a table or a code span."""
    return html.escape(display_text(text, None), quote=False).replace("|", "\\|").replace("`", "\\`")


def markdown_table(df: pd.DataFrame, best: set[tuple[int, str]] = frozenset()) -> str:
    """A Markdown table; cells in ``best`` ((row index, column)) in bold."""
    header = "| " + " | ".join(md_text(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(f"**{md_text(v)}**" if (i, c) in best else md_text(v)
                              for c, v in zip(df.columns, row)) + " |"
            for i, row in enumerate(df.itertuples(index=False))]
    return "\n".join([header, sep, *body])


def _md_section(table: Table, level: str = "##") -> str:
    body = markdown_table(table.display(), table.best) if table.rows else "_No runs._"
    return f"{level} {md_text(table.title)}\n\n{md_text(table.caption)}\n\n{body}\n"


def to_markdown(report: Report, plot_dir: str = "plots") -> str:
    c = report.collection
    lines = [f"# {md_text(report.title)}", "", f"Generated {utc_now()} from {len(c.records)} record(s) under: "
             + ", ".join(md_text(s) for s in report.sources) + ".", ""]
    if c.skipped:
        lines += [f"Skipped {len(c.skipped)} file(s) that are not valid records or repeat one:", ""]
        lines += [f"- {md_text(path)}: {md_text(reason)}" for path, reason in c.skipped] + [""]
    lines += [_md_section(report.summary)]
    lines += [f"![{md_text(title)}]({plot_dir}/{name}.png)" for name, (title, _) in report.comparison_plots.items()]
    lines += ["", NOTES, ""]
    lines += ["# Paper tables", ""] + [_md_section(t) for t in report.paper]
    if report.rankings:
        lines += ["# Checkpoint rankings", ""] + [_md_section(t) for t in report.rankings]
    if report.plots:
        lines += ["# Plots", ""]
        lines += [f"## {md_text(title)}\n\n![{md_text(title)}]({plot_dir}/{name}.png)\n"
                  for name, (title, _) in report.plots.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# LaTeX (booktabs)

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "τ": r"$\tau$", "·": r"$\cdot$", "†": r"$^\dagger$",
                  "−": "-", "…": r"\ldots{}"}


def latex_escape(text: str) -> str:
    parts = display_text(text, None).split("τ_h")          # the paper's symbol, kept as one math token
    return r"$\tau_h$".join("".join(_LATEX_ESCAPES.get(ch, ch) for ch in part) for part in parts)


def to_latex(table: Table) -> str:
    df = table.display()
    n_labels = len(table.label_columns)
    spec = "l" * n_labels + "r" * (len(df.columns) - n_labels)
    lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(table.title)}. {latex_escape(table.caption)}}}",
             rf"\label{{tab:{table.key}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(rf"\textbf{{{latex_escape(v)}}}" if (i, c) in table.best else latex_escape(v)
                         for c, v in zip(df.columns, row)) + r" \\" for i, row in enumerate(df.itertuples(index=False))]
    if not table.rows:
        lines.append(rf"\multicolumn{{{len(df.columns)}}}{{c}}{{no runs}} \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# HTML (self-contained)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
color:#222;padding:0 16px}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em}h3{font-size:1.05em}
table.report{border-collapse:collapse;font-size:12px;margin:8px 0 4px}
table.report th,table.report td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
table.report th{background:#f0f0f0}
table.report .label{text-align:left}
table.compare th{white-space:normal;max-width:150px;vertical-align:bottom}
table.compare tr.paper td{font-style:italic;color:#555}
.small-plots{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}.small-plots img{width:180px;border:1px solid #eee}
.show-all{margin:6px 4px 0 0}.show-all+label{font-size:13px;color:#335}
.show-all:not(:checked)~div table tr.paper-only{display:none}
p.caption{color:#555;font-size:13px;margin:4px 0}
figure{margin:16px 0}figure img{max-width:100%;border:1px solid #eee}
.skipped{color:#a33}.notes{font-size:13px;color:#444;max-width:1000px}
.scroll{overflow-x:auto}
"""


def html_text(text) -> str:
    """Text for HTML: display-safe, then escaped (quotes too: it also fills attributes)."""
    return html.escape(display_text(text, None))


def _html_table(table: Table, css_class: str = "report") -> str:
    if not table.rows:
        return '<p class="caption"><em>No runs.</em></p>'
    df = table.display()
    n_labels = len(table.label_columns)
    head = "".join(f'<th class="label">{html_text(str(c))}</th>' if i < n_labels else
                   f"<th>{html_text(str(c))}</th>" for i, c in enumerate(df.columns))
    body = []
    for r, (row, values) in enumerate(zip(table.rows, df.itertuples(index=False))):
        cells = []
        for i, (c, v) in enumerate(zip(df.columns, values)):
            text = f"<b>{html_text(str(v))}</b>" if (r, c) in table.best else html_text(str(v))
            cells.append(f'<td class="label">{text}</td>' if i < n_labels else f"<td>{text}</td>")
        kind = f' class="{row.kind}"' if row.kind != "ours" else ""
        body.append(f"<tr{kind}>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="{css_class}" id="table-{html_text(table.key)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _html_section(table: Table) -> str:
    """Title, caption, table; paper rows without a run of ours are folded away behind a "show all"
    switch (plain CSS, the page has no script)."""
    hidden = sum(r.kind == "paper-only" for r in table.rows)
    switch = ""
    if hidden:
        paper_rows = sum(r.kind != "ours" or r.labels.get("Paper setting", "-") != "-" for r in table.rows)
        switch = (f'<input type="checkbox" class="show-all" id="all-{html_text(table.key)}">'
                  f'<label for="all-{html_text(table.key)}">show all {paper_rows} paper rows '
                  f"({hidden} without a run of ours)</label>\n")
    return (f"<h2>{html_text(table.title)}</h2>\n<p class=\"caption\">{html_text(table.caption)}</p>\n"
            f"<div>{switch}{_html_table(table)}</div>\n")


def _html_comparison(report: Report) -> str:
    """The first screen: which checkpoint is best on each protocol, by how much, against the reference."""
    table = report.summary
    plots = "".join(f'<img alt="{html_text(title)}" title="{html_text(title)}" '
                    f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
                    for title, png in report.comparison_plots.values())
    return (f'<section id="comparison"><h2>{html_text(table.title)}</h2>\n'
            f'<p class="caption">{html_text(table.caption)}</p>\n{_html_table(table, "report compare")}\n'
            + (f'<div class="small-plots">{plots}</div>' if plots else "") + "</section>\n")


def to_html(report: Report) -> str:
    c = report.collection
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html_text(report.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html_text(report.title)}</h1>",
             f"<p>Generated {html_text(utc_now())} from {len(c.records)} record(s) under: "
             + ", ".join(f"<code>{html_text(s)}</code>" for s in report.sources) + ".</p>"]
    if c.skipped:
        parts.append(f'<p class="skipped">Skipped {len(c.skipped)} file(s): <a href="#skipped">see the list</a>.</p>')
    parts.append(_html_comparison(report))
    if c.skipped:
        items = "".join(f"<li><code>{html_text(p)}</code>: {html_text(r)}</li>" for p, r in c.skipped)
        parts.append(f'<div class="skipped" id="skipped"><p>Skipped {len(c.skipped)} file(s) that are not valid '
                     f"records or repeat one:</p><ul>{items}</ul></div>")
    parts.append(f'<p class="notes">{html_text(NOTES).replace("`", "")}</p>')
    parts.append("<h1>Paper tables</h1>")
    parts += [_html_section(t) for t in report.paper]
    if report.rankings:
        parts.append("<h1>Checkpoint rankings</h1>")
        parts += [_html_section(t) for t in report.rankings]
    if report.plots:
        parts.append("<h1>Plots</h1>")
    for name, (title, png) in report.plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure id="plot-{name}"><figcaption><h2>{html_text(title)}</h2></figcaption>'
                     f'<img alt="{html_text(title)}" src="data:image/png;base64,{data}"></figure>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------


def write_report(report: Report, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every output under ``out_dir`` as one set; return the main paths (markdown, html, folders).

    Every file is rendered and written into a staging folder inside ``out_dir`` first, and each
    target is checked (a folder in the place of a file); only then are the files renamed into place,
    report.md last. A failure before that changes no final file, so a reader never sees a new
    report.md beside an old report.html. Tables and plots of an earlier report that this one lacks
    are deleted.
    """
    out = Path(out_dir)
    files: dict[str, bytes] = {}
    for table in report.tables:
        # CSV keeps the numbers (mean, std, n, delta in separate columns); "-" marks a missing one.
        files[f"tables/{table.key}.csv"] = table.frame().round(6).to_csv(index=False, na_rep=DASH).encode()
        files[f"tables/{table.key}.tex"] = to_latex(table).encode()
    for name, (_, png) in {**report.comparison_plots, **report.plots}.items():
        files[f"plots/{name}.png"] = png
    files["report.html"] = to_html(report).encode()
    files["report.md"] = to_markdown(report).encode()       # last: renamed into place last
    staging = None
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".report-staging-", dir=out))
            for rel, data in files.items():
                atomic_write_bytes(staging / rel, data)
            for rel in files:
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_dir() and not target.is_symlink():
                    raise CghError(f"cannot write the report: {target} is a folder; no report file was replaced")
        except OSError as e:
            raise CghError(f"cannot write the report: {e.filename or out}: {e.strerror or e}; "
                           "no report file was replaced") from e
        for rel in files:       # renames within one folder, report.md last: the set changes only here
            os.replace(staging / rel, out / rel)
        # tables and plots of an earlier report that this one does not have would read as current
        for folder, suffixes in (("tables", (".csv", ".tex")), ("plots", (".png",))):
            for old in (out / folder).glob("*"):
                if old.suffix in suffixes and old.is_file() and f"{folder}/{old.name}" not in files:
                    old.unlink()
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {"markdown": out / "report.md", "html": out / "report.html", "tables": out / "tables",
            "plots": out / "plots"}
