"""kNN benchmark: our chunked weighted kNN vs scikit-learn's brute-force cosine KNeighborsClassifier.

Both run on the same random features. We check they find the same neighbours and predict the same
classes (sklearn's ``weights`` callable gets cosine distances d, so exp((1 - d) / T) is our vote),
then print both times and the ratio. ``--device cuda`` times the ImageNet-sized search instead
(1.28M x 2048 train, 50k val, k in {10, 20, 100, 200}); sklearn is skipped there.

    python benchmarks/knn.py                                  # CPU: 50k x 2048 train, 10k val
    python benchmarks/knn.py --train 20000 --val 2000         # smaller CPU case
    python benchmarks/knn.py --device cuda --imagenet         # GPU, ImageNet-sized, random data
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from eval.knn import nearest_neighbours, weighted_knn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.imagenet:
        args.train, args.val, args.dim, args.classes, args.no_sklearn = 1_281_167, 50_000, 2048, 1000, True
    print(f"device {device}, train {args.train} x {args.dim}, val {args.val}, {args.classes} classes, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    g = torch.Generator(device=device).manual_seed(0)
    train = torch.randn(args.train, args.dim, device=device, generator=g)
    val = torch.randn(args.val, args.dim, device=device, generator=g)
    labels = torch.randint(0, args.classes, (args.train,), device=device, generator=g)

    ks = (10, 20, 100, 200) if args.imagenet else (args.k,)
    weighted_knn(train[:1000], labels[:1000], val[:10], args.classes, ks=ks)   # warm-up
    sync(device)
    t0 = time.perf_counter()
    scores = weighted_knn(train, labels, val, args.classes, ks=ks, temperature=args.temperature)
    sync(device)
    ours = time.perf_counter() - t0
    print(f"ours: weighted kNN, k in {ks}: {ours:.2f} s ({args.val / ours:.0f} queries/s)")
    if args.no_sklearn:
        return

    from sklearn.neighbors import KNeighborsClassifier
    T = args.temperature
    clf = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / T))
    x_train, x_val, y_train = train.cpu().numpy(), val.cpu().numpy(), labels.cpu().numpy()
    t0 = time.perf_counter()
    clf.fit(x_train, y_train)
    pred_sklearn = clf.predict(x_val)
    theirs = time.perf_counter() - t0
    print(f"sklearn KNeighborsClassifier(brute, cosine), k={args.k}: {theirs:.2f} s")

    _, idx_sklearn = clf.kneighbors(x_val)
    idx_ours = torch.cat([idx for _, _, idx in nearest_neighbours(train, val, args.k)]).cpu().numpy()
    same_sets = np.mean([set(a) == set(b) for a, b in zip(idx_ours, idx_sklearn)])
    pred_ours = clf.classes_[scores[args.k].argmax(1).cpu().numpy()]
    print(f"same neighbour sets: {100 * same_sets:.2f}% of queries; same predictions: "
          f"{100 * np.mean(pred_ours == pred_sklearn):.2f}%")
    print(f"speed ratio (sklearn / ours): {theirs / ours:.1f}x")


if __name__ == "__main__":
    main()
