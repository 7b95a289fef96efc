"""Weighted kNN classification on frozen features (the InstDisc/DINO vote the paper reports).

``weighted_knn`` is a pure function of tensors, shared with the pretraining monitor; the protocol
(``Config`` + ``run``) extracts centre-crop features through the feature cache, so sweeping k or T
costs no forward pass.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from cgh.config import ConfigError, bounded
from cgh.records import RunTimer
from eval.features import (ProtocolConfig, build_split, cached_features, check_protocol_config, check_same_classes,
                           effective_precision, open_checkpoint, protocol_transforms, read_as, select_device,
                           workers, write_result)
from eval.metrics import topk_accuracy

# Similarities held at once: chunk rows x train rows. 2**27 float32 = 512 MiB, so ImageNet
# (1.28M train features) runs ~100 val rows per chunk and never holds the 50k x 1.28M matrix.
SIMILARITY_BUDGET = 2 ** 27
# Train rows x dim float32 elements normalised, or rounded to bf16 and measured, at once: one
# block is read from the caches by the next operation (4 MiB: see BENCHMARKS.md).
BLOCK_ELEMENTS = 2 ** 20
PRECISIONS = ("auto", "fp32", "bf16")
# CPU cap on val rows per chunk (AMX Xeon, 50k x 2048 train, 10k val, bf16 search, 8 interleaved
# runs: median 2.01 s with 512 rows, 1.95 s with 1024, 2.22 s with 2048, whose 205 MB of bf16
# similarities no longer stay in the caches between the product and the selection).
CPU_CHUNK_ROWS = 1024
# On CPU the bf16 product runs over slices of this many train rows: oneDNN then keeps 2.0-2.4
# TFLOP/s at every chunk size, against 1.4-1.6 for most shapes as one product over 50k train rows.
CPU_GEMM_COLUMNS = 16384
# The candidate selection cuts each row of similarities into this many strided blocks (see _top_m).
SELECT_BLOCKS = 8
# MKL multiplies fewer than this many rows with other kernels, whose float32 sums are ordered
# differently: on an AMD EPYC, rows of a 1-15 row chunk differed in the last bit from the same rows
# in a bigger product. A smaller chunk (the last one, or chunk_size < 16) is padded with zero rows,
# so a test row's similarities never depend on how the test set was chunked.
MIN_GEMM_ROWS = 16
U_BF16 = 2.0 ** -8    # unit roundoff of bfloat16 (8 significand bits, round to nearest even)
U_FP32 = 2.0 ** -24   # unit roundoff of float32


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matrix products beat float32 here: CUDA GPUs with bf16 support, CPUs with AMX
    tiles (about 4x the float32 throughput on the Xeon we benchmark on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and amx is not None and bool(amx())


def resolve_precision(precision: str, device: torch.device, n_train: int, n_test: int, dim: int, m: int) -> str:
    """"auto": bf16 where bf16 products are fast and the search is big enough to repay the bf16 copy
    of the train set and the re-ranking: dim >= 512, >= 2^26 query-train pairs, m candidates a small
    part of the train set (break-even measured on the AMX Xeon: ~2e7 pairs at dim 2048, none up to
    5k x 5k at dim 256)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        big = dim >= 512 and n_train * n_test >= 2 ** 26 and n_train >= 4 * m
        return "bf16" if big and bf16_is_fast(device) else "fp32"
    return precision


def float32_similarities(query: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """``query @ train.T`` in float32, the same numbers for a row whatever rows it comes with
    (``MIN_GEMM_ROWS``)."""
    n = query.shape[0]
    if n < MIN_GEMM_ROWS:
        query = torch.cat([query, query.new_zeros(MIN_GEMM_ROWS - n, query.shape[1])])
    return (query @ train.T)[:n]


def _gamma(n: int) -> float:
    """Higham's gamma_n: a float32 sum of n terms, in any order, errs by at most gamma_n * sum |terms|."""
    return n * U_FP32 / (1 - n * U_FP32)


class _Bf16Search:
    """Exact cosine top-k through a bf16 candidate search with a per-row certificate.

    1. Candidates: bf16 similarities of the chunk to every train row (fast matmul), top m = k + margin.
    2. Re-ranking: float32 similarities to those m rows only; their top k is the answer if
    3. the certificate holds: no train row outside the m candidates can reach the k-th float32
       similarity. Rows where it fails retry 1-3 with k + 4 margin candidates, then are searched
       again in float32 against every train row.

    The bound behind 3, for a query x (float32, unit norm up to rounding) and any train row y, with
    x~ = bf16(x), y~ = bf16(y) and the exact rounding errors e_x = x~ - x, e_y = y~ - y (float32 holds
    them exactly; elementwise |e| <= 2^-8 |x|, so ||e_x|| <= 2^-8 ||x||, but we use the measured norms,
    about half that, which is still rigorous):
      x~.y~ - x.y = e_x.y~ + x.e_y, so |x~.y~ - x.y| <= ||e_x|| (B + E) + ||x|| E      (Cauchy-Schwarz)
    where B = max ||y|| and E = max ||e_y|| over the train rows. The bf16 products are exact in float32
    (8 + 8 significand bits) and are summed in float32 (oneDNN/AMX on CPU; cuBLAS with reduced-precision
    reductions disabled on CUDA): at most gamma_D (||x|| + ||e_x||)(B + E) more. A float32 dot product
    of x and y (the re-ranking, or the float32 search) is within gamma_D ||x|| B of x.y. The matmul
    output is rounded to bf16: a row whose bf16 output is <= s_m (the m-th largest, so every
    non-candidate) had a float32 sum <= s_m + 2^-8 |s_m|. Hence every non-candidate's float32
    similarity is <= s_m + 2^-8 |s_m| + delta with
      delta = ||e_x|| (B + E) + ||x|| E + gamma_D (||x|| + ||e_x||)(B + E) + gamma_D ||x|| B,
    inflated by 2^-10 relative (the norms are themselves float32 sums, relative error <= gamma_D) and
    2^-20 absolute (the float32 roundings of the threshold's own sums, of magnitude < 4: <= 3 * 2^-23;
    AMX flushing bf16 subnormals to zero: < D 2^-126). If the k-th re-ranked similarity is at least
    that threshold, the candidates' top k is the float32 top k (ties aside).
    """

    def __init__(self, train: torch.Tensor, margin: int):
        self.train = train
        self.train_bf16 = torch.empty_like(train, dtype=torch.bfloat16)
        self.b = self.e = torch.zeros((), device=train.device)
        rows = max(1, BLOCK_ELEMENTS // train.shape[1])
        err = torch.empty(min(rows, train.shape[0]), train.shape[1], device=train.device)
        for r in range(0, train.shape[0], rows):    # one pass, block by block through the caches
            src, low = train[r:r + rows], self.train_bf16[r:r + rows]
            low.copy_(src)
            block = err[:src.shape[0]].copy_(low).sub_(src)
            self.b = torch.maximum(self.b, src.norm(dim=1).max())
            self.e = torch.maximum(self.e, block.norm(dim=1).max())
        self.gamma = _gamma(train.shape[1])
        self.margin = margin
        self.wider_rows = 0         # rows that needed k + 4 margin candidates (for tests and benchmarks)
        self.fallback_rows = 0      # rows redone in float32: the certificate failed twice
        self._sim = torch.empty(0, 0, dtype=torch.bfloat16, device=train.device)

    def _sim_buffer(self, rows: int) -> torch.Tensor:
        """The bf16 similarity chunk [rows, padded width], reused (a fresh allocation, 100 MB for
        1024 rows x 50k, costs page faults per chunk); columns past the train rows hold -inf, as
        ``_top_m`` expects."""
        if self._sim.shape[0] < rows:
            n = self.train.shape[0]
            self._sim = torch.empty(rows, _padded_width(n, self.train.device), dtype=torch.bfloat16,
                                    device=self.train.device)
            self._sim[:, n:] = float("-inf")
        return self._sim[:rows]

    def _rerank(self, query: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """float32 similarities of each query row to its candidate train rows (``cand`` [c, m], each
        row sorted): one sampled matrix product, so the candidate rows are never copied out."""
        c, m = cand.shape
        crow = torch.arange(0, c * m + 1, m, device=cand.device)
        with warnings.catch_warnings():     # "sparse CSR support is in beta": sampled_addmm is what we need
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cand.reshape(-1), torch.zeros(c * m, device=cand.device),
                                              size=(c, self.train.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, query, self.train.T, beta=0.0).values().view(c, m)

    def delta(self, query: torch.Tensor, query_bf16: torch.Tensor) -> torch.Tensor:
        """Per query row: how far a float32 sum of bf16 products, or a float32 dot product, can lie
        from the exact similarity to any train row (the class docstring derives it)."""
        a = query.norm(dim=1)
        ea = (query_bf16.float() - query).norm(dim=1)
        b, e, g = self.b, self.e, self.gamma
        return (ea * (b + e) + a * e + g * (a + ea) * (b + e) + g * a * b) * (1 + 2.0 ** -10) + 2.0 ** -20

    def topk(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Certified top k of the chunk; rows failing with k + margin candidates try k + 4 margin
        (cheap: their bf16 similarities are still at hand), then the float32 search."""
        n_train = self.train.shape[0]
        query_bf16 = query.to(torch.bfloat16)
        sim_bf16 = _bf16_matmul(query_bf16, self.train_bf16, self._sim_buffer(query.shape[0]))
        threshold = self.delta(query, query_bf16)
        sim, idx, failed = self._certified_topk(query, sim_bf16, threshold, k, min(n_train, k + self.margin))
        if failed.numel():
            wider = min(n_train, k + 4 * self.margin)
            if wider > k + self.margin:
                self.wider_rows += int(failed.numel())
                s2, i2, still = self._certified_topk(query[failed], sim_bf16[failed], threshold[failed], k, wider)
                sim[failed], idx[failed] = s2, i2
                failed = failed[still]
        if failed.numel():
            self.fallback_rows += int(failed.numel())
            sim[failed], idx[failed] = float32_similarities(query[failed], self.train).topk(k, dim=1)
        return sim, idx

    def _certified_topk(self, query: torch.Tensor, sim_bf16: torch.Tensor, delta: torch.Tensor, k: int, m: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top k of the float32 re-ranked top m bf16 candidates, and the rows whose certificate fails."""
        cand_sim, cand = _top_m(sim_bf16, m, self.train.shape[0])
        s_m = cand_sim[:, -1].float()
        cand = cand.sort(dim=1).values
        sim, pos = self._rerank(query, cand).topk(k, dim=1)
        idx = cand.gather(1, pos)
        if m == self.train.shape[0]:    # every row is a candidate: nothing to certify
            return sim, idx, cand.new_zeros(0)
        certified = sim[:, -1] >= s_m + U_BF16 * s_m.abs() + delta
        return sim, idx, (~certified).nonzero()[:, 0]


def _unit_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.normalize(x, dim=1)``, bit for bit, without its ``expand_as`` (dividing by a broadcast
    [N, 1] norm is 1.7x faster on CPU), block by block so the division reads what the norm read
    from the caches. ``out=x`` normalises in place (each block's norm is taken before its division)."""
    out = torch.empty_like(x) if out is None else out
    rows = max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))
    for r in range(0, x.shape[0], rows):
        block = x[r:r + rows]
        torch.div(block, block.norm(dim=1, keepdim=True).clamp_min(1e-12), out=out[r:r + rows])
    return out


def _padded_width(n: int, device: torch.device) -> int:
    """Columns of the similarity buffer: on CPU ``n`` rounded up to whole ``SELECT_BLOCKS``."""
    return n if device.type == "cuda" else -(-n // SELECT_BLOCKS) * SELECT_BLOCKS


def _top_m(sim: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest values of each row of ``sim[:, :n]`` and their columns (ties in any order).

    On CPU ``sim`` is padded to whole ``SELECT_BLOCKS`` with -inf. Column c lies in block
    c mod W (W = width / blocks). A row's m largest values lie in at most m blocks, whose maxima
    are then among the m largest block maxima; so the m largest of the m * blocks values in the
    blocks with the top m maxima are the row's m largest, and every other value is at most the
    m-th (ties included). The strided maximum is vectorised, a top-k over the full row is not:
    2048 x 50k bf16, m = 52: 0.050 s against 0.079 s for ``topk`` (AMX Xeon, 2 threads).
    """
    width = sim.shape[1]
    blocks = width // SELECT_BLOCKS if sim.device.type != "cuda" and width % SELECT_BLOCKS == 0 else 0
    if blocks < 4 * m:      # small rows (or CUDA, where topk is fast): select directly
        return sim[:, :n].topk(m, dim=1)
    maxima = sim.view(sim.shape[0], SELECT_BLOCKS, blocks).amax(dim=1)
    top_blocks = maxima.topk(m, dim=1).indices
    offsets = torch.arange(0, width, blocks, device=sim.device).view(1, SELECT_BLOCKS, 1)
    cols = (top_blocks.unsqueeze(1) + offsets).view(sim.shape[0], SELECT_BLOCKS * m)
    values, pos = sim.gather(1, cols).topk(m, dim=1)
    return values, cols.gather(1, pos)


def _bf16_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b.T into ``out[:, :len(b)]`` in bf16 with float32 accumulation (the certificate's
    assumption; cuBLAS may otherwise reduce split-K partial sums in bf16); on CPU in slices of
    ``CPU_GEMM_COLUMNS`` train rows."""
    if a.device.type != "cuda":
        for j in range(0, b.shape[0], CPU_GEMM_COLUMNS):
            part = b[j:j + CPU_GEMM_COLUMNS]
            torch.mm(a, part.T, out=out[:, j:j + part.shape[0]])
        return out
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        return torch.mm(a, b.T, out=out)
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def nearest_neighbours(train_features: torch.Tensor, test_features: torch.Tensor, k: int,
                       chunk_size: int | None = None, precision: str = "auto",
                       margin: int | None = None, stats: dict | None = None, train_is_unit: bool = False
                       ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Cosine k-nearest train rows of every test row, chunk by chunk: yields (first test row,
    float32 similarities [c, k], train indices [c, k]), most similar first.

    Rows are L2-normalised here in float32. ``chunk_size`` test rows at a time (default: as many as
    fit ``SIMILARITY_BUDGET``, at most ``CPU_CHUNK_ROWS`` on CPU), so memory is bounded whatever the
    number of test rows; the work runs on the train features' device (GPU when they are on GPU).

    ``precision``: "fp32" multiplies in float32; "bf16" finds ``k + margin`` candidates per row with
    a bf16 product, re-ranks them in float32 and proves the result equal to the float32 search (rows
    where the proof fails are redone in float32, see ``_Bf16Search``), so both give the same
    neighbours, ties aside; "auto" takes "bf16" where it pays off (``resolve_precision``).
    ``margin`` defaults to max(k, 32). ``stats``, if given, receives the precision used, the number
    of rows that needed k + 4 margin candidates (``wider_rows``) and of rows redone in float32
    (``fallback_rows``). ``train_is_unit``: the train rows are float32 and already normalised with
    ``_unit_rows`` (the caller did it in place), so no second float32 copy of the train set is made.
    """
    n_train = train_features.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"k must lie in 1..{n_train} (the number of train features), got {k}")
    margin = max(k, 32) if margin is None else margin
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    train = train_features if train_is_unit else _unit_rows(train_features.float())
    precision = resolve_precision(precision, train.device, n_train, test_features.shape[0], train.shape[1],
                                  k + margin)
    search = _Bf16Search(train, margin) if precision == "bf16" else None
    if stats is not None:
        stats.update(precision=precision, wider_rows=0, fallback_rows=0)
    if chunk_size is None:
        chunk_size = max(1, SIMILARITY_BUDGET // n_train)
        if train.device.type == "cpu":
            chunk_size = min(chunk_size, CPU_CHUNK_ROWS)
    for start in range(0, test_features.shape[0], chunk_size):
        query = _unit_rows(test_features[start:start + chunk_size].to(train.device, torch.float32))
        if search is None:
            sim, idx = float32_similarities(query, train).topk(k, dim=1)
        else:
            sim, idx = search.topk(query, k)
            if stats is not None:
                stats.update(wider_rows=search.wider_rows, fallback_rows=search.fallback_rows)
        yield start, sim, idx


def weighted_knn(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 chunk_size: int | None = None, precision: str = "auto", margin: int | None = None,
                 stats: dict | None = None, train_is_unit: bool = False) -> dict[int, torch.Tensor]:
    """Class scores of a cosine-similarity kNN vote, one [M, C] float32 tensor per k.

    train_features [N, D], train_labels [N] (class ids), test_features [M, D]. Each test row's k
    most similar train rows vote for their class with weight exp(sim / temperature). One neighbour
    search at the largest k serves every k. Memory, device, ``precision`` (the bf16 search is exact
    too), ``margin`` and ``train_is_unit``: see ``nearest_neighbours``.
    """
    if not ks:
        raise ValueError("ks is empty")
    if train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features but {train_labels.shape[0]} labels")
    device = train_features.device
    labels = train_labels.to(device=device, dtype=torch.long)
    scores = {k: torch.zeros(test_features.shape[0], num_classes, device=device) for k in ks}
    if min(ks) < 1:
        raise ValueError(f"k must be positive, got {list(ks)}")
    for start, sim, idx in nearest_neighbours(train_features, test_features, max(ks), chunk_size, precision,
                                              margin, stats, train_is_unit):
        weight = (sim / temperature).exp()
        neighbour_labels = labels[idx]
        for k in ks:
            scores[k][start:start + idx.shape[0]].scatter_add_(1, neighbour_labels[:, :k], weight[:, :k])
    return scores


@dataclass
class Config(ProtocolConfig):
    # Resize filter of the centre crop: bicubic, as the authors' eval_knn.py (interpolation=3) and DINO's
    interpolation: str = "bicubic"
    ks: list[int] = bounded(factory=lambda: [10, 20, 100, 200], ge=1)
    temperature: float = bounded(0.07, gt=0)   # vote weight exp(sim / T), as in InstDisc/DINO and the paper
    chunk_size: int = bounded(0, ge=0)         # val rows per similarity chunk; 0 = as many as fit SIMILARITY_BUDGET
    precision: str = "auto"           # neighbour search: fp32, or bf16 candidates + float32 re-ranking with
                                      # a proof of equality (exact too); auto = bf16 where it is fast.
                                      # The features themselves: backbone_precision (fp32 by default).
    cache_dir: Optional[str] = "~/.cache/cgh/features"   # feature cache; "" or null disables it


def run(cfg: Config) -> Path:
    """Extract (or read cached) centre-crop features of train and val, vote, write result.json."""
    timer = RunTimer()
    check_protocol_config(cfg)
    ks = sorted(set(int(k) for k in cfg.ks))
    if not ks or ks[0] < 1:
        raise ConfigError(f"config key 'ks': need positive integers, got {list(cfg.ks)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"config key 'precision' must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.temperature <= 0:
        raise ConfigError(f"config key 'temperature' must be > 0, got {cfg.temperature}")
    device = select_device(cfg.device)
    model, ckpt = open_checkpoint(cfg)
    _, tf, tf_desc = protocol_transforms(cfg)
    train_ds = build_split(cfg.dataset, cfg.data_root, cfg.train_split, tf)
    val_ds = build_split(cfg.dataset, cfg.data_root, cfg.val_split, tf)
    classes = check_same_classes(train_ds, val_ds, f"{cfg.dataset} at {cfg.data_root}")
    if ks[-1] > len(train_ds):
        raise ConfigError(f"config key 'ks': k={ks[-1]} exceeds the {len(train_ds)} images of split "
                          f"'{cfg.train_split}'")
    cache = os.path.expanduser(cfg.cache_dir) if cfg.cache_dir else None
    hits = {}
    feats = {}
    for split, ds in ((cfg.train_split, train_ds), (cfg.val_split, val_ds)):
        f, y, hits[split] = cached_features(model, ckpt, ds, dataset=cfg.dataset, root=cfg.data_root, split=split,
                                            transform=tf_desc, cache_dir=cache, device=device,
                                            batch_size=cfg.batch_size, num_workers=workers(cfg), read_as=read_as(cfg),
                                            precision=cfg.backbone_precision)
        feats[split] = (f, y)
    (train_f, train_y), (val_f, val_y) = feats[cfg.train_split], feats[cfg.val_split]
    # Normalised in place (this process owns these tensors; the cache file is not touched), so the
    # search holds one float32 copy of the train set, not two: ImageNet's 1.28M x 2048 features
    # need 16 GB with the bf16 copy instead of 26 GB.
    train_unit = train_f.to(device, torch.float32)
    _unit_rows(train_unit, out=train_unit)
    search: dict = {}
    scores = weighted_knn(train_unit, train_y, val_f.to(device), len(classes), ks=ks, temperature=cfg.temperature,
                          chunk_size=cfg.chunk_size or None, precision=cfg.precision, stats=search,
                          train_is_unit=True)
    metrics: dict[str, float] = {}
    for k in ks:
        acc = topk_accuracy(scores[k], val_y.to(device), (1, 5))
        metrics[f"top1_k{k}"], metrics[f"top5_k{k}"] = acc[1], acc[5]
    best = max(ks, key=lambda k: (metrics[f"top1_k{k}"], -k))   # ties go to the smaller k
    metrics = {"top1": metrics[f"top1_k{best}"], "top5": metrics[f"top5_k{best}"], "best_k": best, **metrics}
    return write_result(cfg, protocol="knn", checkpoint=ckpt.identity(),
                        dataset={"name": cfg.dataset, "root": str(cfg.data_root), "split": cfg.val_split,
                                 "train_split": cfg.train_split},
                        metrics=metrics, started=timer.started, wall_time_s=timer.elapsed,
                        extra={"num_train": len(train_ds), "num_val": len(val_ds), "num_classes": len(classes),
                               "feature_dim": int(train_f.shape[1]), "temperature": cfg.temperature,
                               "precision": effective_precision(cfg.backbone_precision, device),
                               "search_precision": search["precision"], "transform": tf_desc,
                               "feature_cache": {s: ("hit" if h else "miss") for s, h in hits.items()}})
