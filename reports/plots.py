"""Report figures, drawn from records only, returned as PNG bytes.

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot state), so plotting works
headless and in parallel. Each function returns None when the records hold nothing to plot.
Every label taken from a record goes through ``plot_text``.
"""
from __future__ import annotations

import io
import math
import re
import textwrap

from matplotlib.figure import Figure

from cgh.records import NAME_LIMIT, display_text
from reports.settings import checkpoint_settings
from reports.tables import checkpoint_labels

DPI = 100
# loss terms of cgh.losses in the pretraining history: global-hypercolumn, hypercolumn-global,
# global-global, hypercolumn-hypercolumn alignments and the authors' InfoNCE warm-up term
LOSS_TERMS = ("gh", "hg", "gg", "hh", "infonce")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def plot_text(text: str, limit: int | None = NAME_LIMIT) -> str:
    """A record's name as a plot label: display-safe and short (``display_text``: a huge label makes
    drawing take minutes), with ``$`` escaped so matplotlib never parses it as math text (which
    fails on invalid TeX)."""
    return display_text(text, limit).replace("$", r"\$")


def _run_label(rec: dict, labels: dict[str, str]) -> str:
    return plot_text(f"{labels[rec['checkpoint']['sha256']]} ({checkpoint_settings(rec['checkpoint']).label})")


def _history(rec: dict) -> list[dict]:
    hist = (rec.get("extra") or {}).get("history")
    return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, h in enumerate(history):
        y, x = h.get(key), h.get("epoch")
        if _number(y):
            xs.append(x if _number(x) else i + 1)
            ys.append(float(y))
    return xs, ys


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def training_curves(records: list[dict]) -> bytes | None:
    """Pretraining loss, online kNN top-1 and (when logged) the queues' effective rank per epoch."""
    fig = training_curves_figure(records)
    return None if fig is None else _png(fig)


def training_curves_figure(records: list[dict]) -> Figure | None:
    """The figure behind ``training_curves``, one line per pretraining run (and queue)."""
    runs = [r for r in records if r["protocol"] == "pretrain" and _history(r)]
    if not runs:
        return None
    labels = checkpoint_labels(records)
    ranks = any(k.startswith("queue_rank_") for r in runs for h in _history(r) for k in h)
    fig = Figure(figsize=(15 if ranks else 10, 3.6))
    axes = fig.subplots(1, 3 if ranks else 2)
    ax_loss, ax_knn = axes[0], axes[1]
    for rec in runs:
        name = _run_label(rec, labels)
        hist = _history(rec)
        xs, ys = _series(hist, "loss")
        line = ax_loss.plot(xs, ys, marker="o", ms=3, label=name)[0]
        for term in sorted({k for h in hist for k in h if k in LOSS_TERMS or k.startswith("loss_")}):
            xs, ys = _series(hist, term)
            ax_loss.plot(xs, ys, ls="--", lw=1, color=line.get_color(), alpha=0.6, label=f"{name}: {plot_text(term)}")
        xs, ys = _series(hist, "knn_top1")
        if xs:
            ax_knn.plot(xs, ys, marker="o", ms=3, color=line.get_color(), label=name)
        if ranks:
            for key, style in (("queue_rank_global", "-"), ("queue_rank_hyper", "--")):
                xs, ys = _series(hist, key)
                if xs:
                    axes[2].plot(xs, ys, marker="o", ms=3, ls=style, color=line.get_color(),
                                 label=f"{name}: {key.removeprefix('queue_rank_')}")
    ax_loss.set(title="Pretraining loss", xlabel="epoch", ylabel="loss")
    ax_knn.set(title="Online kNN top-1", xlabel="epoch", ylabel="top-1 (%)")
    if ranks:   # a collapse shows as this falling to a handful of directions
        axes[2].set(title="Queue effective rank (collapse check)", xlabel="epoch", ylabel="RankMe")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def knn_vs_k(records: list[dict]) -> bytes | None:
    """kNN top-1 for every k the kNN records hold (``top1_k{K}``), one line per checkpoint/dataset."""
    labels = checkpoint_labels(records)
    lines: dict[str, dict[int, list[float]]] = {}
    for rec in records:
        if rec["protocol"] != "knn":
            continue
        name = f"{_run_label(rec, labels)} on {plot_text(rec['dataset'].get('name', '?'))}"
        for key, value in rec["metrics"].items():
            m = re.fullmatch(r"top1_k(\d+)", key)
            if m and value is not None:
                lines.setdefault(name, {}).setdefault(int(m.group(1)), []).append(float(value))
    if not lines:
        return None
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for name, by_k in sorted(lines.items()):
        ks = sorted(by_k)
        ax.plot(ks, [sum(by_k[k]) / len(by_k[k]) for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set(title="kNN accuracy vs k", xlabel="k (neighbours)", ylabel="top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def _final_selection(rec: dict) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) from ``extra.positive_selection`` in either form:
    ``{threshold: {precision, recall}}`` or ``{thresholds: [...], precision: [...], recall: [...]}``."""
    sel = (rec.get("extra") or {}).get("positive_selection")
    out = []
    if isinstance(sel, dict) and isinstance(sel.get("thresholds"), list):
        out = list(zip(*(v if isinstance(v, list) else [] for v in
                         (sel["thresholds"], sel.get("precision"), sel.get("recall")))))
    elif isinstance(sel, dict):
        for t, pr in sel.items():
            if isinstance(pr, dict):
                try:
                    out.append((float(t), pr.get("precision"), pr.get("recall")))
                except ValueError:
                    continue
    return [(float(t), float(p), float(r)) for t, p, r in out if all(_number(v) for v in (t, p, r))]


def _threshold(rec: dict, suffix: str) -> str:
    """History keys are ``pos_recall`` for the first configured threshold, ``pos_recall@T`` for others."""
    if suffix.startswith("@"):
        return suffix[1:]
    monitor = (rec.get("config") or {}).get("monitor")
    first = monitor.get("positive_thresholds") if isinstance(monitor, dict) else None
    first = first[0] if isinstance(first, list) and first else "?"
    return f"{first:g}" if _number(first) else str(first)


def positive_selection(records: list[dict]) -> bytes | None:
    """Paper Fig. 2: recall and precision of the teacher's positive selection during pretraining,
    plus the final precision/recall trade-off over thresholds when the record holds it."""
    runs = [r for r in records if r["protocol"] == "pretrain"]
    with_history = [r for r in runs if any(k.startswith("pos_") for h in _history(r) for k in h)]
    with_final = [r for r in runs if _final_selection(r)]
    if not with_history and not with_final:
        return None
    labels = checkpoint_labels(records)
    fig = Figure(figsize=(13, 3.6))
    ax_rec, ax_prec, ax_pr = fig.subplots(1, 3)
    styles = ("-", "--", ":", "-.")
    for i, rec in enumerate(with_history):
        name, colour = _run_label(rec, labels), f"C{i}"
        hist = _history(rec)
        for metric, ax in (("pos_recall", ax_rec), ("pos_precision", ax_prec)):
            for j, key in enumerate(sorted({k for h in hist for k in h if k.startswith(metric)}, key=len)):
                xs, ys = _series(hist, key)
                ax.plot(xs, ys, marker="o", ms=3, color=colour, ls=styles[j % len(styles)],
                        label=f"{name} @{plot_text(_threshold(rec, key.removeprefix(metric)))}")
    for i, rec in enumerate(with_final):
        pts = sorted(_final_selection(rec))
        ax_pr.plot([r for _, _, r in pts], [p for _, p, _ in pts], marker="o", ms=3, color=f"C{with_history.index(rec)}"
                   if rec in with_history else f"C{len(with_history) + i}", label=_run_label(rec, labels))
        for t, p, r in pts:
            ax_pr.annotate(f"{t:g}", (r, p), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax_rec.set(title="Positive selection: recall", xlabel="epoch", ylabel="recall (%)")
    ax_prec.set(title="Positive selection: precision", xlabel="epoch", ylabel="precision (%)")
    ax_pr.set(title="End of training: precision vs recall\n(one point per threshold)", xlabel="recall (%)",
              ylabel="precision (%)")
    for ax in (ax_rec, ax_prec, ax_pr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def comparison_plots(table) -> dict[str, tuple[str, bytes]]:
    """One small bar chart per column of the comparison view (``summary_table``), drawn from its
    aggregated rows (a bar per checkpoint row, std as error bar; the paper's number as a dashed line),
    so the cost grows with checkpoints x evaluations, not with the number of records."""
    ours = [r for r in table.rows if r.kind == "ours"]
    paper = next((r for r in table.rows if r.kind == "paper"), None)
    out = {}
    for i, col in enumerate(table.value_columns):
        rows = [r for r in ours if r.cells[col].n]
        if not rows:
            continue
        fig = Figure(figsize=(2.3, 0.45 + 0.22 * len(rows)))
        ax = fig.subplots()
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, [r.cells[col].mean for r in rows], xerr=[r.cells[col].std or 0.0 for r in rows],
                color=["#2a6fb0" if (table.rows.index(r), col) in table.best else "#9ab" for r in rows],
                capsize=2, height=0.7)
        ax.set_yticks(ys)
        ax.set_yticklabels([plot_text(r.labels["Checkpoint"], 18) for r in rows], fontsize=6)
        if paper is not None and paper.cells[col].n:
            ax.axvline(paper.cells[col].mean, color="#b33", linestyle="--", linewidth=1)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(textwrap.fill(plot_text(col, None), 34), fontsize=6.5)
        ax.grid(alpha=0.3, axis="x")
        out[f"compare_{i:02d}"] = (col, _png(fig))
    return out


PLOTS = {
    "training_curves": ("Training curves", training_curves),
    "knn_vs_k": ("kNN accuracy vs k", knn_vs_k),
    "positive_selection": ("Positive-sample selection (paper Fig. 2)", positive_selection),
}


def all_plots(records: list[dict]) -> dict[str, tuple[str, bytes]]:
    """name -> (title, PNG bytes) for every plot the records support."""
    out = {}
    for name, (title, fn) in PLOTS.items():
        png = fn(records)
        if png is not None:
            out[name] = (title, png)
    return out

