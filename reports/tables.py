"""Tables shaped like the paper's, ours beside the published numbers, as pandas frames.

Every table is a list of rows; a row has label columns (method, settings) and value cells. A cell
holds the paper's number (if the paper has one) and ours as mean, std and count over all runs that
fall into it (duplicate records, or the seeds inside one record's ``extra.runs``). Rows of the
paper stay even when we have no run for them, and our rows without a paper row are appended, so
nothing disappears: missing numbers print as "-".

Placing our runs: a run's checkpoint gets a row key from its settings (``reports.settings``),
matched to the paper's ``method`` column of ``reference/paper_results.csv``. Single-dataset tables
(1-4, 6) put our number in the paper's column whatever dataset we ran on, and say that dataset in
"Ours setting"; the two-dataset ablation tables (5, 7) put it under the column of its dataset and
open a new column for a dataset the paper did not use (no difference is computed there).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pandas as pd

from cgh.records import display_text
from cgh.run_folder import LAUNCH_KEYS
from reports.collect import EPOCH_PROTOCOLS, LABEL_KEY
from reports.settings import DEFAULT_LAYERS, DEFAULT_TAU_H, Settings, checkpoint_settings, layers_label

REFERENCE_CSV = Path(__file__).resolve().parent / "reference" / "paper_results.csv"
DASH = "-"

# ---------------------------------------------------------------------------------------------
# Cells and tables


@dataclass
class Cell:
    paper: float | None = None
    samples: list[float] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)     # e.g. "diverged": shown beside the number
    protocols: set[str] = field(default_factory=set)
    ref_delta: float | None = None     # comparison view: mean minus the reference's number
    is_reference: bool = False         # comparison view: this cell is the reference

    def add(self, rec: dict, metric: str) -> None:
        """Take ``rec``'s values of ``metric``, and its flags."""
        values = samples(rec, metric)
        self.samples.extend(values)
        if values:
            self.flags |= record_flags(rec)
            self.protocols.add(rec["protocol"])

    @property
    def shown_flags(self) -> set[str]:
        """The records' flags, and "1 seed" for a single fine-tuning run of a protocol whose
        published numbers average several (MoCo's VOC detection: 5; per-run std 0.2-0.4 AP)."""
        single = self.n == 1 and bool(self.protocols & SEED_AVERAGED)
        return self.flags | ({"1 seed"} if single else set())

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / self.n if self.samples else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for fewer than two runs."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.samples) / (self.n - 1))

    @property
    def delta(self) -> float | None:
        return None if self.paper is None or self.mean is None else self.mean - self.paper


@dataclass
class Row:
    labels: dict[str, str]
    cells: dict[str, Cell]
    kind: str = "ours"      # "ours"; "paper-only": a paper row without a run of ours; "paper": a paper number


@dataclass
class Table:
    """One report table. ``reference`` tables show paper / ours / delta for each value column."""
    key: str
    title: str
    caption: str
    label_columns: list[str]
    value_columns: list[str]
    rows: list[Row]
    reference: bool = True
    decimals: int = 1
    best: set[tuple[int, str]] = field(default_factory=set)   # (row index, column): best in its column

    def frame(self) -> pd.DataFrame:
        """Numbers: paper, ours mean / std / n, delta per value column (NaN where missing)."""
        records = []
        for row in self.rows:
            rec = dict(row.labels)
            for col in self.value_columns:
                cell = row.cells.get(col, Cell())
                if self.reference:
                    rec[f"{col} paper"] = cell.paper
                rec[f"{col} ours"] = cell.mean
                rec[f"{col} ours std"] = cell.std
                rec[f"{col} ours n"] = cell.n
                if self.reference:
                    rec[f"{col} Δ"] = cell.delta
            records.append(rec)
        return pd.DataFrame.from_records(records, columns=self._numeric_columns()).astype(
            {c: float for c in self._numeric_columns() if c not in self.label_columns and not c.endswith(" n")})

    def _numeric_columns(self) -> list[str]:
        cols = list(self.label_columns)
        for col in self.value_columns:
            cols += ([f"{col} paper"] if self.reference else []) + [f"{col} ours", f"{col} ours std",
                                                                     f"{col} ours n"]
            cols += [f"{col} Δ"] if self.reference else []
        return cols

    def display(self) -> pd.DataFrame:
        """Strings as printed: "mean ± std (n)" for duplicates, "-" for a missing number."""
        records = []
        for row in self.rows:
            rec = {k: (v if v not in (None, "") else DASH) for k, v in row.labels.items()}
            for col in self.value_columns:
                cell = row.cells.get(col, Cell())
                ours = format_cell(cell, self.decimals)
                if self.reference:
                    rec[f"{col} paper"] = fmt(cell.paper, self.decimals)
                    rec[f"{col} ours"] = ours
                    rec[f"{col} Δ"] = fmt(cell.delta, self.decimals, signed=True)
                else:
                    rec[col] = ours
            records.append(rec)
        columns = list(self.label_columns)
        for col in self.value_columns:
            columns += [f"{col} paper", f"{col} ours", f"{col} Δ"] if self.reference else [col]
        return pd.DataFrame.from_records(records, columns=columns)


def fmt(value: float | None, decimals: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def format_cell(cell: Cell, decimals: int = 1) -> str:
    """"71.2", or "71.2 ± 0.3 (3)" when several runs were aggregated, or "-"; flags follow in
    brackets: "25.0 [diverged]"."""
    if cell.n == 0:
        return DASH
    text = fmt(cell.mean, decimals) if cell.n == 1 else \
        f"{fmt(cell.mean, decimals)} ± {fmt(cell.std, decimals)} ({cell.n})"
    if cell.is_reference:
        text += " (ref)"
    elif cell.ref_delta is not None:
        text += f" (Δ {fmt(cell.ref_delta, decimals, signed=True)})"
    return text + "".join(f" [{flag}]" for flag in sorted(cell.shown_flags))


# ---------------------------------------------------------------------------------------------
# Reading runs out of records


def samples(rec: dict, metric: str) -> list[float]:
    """Values of ``metric`` in a record: one per seed when ``extra.runs`` lists them, else one."""
    runs = (rec.get("extra") or {}).get("runs")
    if isinstance(runs, list) and runs and all(isinstance(r, dict) and _num(r.get(metric)) for r in runs):
        return [float(r[metric]) for r in runs]
    value = rec["metrics"].get(metric)
    return [float(value)] if _num(value) else []


# Fine-tuning protocols whose published numbers are means over seeds: a single run is marked.
SEED_AVERAGED = {"voc_det", "coco_instseg", "seg"}


def record_flags(rec: dict) -> set[str]:
    """What a record says about its own numbers, shown beside them: ``diverged`` (the training blew
    up), ``last epoch`` (a linear/semi number from the final epoch, not the best one the CGH paper's
    scripts report: ``reports.collect.choose_epoch``), ``bf16`` (``extra.precision``: the backbone ran
    in the opt-in bf16 fast mode, not the reference fp32)."""
    extra = rec.get("extra") or {}
    flags = {"diverged"} if extra.get("diverged") else set()
    if rec.get("protocol") in EPOCH_PROTOCOLS and extra.get("reported_epoch") == "last":
        flags.add("last epoch")
    if extra.get("precision") == "bf16":        # what the backbone computed in (a CPU is always fp32)
        flags.add("bf16")
    return flags


# Config keys that do not change what a protocol measures: records differing only in these are
# repeats of one evaluation (seeds, machines, folders) and pool into one cell. Any other difference
# (k, temperature, lr, image size, iterations ...) is another evaluation, shown in a row of its own.
NOT_SETTINGS = LAUNCH_KEYS | {"seed", "first_seed", "device", "gpus", "data_root", "voc_root", "coco_root",
                              "dataset_name", "split", "reported_epoch"}   # (the report picks the epoch)


def eval_settings(rec: dict) -> dict[str, str]:
    """The record's resolved protocol config as {dotted key: JSON value}, without ``NOT_SETTINGS``."""
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                if k not in NOT_SETTINGS:
                    walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = json.dumps(node, sort_keys=True, default=str)

    walk(rec.get("config") or {}, "")
    return out


def variants(records: list[dict]) -> dict[int, tuple[str, str]]:
    """id(record) -> (pool key, label). Records of one evaluation (protocol, dataset, subset) whose
    settings are equal share a pool key and pool; when an evaluation was run with several settings,
    each record's label names the keys that differ ("temperature=0.5"); otherwise both are ""."""
    by_eval: dict[tuple, list[dict]] = {}
    for rec in records:
        by_eval.setdefault(_eval_key(rec), []).append(rec)
    out: dict[int, tuple[str, str]] = {}
    for recs in by_eval.values():
        settings = {id(r): eval_settings(r) for r in recs}
        pools = {id(r): json.dumps(settings[id(r)], sort_keys=True) for r in recs}
        if len(set(pools.values())) == 1:
            out.update({id(r): ("", "") for r in recs})
            continue
        keys = sorted({k for s in settings.values() for k in s})
        varying = [k for k in keys if len({s.get(k) for s in settings.values()}) > 1]
        for r in recs:
            shown = [f"{k}={settings[id(r)].get(k, '(unset)')}" for k in varying[:3]]
            more = f", +{len(varying) - 3} more" if len(varying) > 3 else ""
            out[id(r)] = (pools[id(r)], display_text(", ".join(shown) + more, limit=120))
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def dataset_key(name: str | None) -> str:
    """Loose name of a dataset for matching: "Tiny-ImageNet" == "tiny_imagenet" == "tinyimagenet"."""
    key = re.sub(r"[^a-z0-9]", "", str(name or "").lower())
    return {"imagenet": "in1k", "imagenet1k": "in1k", "ilsvrc2012": "in1k", "in1k": "in1k"}.get(key, key)


@dataclass(frozen=True)
class Column:
    """A value column: which protocol(s), metric and subset feed it. The first protocol listed
    that has a number for a row wins (the full linear probe before the fast feature-cache probe)."""
    key: str                           # reference column id, e.g. "semi1_top1"
    header: str
    protocols: tuple[str, ...]
    metric: str
    subset: str | None = None


LINEAR = ("linear", "linear_fast")


@dataclass
class TableSpec:
    key: str
    title: str
    caption: str
    columns: list[Column]
    row_key: Callable[[Settings], str | None]     # paper "method" this run belongs to, or None
    unmatched_label: Callable[[Settings, str], str] = lambda s, key: s.label
    by_dataset: bool = False                       # ablation tables: one column per dataset
    reference: bool = True
    decimals: int = 1


def _main_key(s: Settings) -> str | None:
    return None if s.multi_crop else s.label


def _multi_key(s: Settings) -> str | None:
    return s.base_label if s.multi_crop else None


def _any_key(s: Settings) -> str | None:
    return s.label


def _plain_cgh(s: Settings) -> bool:
    return s.known and not s.multi_crop and not s.predictor


def _context_key(s: Settings) -> str | None:
    if not _plain_cgh(s) or s.loss_mode not in ("global", "same", "cross"):
        return None
    if s.loss_mode != "global" and ((s.layers or DEFAULT_LAYERS) != DEFAULT_LAYERS
                                    or abs((s.tau_h or DEFAULT_TAU_H) - DEFAULT_TAU_H) > 1e-9):
        return None
    return f"{s.loss_mode}-context"


def _tau_key(s: Settings) -> str | None:
    if not _plain_cgh(s) or s.loss_mode != "cross" or (s.layers or DEFAULT_LAYERS) != DEFAULT_LAYERS:
        return None
    return f"{s.tau_h if s.tau_h is not None else DEFAULT_TAU_H:g}"


def _layers_key(s: Settings) -> str | None:
    if not _plain_cgh(s):
        return None
    if s.loss_mode == "global":
        return "layer4"               # paper Sec. 4.5.3: hypercolumn of layer4 alone is ReSSL
    if s.loss_mode != "cross" or abs((s.tau_h or DEFAULT_TAU_H) - DEFAULT_TAU_H) > 1e-9:
        return None
    return "+".join(s.layers or DEFAULT_LAYERS)


_TOP1 = "Linear top-1"
_EPOCH_NOTE = ("Linear and semi-supervised numbers are the best validation epoch's, as the authors' "
               "scripts report them; [last epoch] marks a final-epoch number (cgh report --epoch last).")
PAPER_TABLES: list[TableSpec] = [
    TableSpec("table1", "Table 1: linear and kNN evaluation",
              "Paper: IN-1K, ResNet-50, 200 epochs, single crop. The paper text says CGH beats "
              "MoCo-v2 / ReSSL by 3.0 / 1.2 points (linear) and 7.0 / 1.6 points (kNN). " + _EPOCH_NOTE,
              [Column("linear_top1", _TOP1, LINEAR, "top1"), Column("linear_top5", "Linear top-5", LINEAR, "top5"),
               Column("knn_top1", "kNN top-1", ("knn",), "top1")], _main_key),
    TableSpec("table2", "Table 2: linear evaluation with multi-crop",
              "Paper: IN-1K, ResNet-50, multi-crop, several pre-training lengths.",
              [Column("linear_top1", _TOP1, LINEAR, "top1")], _multi_key),
    TableSpec("table3", "Table 3: semi-supervised fine-tuning (1% / 10% labels)",
              "Paper: IN-1K SimCLR subsets, ResNet-50. (Multi) = multi-crop pretraining. " + _EPOCH_NOTE,
              [Column("semi1_top1", "1% top-1", ("semi",), "top1", "1percent"),
               Column("semi1_top5", "1% top-5", ("semi",), "top5", "1percent"),
               Column("semi10_top1", "10% top-1", ("semi",), "top1", "10percent"),
               Column("semi10_top5", "10% top-5", ("semi",), "top5", "10percent")], _any_key),
    TableSpec("table4", "Table 4: PASCAL VOC detection (Faster R-CNN R50-C4)",
              "Paper: pretrained 200 epochs on IN-1K, fine-tuned on VOC07+12 trainval, tested on VOC07 "
              "test; mean over 5 runs (MoCo's protocol). Ours: mean ± std (runs); a single run says [1 seed].",
              [Column("AP", "AP", ("voc_det",), "AP"), Column("AP50", "AP50", ("voc_det",), "AP50"),
               Column("AP75", "AP75", ("voc_det",), "AP75")], _any_key),
    TableSpec("coco", "COCO instance segmentation (Mask R-CNN R50-C4)",
              "The paper's COCO numbers are in its supplementary material, not in the paper text: "
              "ours only.",
              [Column(m, m.replace("_", " "), ("coco_instseg",), m) for m in
               ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")],
              _any_key, reference=False),
    TableSpec("seg", "Semantic segmentation (FCN)", "Not in the paper: ours only.",
              [Column(m, m, ("seg",), m) for m in ("mIoU", "mAcc", "aAcc")], _any_key, reference=False),
    TableSpec("table5", "Table 5: context variants",
              "Paper: ResNet-18 pretrained 400 epochs, linear top-1. Global-context is ReSSL.",
              [Column("linear_top1", _TOP1, LINEAR, "top1")], _context_key,
              unmatched_label=lambda s, key: f"CGH ({key})", by_dataset=True),
    TableSpec("table6", "Table 6: hypercolumn temperature τ_h",
              "Paper: Tiny-ImageNet, ResNet-18, 400 epochs, linear top-1; layers L3+L4.",
              [Column("linear_top1", "Tiny-ImageNet", LINEAR, "top1")], _tau_key,
              unmatched_label=lambda s, key: f"τ_h = {key}"),
    TableSpec("table7", "Table 7: intermediate layers of the hypercolumn",
              "Paper: ResNet-18, 400 epochs, linear top-1; τ_h = 0.08. L4 alone is ReSSL.",
              [Column("linear_top1", _TOP1, LINEAR, "top1")], _layers_key,
              unmatched_label=lambda s, key: layers_label(tuple(key.split("+"))), by_dataset=True),
]


@lru_cache(maxsize=1)
def reference() -> pd.DataFrame:
    """The paper's published numbers (empty value = the paper text has no number there)."""
    return pd.read_csv(REFERENCE_CSV, dtype={"method": str, "epochs": "Int64", "batch_size": "Int64"},
                       keep_default_na=False, na_values={"value": [""], "epochs": [""], "batch_size": [""]})


def _paper_setting(ref_rows: pd.DataFrame, by_dataset: bool) -> str:
    first = ref_rows.iloc[0]
    parts = [] if by_dataset else [first["dataset"]]
    parts.append(first["backbone"])
    if not pd.isna(first["epochs"]):
        parts.append(f"{first['epochs']} ep")
    if not pd.isna(first["batch_size"]):
        parts.append(f"bs {first['batch_size']}")
    return " · ".join(parts)


def build_table(spec: TableSpec, records: list[dict]) -> Table:
    ref = reference()
    ref = ref[ref["table"] == spec.key] if spec.reference else ref.iloc[0:0]

    # value columns: (column key, dataset key) -> header
    columns: dict[tuple[str, str], str] = {}
    for c in spec.columns:
        if spec.by_dataset:
            for ds in ref[ref["column"] == c.key]["dataset"].drop_duplicates():
                columns[(c.key, dataset_key(ds))] = ds
        else:
            columns[(c.key, "")] = c.header

    # our runs: group -> {(column key, dataset key): {protocol: Cell}}; a group is one pretrained
    # setting evaluated one way (an evaluation run with other settings is a group of its own)
    groups: dict[tuple, dict] = {}
    variant = variants(records)
    for rec in records:
        settings = checkpoint_settings(rec["checkpoint"])
        row_key = spec.row_key(settings)
        if row_key is None:
            continue
        eval_ds = str(rec["dataset"].get("name", ""))
        for c in spec.columns:
            if rec["protocol"] not in c.protocols:
                continue
            if c.subset is not None and rec["dataset"].get("subset") != c.subset:
                continue
            if not samples(rec, c.metric):
                continue
            gkey = (row_key, settings, "" if spec.by_dataset else eval_ds, variant[id(rec)])
            g = groups.setdefault(gkey, {"cells": {}, "protocols": set()})
            if spec.by_dataset:
                col = (c.key, dataset_key(eval_ds))
                columns.setdefault(col, display_text(eval_ds))
            else:
                col = (c.key, "")
            g["cells"].setdefault(col, {}).setdefault(rec["protocol"], Cell()).add(rec, c.metric)

    columns = _unique_headers(columns)
    headers = list(columns.values())
    header_of = dict(columns)

    def our_cells(g: dict) -> tuple[dict[str, Cell], set[str]]:
        cells, used = {}, set()
        for col, by_protocol in g["cells"].items():
            c = next(c for c in spec.columns if c.key == col[0])
            proto = next(p for p in c.protocols if p in by_protocol)
            used.add(proto)
            cells[header_of[col]] = by_protocol[proto]
        return cells, used

    def our_setting(gkey: tuple, used: set[str]) -> str:
        _, settings, eval_ds, (_, differs) = gkey
        text = display_text(settings.describe())
        if eval_ds and dataset_key(eval_ds) != dataset_key(settings.dataset):
            text += f" · eval {display_text(eval_ds)}"
        if "linear_fast" in used:
            text += " · fast linear probe"
        if differs:
            text += f" · {differs}"
        return text

    label_cols = ["Method", "Paper setting", "Ours setting"] if spec.reference else ["Method", "Ours setting"]
    rows: list[Row] = []
    placed: set[tuple] = set()
    for (label, method), ref_rows in ref.groupby(["row", "method"], sort=False):
        paper = {}
        for _, r in ref_rows.iterrows():
            ds = dataset_key(r["dataset"]) if spec.by_dataset else ""
            paper[header_of[(r["column"], ds)]] = None if pd.isna(r["value"]) else float(r["value"])
        mine = [k for k in groups if k[0] == method and k not in placed]
        for gkey in sorted(mine, key=_sort_key) or [None]:
            cells = {h: Cell(paper=paper.get(h)) for h in headers}
            setting = DASH
            if gkey is not None:
                placed.add(gkey)
                ours, used = our_cells(groups[gkey])
                for h, cell in ours.items():
                    cells[h].samples, cells[h].flags, cells[h].protocols = cell.samples, cell.flags, cell.protocols
                setting = our_setting(gkey, used)
            rows.append(Row({"Method": label, "Paper setting": _paper_setting(ref_rows, spec.by_dataset),
                             "Ours setting": setting}, cells, "ours" if gkey is not None else "paper-only"))
    for gkey in sorted((k for k in groups if k not in placed), key=_sort_key):
        ours, used = our_cells(groups[gkey])
        cells = {h: ours.get(h, Cell()) for h in headers}
        labels = {"Method": display_text(spec.unmatched_label(gkey[1], gkey[0]))}
        if spec.reference:
            labels["Paper setting"] = DASH
        labels["Ours setting"] = our_setting(gkey, used)
        rows.append(Row(labels, cells))
    return Table(spec.key, spec.title, spec.caption, label_cols, headers, rows, spec.reference, spec.decimals)


def _sort_key(gkey: tuple) -> tuple:
    _, s, eval_ds, (_, differs) = gkey
    return (s.label, s.dataset or "", s.arch, s.epochs or 0, s.file_id, eval_ds, differs)


def paper_tables(records: list[dict]) -> list[Table]:
    """Tables 1-7 plus COCO and segmentation, in the paper's order."""
    return [build_table(spec, records) for spec in PAPER_TABLES]


# ---------------------------------------------------------------------------------------------
# Checkpoint comparison: one row per checkpoint file


# protocol -> metrics shown, the first one ranks
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "knn": ("top1", "top5", "best_k"),
    "linear": ("top1", "top5"),
    "linear_fast": ("top1", "top5"),
    "semi": ("top1", "top5"),
    "voc_det": ("AP", "AP50", "AP75"),
    "coco_instseg": ("bbox_AP", "segm_AP", "bbox_AP50", "segm_AP50"),
    "seg": ("mIoU", "mAcc", "aAcc"),
}
PROTOCOL_TITLES = {"knn": "kNN", "linear": "Linear probe", "linear_fast": "Linear probe (fast, cached features)",
                   "semi": "Semi-supervised", "voc_det": "VOC detection", "coco_instseg": "COCO instance seg.",
                   "seg": "Segmentation", "pretrain": "Pretraining"}


def checkpoint_labels(records: list[dict]) -> dict[str, str]:
    """sha256 -> a short unique name: the file stem, with its folder when stems collide (display-safe)."""
    paths: dict[str, str] = {}
    for rec in records:
        ck = rec["checkpoint"]
        paths.setdefault(ck["sha256"], str(ck.get("path") or ck.get("name") or ck["sha256"][:12]))
    named = {rec["checkpoint"]["sha256"]: display_text(rec["checkpoint"][LABEL_KEY])
             for rec in records if rec["checkpoint"].get(LABEL_KEY)}       # cgh report --label
    paths = {sha: p for sha, p in paths.items() if sha not in named}
    stems: dict[str, list[str]] = {}
    for sha, p in paths.items():
        stems.setdefault(_stem(p), []).append(sha)
    labels = {}
    for stem, shas in stems.items():
        for sha in shas:
            p = Path(paths[sha])
            labels[sha] = display_text(stem if len(shas) == 1 else f"{p.parent.name}/{stem}")
    # still ambiguous (same folder and stem): add the hash
    labels.update(named)
    counts: dict[str, int] = {}
    for v in labels.values():
        counts[v] = counts.get(v, 0) + 1
    return {sha: (v if counts[v] == 1 else f"{v}@{sha[:8]}") for sha, v in labels.items()}


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".safetensors", ".pth.tar", ".pth", ".pt", ".pkl", ".ckpt", ".tar", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _eval_key(rec: dict) -> tuple[str, str, str]:
    ds = rec["dataset"]
    return rec["protocol"], str(ds.get("name", "")), str(ds.get("subset") or "")


def _natural(key: tuple[str, str, str]) -> tuple:
    """Protocols in the paper's order, then dataset and subset with "1percent" before "10percent"."""
    order = list(PROTOCOL_METRICS)
    rank = order.index(key[0]) if key[0] in order else len(order)
    return (rank,) + tuple(tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)) for part in key)


def _eval_title(key: tuple[str, str, str]) -> str:
    protocol, ds, subset = key
    title = f"{PROTOCOL_TITLES.get(protocol, protocol)} on {display_text(ds) if ds else 'unknown dataset'}"
    return title + (f" ({display_text(subset)})" if subset else "")


def competition_ranks(scores: list[float | None]) -> list[int | None]:
    """Rank of each score, highest first; equal scores share a rank ("1, 1, 3"); None is unranked."""
    ranked = sorted(s for s in scores if s is not None)[::-1]
    return [None if s is None else ranked.index(s) + 1 for s in scores]


def ranking_tables(records: list[dict]) -> list[Table]:
    """Per protocol (and dataset, subset): checkpoints ranked by the protocol's first metric.

    A checkpoint evaluated with several settings gets one row per setting (named in "Setting"); a
    diverged result (its loss blew up) is shown but not ranked."""
    labels = checkpoint_labels(records)
    variant = variants(records)
    by_eval: dict[tuple, dict[tuple, list[dict]]] = {}
    for rec in records:
        if rec["protocol"] in PROTOCOL_METRICS:
            row_key = (rec["checkpoint"]["sha256"], variant[id(rec)])
            by_eval.setdefault(_eval_key(rec), {}).setdefault(row_key, []).append(rec)
    tables = []
    for key in sorted(by_eval, key=_natural):
        metrics = PROTOCOL_METRICS[key[0]]
        scored = []
        for (sha, (_, differs)), recs in by_eval[key].items():
            cells = {m: Cell() for m in metrics}
            for r in recs:
                for m in metrics:
                    cells[m].add(r, m)
            head = cells[metrics[0]]
            score = head.mean if head.n and "diverged" not in head.flags else None
            scored.append((score, labels[sha], differs, recs[0]["checkpoint"], cells))
        scored.sort(key=lambda t: (-(t[0] if t[0] is not None else -math.inf), t[1], t[2]))
        rows = []
        for rank, (_, label, differs, ck, cells) in zip(competition_ranks([t[0] for t in scored]), scored):
            settings = checkpoint_settings(ck)
            setting = display_text(settings.describe()) + (f" · {differs}" if differs else "")
            rows.append(Row({"Rank": str(rank) if rank is not None else DASH, "Checkpoint": label,
                             "Method": display_text(settings.label), "Setting": setting}, cells))
        tables.append(Table(_file_key("rank_" + "_".join(p for p in key if p)), f"Ranking: {_eval_title(key)}",
                            f"Checkpoints ranked by {metrics[0]} (higher is better; equal scores share a "
                            "rank; a diverged result is not ranked).",
                            ["Rank", "Checkpoint", "Method", "Setting"], list(metrics), rows, reference=False))
    return tables


def _unique_headers(headers: dict) -> dict:
    """Numbered where two shown headers are equal (names that differ only past the display limit):
    cells are keyed by header, so equal headers would merge two evaluations into one column."""
    out, used = {}, set()
    for key, header in headers.items():
        shown, n = header, 1
        while shown in used:
            n += 1
            shown = f"{header} ({n})"
        out[key] = shown
        used.add(shown)
    return out


def _file_key(name: str, limit: int = 100) -> str:
    """A table's file name stem from its names: safe characters, and short (a 300-character dataset
    name must not exceed the file system's 255-byte name limit); a cut name keeps a hash of the rest."""
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return key if len(key) <= limit else f"{key[:limit - 9]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


# The paper's CGH row for the comparison view: IN-1K ResNet-50 200 epochs (Tables 1, 3, 4).
HEADLINE_PAPER_TABLES = ("table1", "table3", "table4")
PAPER_REFERENCE_ROW = "CGH"


def paper_number(protocol: str, metric: str, dataset: str, subset: str, row: str = PAPER_REFERENCE_ROW) -> float | None:
    """The paper's number for this evaluation (protocol, headline metric, dataset, subset) in its
    main tables, for the row ``row``; None where the paper has none (another dataset, a metric it
    does not print)."""
    ref = reference()
    for spec in PAPER_TABLES:
        if spec.key not in HEADLINE_PAPER_TABLES:
            continue
        for c in spec.columns:
            if protocol not in c.protocols or c.metric != metric or (c.subset or "") != (subset or ""):
                continue
            hits = ref[(ref["table"] == spec.key) & (ref["row"] == row) & (ref["column"] == c.key)]
            for _, r in hits.iterrows():
                if dataset_key(r["dataset"]) == dataset_key(dataset) and not pd.isna(r["value"]):
                    return float(r["value"])
    return None


def summary_table(records: list[dict], reference_sha: str | None = None) -> Table:
    """The comparison view, the report's first screen: one row per checkpoint (and per evaluation
    setting), one column per evaluation (its headline metric), the best of each column marked.

    Each number shows its difference to the reference: the checkpoint ``reference_sha`` (``cgh report
    --reference``), or by default the paper's CGH number where the paper has one for that evaluation
    (IN-1K linear, kNN, semi-supervised; VOC07+12 detection), shown as a "CGH (paper)" row."""
    labels = checkpoint_labels(records)
    evals = sorted({_eval_key(r) for r in records if r["protocol"] in PROTOCOL_METRICS}, key=_natural)
    headers = _unique_headers({k: f"{_eval_title(k)}: {PROTOCOL_METRICS[k[0]][0]}" for k in evals})
    variant = variants(records)
    rows: dict[tuple, Row] = {}
    row_sha: dict[tuple, str] = {}
    for rec in records:
        key = _eval_key(rec)
        if key not in headers:
            continue
        sha, differs = rec["checkpoint"]["sha256"], variant[id(rec)][1]
        # an evaluation run with other settings gets a row of its own, named by what differs
        row_key = (labels[sha], f"{PROTOCOL_TITLES.get(key[0], key[0])}: {differs}" if differs else "")
        if row_key not in rows:
            settings = checkpoint_settings(rec["checkpoint"])
            name = f"{labels[sha]} [{row_key[1]}]" if differs else labels[sha]
            rows[row_key] = Row({"Checkpoint": name, "Method": display_text(settings.label)},
                                {h: Cell() for h in headers.values()})
            row_sha[row_key] = sha
        rows[row_key].cells[headers[key]].add(rec, PROTOCOL_METRICS[key[0]][0])
    ordered = [rows[k] for k in sorted(rows)]
    ours = list(ordered)

    paper = {h: paper_number(k[0], PROTOCOL_METRICS[k[0]][0], k[1], k[2]) for k, h in headers.items()}
    if reference_sha is not None:
        ref_rows = [rows[k] for k in sorted(rows) if row_sha[k] == reference_sha]
        ref_row = next((r for r in ref_rows if "[" not in r.labels["Checkpoint"]), ref_rows[0] if ref_rows else None)
        ref_values = {h: (c.mean if c.n else None) for h, c in ref_row.cells.items()} if ref_row else {}
        if ref_row is not None:
            for cell in ref_row.cells.values():
                cell.is_reference = cell.n > 0
        what = f"the reference checkpoint {ref_row.labels['Checkpoint']}" if ref_row else "the reference"
    else:
        ref_row, ref_values, what = None, paper, "the paper's CGH number (IN-1K, ResNet-50, 200 epochs)"
    if any(v is not None for v in paper.values()):
        paper_cells = {h: Cell(samples=[v] if v is not None else []) for h, v in paper.items()}
        ordered.append(Row({"Checkpoint": "CGH (paper)", "Method": "CGH"}, paper_cells, "paper"))
        if reference_sha is None:
            for cell in paper_cells.values():
                cell.is_reference = cell.n > 0
    for row in ours:
        if row is ref_row:
            continue
        for h, cell in row.cells.items():
            if cell.n and ref_values.get(h) is not None:
                cell.ref_delta = cell.mean - ref_values[h]

    best = set()
    for h in headers.values():
        scores = [(i, row.cells[h].mean) for i, row in enumerate(ours)
                  if row.cells[h].n and "diverged" not in row.cells[h].flags]
        if len(scores) > 1:
            top = max(v for _, v in scores)
            best |= {(i, h) for i, v in scores if v == top}
    return Table("summary", "Comparison: checkpoints across protocols",
                 "Each evaluation's headline metric (higher is better); mean ± std (n) where runs repeat; "
                 f"bold = best in its column; (Δ ...) = difference to {what}.",
                 ["Checkpoint", "Method"], list(headers.values()), ordered, reference=False, best=best)
