"""kNN benchmark: our weighted kNN (float32 search, and the exact bf16-candidate search) vs
scikit-learn's brute-force cosine KNeighborsClassifier, on the same random features.

The three run interleaved ``--repeats`` times (the machine may be shared: medians, with the load
average before each run). We check the neighbours: our bf16 search against our float32 search and
against sklearn's ``kneighbors``, sets per query; a differing set counts as a tie when the swapped
neighbours' float64 similarities lie within 1e-6 of the k-th. Predictions are compared too
(sklearn's ``weights`` callable gets cosine distances d, so exp((1 - d) / T) is our vote).
``--device cuda --imagenet`` times the ImageNet-sized search (1.28M x 2048 train, 50k val, k in
{10, 20, 100, 200}) in both precisions; sklearn is skipped there.

    python benchmarks/knn.py                                  # CPU: 50k x 2048 train, 10k val
    python benchmarks/knn.py --train 20000 --val 2000         # smaller CPU case
    python benchmarks/knn.py --device cuda --imagenet         # GPU, ImageNet-sized, random data
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import cgh  # noqa: F401  (huge pages are opt-in: run with THP_MEM_ALLOC_ENABLE=1 to measure them)
import numpy as np
import torch

from eval.knn import nearest_neighbours, weighted_knn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def neighbour_agreement(idx_a: np.ndarray, idx_b: np.ndarray, train: np.ndarray, val: np.ndarray,
                        tol: float = 1e-6) -> tuple[float, int, int]:
    """(% of queries with identical neighbour sets, differing queries, of which not ties)."""
    differ = [r for r in range(len(idx_a)) if set(idx_a[r]) != set(idx_b[r])]
    not_ties = 0
    for r in differ:
        q = val[r].astype(np.float64)
        q /= np.linalg.norm(q)
        sim = {int(j): float(train[j].astype(np.float64) @ q / np.linalg.norm(train[j].astype(np.float64)))
               for j in set(idx_a[r]) | set(idx_b[r])}
        kth = min(min(sim[int(j)] for j in idx_a[r]), min(sim[int(j)] for j in idx_b[r]))
        swapped = set(idx_a[r]) ^ set(idx_b[r])
        not_ties += any(abs(sim[int(j)] - kth) > tol for j in swapped)
    return 100.0 * (1 - len(differ) / len(idx_a)), len(differ), not_ties


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--val", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--k", type=int, default=20, help="k of the sklearn comparison")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--device", default="cpu")
    p.add_argument("--imagenet", action="store_true", help="1.28M x 2048 train, 50k val, ks 10/20/100/200")
    p.add_argument("--no-sklearn", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (medians reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default: all cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.imagenet:
        args.train, args.val, args.dim, args.classes, args.no_sklearn = 1_281_167, 50_000, 2048, 1000, True
    print(f"device {device}, train {args.train} x {args.dim}, val {args.val}, {args.classes} classes, "
          f"torch threads {torch.get_num_threads()} of {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")

    g = torch.Generator(device=device).manual_seed(0)
    train = torch.randn(args.train, args.dim, device=device, generator=g)
    val = torch.randn(args.val, args.dim, device=device, generator=g)
    labels = torch.randint(0, args.classes, (args.train,), device=device, generator=g)
    ks = (10, 20, 100, 200) if args.imagenet else (args.k,)
    T = args.temperature
    weighted_knn(train[:1000], labels[:1000], val[:10], args.classes, ks=ks)   # warm-up

    results: dict[str, dict] = {}

    def ours(precision: str) -> float:
        stats: dict = {}
        sync(device)
        t0 = time.perf_counter()
        scores = weighted_knn(train, labels, val, args.classes, ks=ks, temperature=T, precision=precision,
                              stats=stats)
        sync(device)
        results[precision] = {"scores": scores, "stats": stats}
        return time.perf_counter() - t0

    clf = None
    if not args.no_sklearn:
        from sklearn.neighbors import KNeighborsClassifier
        clf = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1.0 - d) / T))
        x_train, x_val, y_train = train.cpu().numpy(), val.cpu().numpy(), labels.cpu().numpy()

    def sklearn() -> float:
        t0 = time.perf_counter()
        clf.fit(x_train, y_train)
        results["sklearn"] = {"pred": clf.predict(x_val)}
        return time.perf_counter() - t0

    runs = {"ours bf16+fp32 re-rank": lambda: ours("bf16"), "ours fp32": lambda: ours("fp32")}
    if clf is not None:
        runs["sklearn"] = sklearn
    times: dict[str, list[float]] = {name: [] for name in runs}
    loads = []
    for rep in range(args.repeats):
        for name, fn in runs.items():
            loads.append(os.getloadavg()[0])
            times[name].append(fn())
            print(f"  round {rep + 1}: {name}: {times[name][-1]:.2f} s (load {loads[-1]:.1f})", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"load average during the runs: median {statistics.median(loads):.1f}, "
          f"range {min(loads):.1f}-{max(loads):.1f}")
    for name, t in med.items():
        print(f"{name}: median {t:.2f} s over {len(times[name])} runs ({args.val / t:.0f} queries/s)")
    st = results["bf16"]["stats"]
    print(f"bf16 search: rows certified only with k + 4 margin candidates: {st['wider_rows']}, rows redone in "
          f"float32 (certificate failed twice): {st['fallback_rows']}, of {args.val}")

    k = max(ks)
    idx = {prec: torch.cat([i for _, _, i in nearest_neighbours(train, val, k, precision=prec)]).cpu().numpy()
           for prec in ("bf16", "fp32")}
    train_np, val_np = train.cpu().numpy(), val.cpu().numpy()
    same, differ, not_ties = neighbour_agreement(idx["bf16"], idx["fp32"], train_np, val_np)
    print(f"neighbours, bf16 search vs fp32 search (k={k}): identical sets for {same:.2f}% of queries; "
          f"{differ} differ, {not_ties} of them not ties")
    if clf is None:
        print(f"speed ratio (fp32 / bf16 search): {med['ours fp32'] / med['ours bf16+fp32 re-rank']:.1f}x")
        return

    _, idx_sklearn = clf.kneighbors(x_val)
    for prec in ("bf16", "fp32"):
        same, differ, not_ties = neighbour_agreement(idx[prec], idx_sklearn, train_np, val_np)
        pred = clf.classes_[results[prec]["scores"][args.k].argmax(1).cpu().numpy()]
        print(f"ours {prec} vs sklearn: identical neighbour sets for {same:.2f}% of queries ({differ} differ, "
              f"{not_ties} not ties); same predictions {100 * np.mean(pred == results['sklearn']['pred']):.2f}%")
    for name in ("ours bf16+fp32 re-rank", "ours fp32"):
        print(f"speed ratio sklearn / {name}: {med['sklearn'] / med[name]:.1f}x")


if __name__ == "__main__":
    main()
