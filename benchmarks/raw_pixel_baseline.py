"""How well do raw pixels classify synthshapes? (They should not: the class is the shape only.)

Fits scikit-learn's LogisticRegression and cosine kNN on flattened, standardised raw pixels of the
synthshapes classification train split and reports top-1 on val. A low number here is what makes
the synthetic benchmark a test of invariant features rather than of memorised pixels. With
``--cnn-epochs N`` it also trains a small supervised CNN (flip, 90-degree rotation and colour-channel
permutation augmentation) as evidence that the labels are learnable from the pixels.

    python benchmarks/raw_pixel_baseline.py                 # generate the default set in a temp dir
    python benchmarks/raw_pixel_baseline.py --root ROOT     # use an existing synthshapes root
    python benchmarks/raw_pixel_baseline.py --train-per-class 100 --image-size 32 --cnn-epochs 80
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from cgh.data.datasets import build_classification_dataset
from cgh.data.synth import generate


def raw_pixels(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = build_classification_dataset("synthshapes", root, split)
    x = np.stack([np.asarray(ds[i][0], dtype=np.float32).reshape(-1) / 255 for i in range(len(ds))])
    return x, np.asarray(ds.targets)


def baselines(root: str, ks: tuple[int, ...] = (1, 10, 20)) -> dict[str, float]:
    """Top-1 (%) on val of raw-pixel classifiers trained on train."""
    xtr, ytr = raw_pixels(root, "train")
    xva, yva = raw_pixels(root, "val")
    scaler = StandardScaler().fit(xtr)
    xtr_s, xva_s = scaler.transform(xtr), scaler.transform(xva)
    out = {"chance": 100.0 / len(np.unique(ytr))}
    logreg = LogisticRegression(max_iter=2000, C=0.01).fit(xtr_s, ytr)
    out["linear"] = 100.0 * logreg.score(xva_s, yva)
    for k in ks:
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(xtr, ytr)
        out[f"knn_k{k}"] = 100.0 * knn.score(xva, yva)
    return out


def small_cnn_top1(root: str, epochs: int, seed: int = 0) -> float:
    """Val top-1 (%) of a 4-block CNN trained with supervision on the train split (CPU is fine)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    (xtr, ytr), (xva, yva) = raw_pixels(root, "train"), raw_pixels(root, "val")
    side = int(round((xtr.shape[1] // 3) ** 0.5))

    def images(flat: np.ndarray) -> "torch.Tensor":   # (N, H*W*3) -> (N, 3, H, W)
        return torch.from_numpy(flat).reshape(len(flat), side, side, 3).permute(0, 3, 1, 2)

    xtr, xva, ytr = images(xtr), images(xva), torch.from_numpy(ytr)

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    net = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, int(ytr.max()) + 1))
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            x = torch.rot90(xtr[idx], int(torch.randint(4, ())), (2, 3))[:, torch.randperm(3)]
            x = x.flip(3) if torch.rand(()) < 0.5 else x
            loss = nn.functional.cross_entropy(net(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return 100.0 * (net(xva).argmax(1).numpy() == yva).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="existing synthshapes root (default: generate one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--cnn-epochs", type=int, default=0, help="also train a small supervised CNN")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = tmp
            generate(root, seed=args.seed, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class, image_size=args.image_size, det_train=1, det_test=1)
        start = time.perf_counter()
        result = baselines(root)
        if args.cnn_epochs:
            result["small_cnn"] = small_cnn_top1(root, args.cnn_epochs, args.seed)
    print(f"synthshapes raw-pixel baselines (val top-1 %, {time.perf_counter() - start:.1f}s):")
    for name, value in result.items():
        print(f"  {name:>9}: {value:5.1f}")


if __name__ == "__main__":
    main()
