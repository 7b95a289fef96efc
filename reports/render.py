"""Write a report: Markdown (the main document), CSV and LaTeX per table, one self-contained HTML page.

The HTML page embeds its plots as base64 PNGs and its style inline, so it can be mailed or archived
as a single file and opens offline. All files are written atomically.
"""
from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cgh.io import atomic_write_bytes, atomic_write_text
from cgh.records import utc_now
from reports.collect import Collection
from reports.plots import all_plots
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

    @property
    def tables(self) -> list[Table]:
        return [self.summary] + self.paper + self.rankings


def build_report(collection: Collection, sources: list[str], title: str = "CGH report") -> Report:
    recs = collection.records
    return Report(title, collection, [str(s) for s in sources], summary_table(recs), paper_tables(recs),
                  ranking_tables(recs), all_plots(recs))


# ------------------------------------------------------------------------------------------------
# Markdown


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(_md_cell(c) for c in df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, sep, *body])


def _md_section(table: Table, level: str = "##") -> str:
    body = markdown_table(table.display()) if table.rows else "_No runs._"
    return f"{level} {table.title}\n\n{table.caption}\n\n{body}\n"


def to_markdown(report: Report, plot_dir: str = "plots") -> str:
    c = report.collection
    lines = [f"# {report.title}", "", f"Generated {utc_now()} from {len(c.records)} record(s) under: "
             + ", ".join(f"`{s}`" for s in report.sources) + ".", ""]
    if c.skipped:
        lines += [f"Skipped {len(c.skipped)} file(s) that are not valid records:", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in c.skipped] + [""]
    lines += [NOTES, "", _md_section(report.summary)]
    lines += ["# Paper tables", ""] + [_md_section(t) for t in report.paper]
    if report.rankings:
        lines += ["# Checkpoint rankings", ""] + [_md_section(t) for t in report.rankings]
    if report.plots:
        lines += ["# Plots", ""]
        lines += [f"## {title}\n\n![{title}]({plot_dir}/{name}.png)\n" for name, (title, _) in report.plots.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# LaTeX (booktabs)

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "τ": r"$\tau$", "·": r"$\cdot$", "†": r"$^\dagger$",
                  "−": "-"}


def latex_escape(text: str) -> str:
    parts = str(text).split("τ_h")          # the paper's symbol, kept as one math token
    return r"$\tau_h$".join("".join(_LATEX_ESCAPES.get(ch, ch) for ch in part) for part in parts)


def to_latex(table: Table) -> str:
    df = table.display()
    n_labels = len(table.label_columns)
    spec = "l" * n_labels + "r" * (len(df.columns) - n_labels)
    lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(table.title)}. {latex_escape(table.caption)}}}",
             rf"\label{{tab:{table.key}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
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
p.caption{color:#555;font-size:13px;margin:4px 0}
figure{margin:16px 0}figure img{max-width:100%;border:1px solid #eee}
.skipped{color:#a33}.notes{font-size:13px;color:#444;max-width:1000px}
.scroll{overflow-x:auto}
"""


def _html_table(table: Table) -> str:
    if not table.rows:
        return '<p class="caption"><em>No runs.</em></p>'
    df = table.display()
    n_labels = len(table.label_columns)
    head = "".join(f'<th class="label">{html.escape(str(c))}</th>' if i < n_labels else
                   f"<th>{html.escape(str(c))}</th>" for i, c in enumerate(df.columns))
    body = []
    for row in df.itertuples(index=False):
        cells = [f'<td class="label">{html.escape(str(v))}</td>' if i < n_labels else
                 f"<td>{html.escape(str(v))}</td>" for i, v in enumerate(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="report" id="table-{html.escape(table.key)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _html_section(table: Table) -> str:
    return (f"<h2>{html.escape(table.title)}</h2>\n<p class=\"caption\">{html.escape(table.caption)}</p>\n"
            f"{_html_table(table)}\n")


def to_html(report: Report) -> str:
    c = report.collection
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(report.title)}</h1>",
             f"<p>Generated {html.escape(utc_now())} from {len(c.records)} record(s) under: "
             + ", ".join(f"<code>{html.escape(s)}</code>" for s in report.sources) + ".</p>"]
    if c.skipped:
        items = "".join(f"<li><code>{html.escape(p)}</code>: {html.escape(r)}</li>" for p, r in c.skipped)
        parts.append(f'<div class="skipped"><p>Skipped {len(c.skipped)} file(s) that are not valid '
                     f"records:</p><ul>{items}</ul></div>")
    parts.append(f'<p class="notes">{html.escape(NOTES).replace("`", "")}</p>')
    parts.append(_html_section(report.summary))
    parts.append("<h1>Paper tables</h1>")
    parts += [_html_section(t) for t in report.paper]
    if report.rankings:
        parts.append("<h1>Checkpoint rankings</h1>")
        parts += [_html_section(t) for t in report.rankings]
    if report.plots:
        parts.append("<h1>Plots</h1>")
    for name, (title, png) in report.plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure id="plot-{name}"><figcaption><h2>{html.escape(title)}</h2></figcaption>'
                     f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}"></figure>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------


def write_report(report: Report, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every output under ``out_dir``; return the main paths (markdown, html, folders)."""
    out = Path(out_dir)
    for table in report.tables:
        # CSV keeps the numbers (mean, std, n, delta in separate columns); "-" marks a missing one.
        atomic_write_text(out / "tables" / f"{table.key}.csv", table.frame().round(6).to_csv(index=False, na_rep=DASH))
        atomic_write_text(out / "tables" / f"{table.key}.tex", to_latex(table))
    for name, (_, png) in report.plots.items():
        atomic_write_bytes(out / "plots" / f"{name}.png", png)
    atomic_write_text(out / "report.md", to_markdown(report))
    atomic_write_text(out / "report.html", to_html(report))
    return {"markdown": out / "report.md", "html": out / "report.html", "tables": out / "tables",
            "plots": out / "plots"}
