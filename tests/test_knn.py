"""kNN protocol: the vote equals a brute-force reference, chunking changes nothing, the feature
cache skips the forward pass, a pretrained backbone beats random init, bad input fails clearly."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cgh.backbone import ArchError
from cgh.config import ConfigError
from cgh.errors import CghError, DatasetError
from cgh.records import read_record
from eval import features as features_mod
from eval import knn
from eval.knn import weighted_knn
from eval.metrics import topk_accuracy
from _helpers_eval import eval_under_torchrun, knn_cfg, synth_cls_root  # noqa: F401  (fixture)


def clustered(n_train=400, n_test=150, dim=24, classes=7, seed=0):
    """Noisy class clusters: accuracy is high but not perfect, so the vote matters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = centres[ytr] + 1.3 * torch.randn(n_train, dim, generator=g)
    xte = centres[yte] + 1.3 * torch.randn(n_test, dim, generator=g)
    return xtr, ytr, xte, yte


def brute_force_knn(xtr, ytr, xte, k, temperature, classes):
    """One query at a time, float64, sorted neighbours, a Python vote: the definition, slowly."""
    xtr = xtr.double().numpy()
    xte = xte.double().numpy()
    xtr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    out = np.zeros((len(xte), classes))
    for i, q in enumerate(xte):
        q = q / np.linalg.norm(q)
        sims = [float(np.dot(q, row)) for row in xtr]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        for j in order:
            out[i, int(ytr[j])] += math.exp(sims[j] / temperature)
    return out


def test_weighted_knn_equals_brute_force():
    xtr, ytr, xte, yte = clustered()
    ks = (1, 10, 20, 100)
    scores = weighted_knn(xtr, ytr, xte, 7, ks=ks, temperature=0.07)
    for k in ks:
        ref = brute_force_knn(xtr, ytr, xte, k, 0.07, 7)
        ours = scores[k].double().numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-30)
        assert (ours.argmax(1) == ref.argmax(1)).all()
        ref_top1 = 100.0 * (ref.argmax(1) == yte.numpy()).mean()
        assert topk_accuracy(scores[k], yte, (1,))[1] == pytest.approx(ref_top1)
    # The task is neither trivial nor hopeless, so the comparison above is informative.
    assert 40 < topk_accuracy(scores[20], yte, (1,))[1] < 100


def test_chunked_equals_unchunked():
    xtr, ytr, xte, _ = clustered(n_train=900, n_test=333, seed=1)
    ks = (10, 20, 200)
    whole = weighted_knn(xtr, ytr, xte, 7, ks=ks, chunk_size=len(xte))
    for chunk in (7, 64, 100):
        part = weighted_knn(xtr, ytr, xte, 7, ks=ks, chunk_size=chunk)
        for k in ks:
            assert torch.equal(part[k], whole[k]), (chunk, k)
    # One row at a time: MKL would use its small-matrix kernels (other rounding); the search pads
    # small chunks (eval.knn.MIN_GEMM_ROWS), so this is bit-identical too.
    single = weighted_knn(xtr, ytr, xte[:40], 7, ks=ks, chunk_size=1)
    for k in ks:
        assert torch.equal(single[k], whole[k][:40]), k


def test_weighted_knn_rejects_bad_k():
    xtr, ytr, xte, _ = clustered(n_train=30, n_test=5)
    with pytest.raises(ValueError, match="1..30"):
        weighted_knn(xtr, ytr, xte, 7, ks=(31,))
    with pytest.raises(ValueError, match="labels"):
        weighted_knn(xtr, ytr[:-1], xte, 7, ks=(3,))


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.4, 0.1, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 2, 0, 0])
    acc = topk_accuracy(scores, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(50.0)      # rows 0 and 3
    assert acc[2] == pytest.approx(75.0)      # + row 2 (label 0 second best); row 1's label ranks last
    assert acc[5] == pytest.approx(100.0)     # k beyond the class count: every row


def test_protocol_record_and_cache_hit(synth_cls_root, random_ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "a", ks=[5, 10, 20], cache_dir=cache)
    rec = read_record(knn.run(cfg))
    assert rec["protocol"] == "knn"
    assert rec["extra"]["feature_cache"] == {"train": "miss", "val": "miss"}
    m = rec["metrics"]
    best = int(m["best_k"])
    assert best in (5, 10, 20)
    assert m["top1"] == m[f"top1_k{best}"] == max(m[f"top1_k{k}"] for k in (5, 10, 20))
    assert all(m[f"top1_k{k}"] <= m[f"top5_k{k}"] <= 100 for k in (5, 10, 20))
    assert rec["dataset"]["split"] == "val" and rec["checkpoint"]["arch"] == "resnet18"
    # The search normalises the train features in place; the cached copy stays the backbone's.
    cached = [load_file(str(p))["features"] for p in cache.rglob("*.safetensors")]
    assert len(cached) == 2
    assert not any(torch.allclose(f.norm(dim=1), torch.ones(len(f)), atol=1e-3) for f in cached)

    # Second run, other k and T: the features come from the cache; any forward pass would raise.
    def no_forward(*a, **k):
        raise AssertionError("feature extraction ran despite a cache hit")
    monkeypatch.setattr(features_mod, "extract_features", no_forward)
    cfg2 = knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "b", ks=[5, 10, 20], cache_dir=cache)
    rec2 = read_record(knn.run(cfg2))
    assert rec2["extra"]["feature_cache"] == {"train": "hit", "val": "hit"}
    assert rec2["metrics"] == rec["metrics"]
    cfg3 = knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "c", ks=[3], temperature=0.5, cache_dir=cache)
    assert read_record(knn.run(cfg3))["extra"]["feature_cache"]["train"] == "hit"
    # Another transform is another cache key: it must extract (and so hit the patched function).
    cfg4 = knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "d", crop=56, cache_dir=cache, ks=[5])
    with pytest.raises(AssertionError, match="cache hit"):
        knn.run(cfg4)


def test_protocol_under_torchrun_equals_one_process(synth_cls_root, random_ckpt, tmp_path):
    """``cgh eval knn`` under ``torchrun --nproc_per_node 2`` (gloo): each process embeds every
    other image, the shards are gathered back into dataset order, and the run writes the record of
    a one-process run: the same labels in the same order, the same features, the same accuracies."""
    one = read_record(knn.run(knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "one", ks=[5, 10, 20],
                                      cache_dir=tmp_path / "cache_one")))
    out = tmp_path / "two"
    eval_under_torchrun("knn", random_ckpt, synth_cls_root, out, "resize=64", "crop=64", "batch_size=64",
                        "ks=[5,10,20]", f"cache_dir={tmp_path / 'cache_two'}")
    two = read_record(out / "result.json")
    assert two["metrics"] == one["metrics"]
    for name in ("train", "val"):       # the cache files hold what each run computed
        (a,) = (tmp_path / "cache_one").glob(f"features-{name}-*.safetensors")
        (b,) = (tmp_path / "cache_two").glob(f"features-{name}-*.safetensors")
        fa, fb = load_file(str(a)), load_file(str(b))
        assert torch.equal(fa["labels"], fb["labels"])
        torch.testing.assert_close(fa["features"], fb["features"], rtol=1e-5, atol=1e-6)


def test_cached_features_equal_fresh_extraction(synth_cls_root, random_ckpt, tmp_path):
    model, ckpt = features_mod.load_model(random_ckpt)
    tf, desc = features_mod.eval_transform(64, 64)
    ds = features_mod.build_split("synthshapes", synth_cls_root, "val", tf)
    kw = dict(dataset="synthshapes", root=synth_cls_root, split="val", transform=desc, cache_dir=tmp_path,
              device=torch.device("cpu"), batch_size=32, num_workers=0)
    f1, y1, hit1 = features_mod.cached_features(model, ckpt, ds, **kw)
    f2, y2, hit2 = features_mod.cached_features(model, ckpt, ds, **kw)
    assert (hit1, hit2) == (False, True)
    assert torch.equal(f1, f2) and torch.equal(y1, y2)
    assert y1.tolist() == ds.targets
    with torch.no_grad():   # independent of the loader: the first images one by one
        ref = torch.stack([model(ds[i][0][None])[0] for i in range(3)])
    torch.testing.assert_close(f1[:3], ref, rtol=1e-4, atol=1e-5)


def test_pretrained_beats_random(synth_root, pretrained_ckpt, random_ckpt, tmp_path):
    """kNN separates a short CGH pretraining from random init on synthshapes (shared fixtures),
    evaluated at the images' native 64 px (tests/test_learning_signal.py: the gain at the demo's
    32 px training size is unreliable)."""
    top1 = {}
    for name, ckpt in (("pretrained", pretrained_ckpt), ("random", random_ckpt)):
        cfg = knn_cfg(knn, ckpt, synth_root, tmp_path / name, ks=[10, 20], cache_dir="", resize=64, crop=64)
        top1[name] = read_record(knn.run(cfg))["metrics"]["top1"]
    assert top1["pretrained"] > top1["random"] + 5, top1


def test_bad_inputs_fail_clearly(synth_cls_root, random_ckpt, tmp_path):
    with pytest.raises(ArchError, match="resnet18 backbone but the config asks for resnet50"):
        knn.run(knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "o", arch="resnet50"))
    with pytest.raises(ConfigError, match="exceeds the 300 images"):
        knn.run(knn_cfg(knn, random_ckpt, synth_cls_root, tmp_path / "o", ks=[301], cache_dir=""))
    # Val split lacking one class: labels would mean different things.
    bad = tmp_path / "bad"
    shutil.copytree(synth_cls_root / "classification", bad / "classification")
    shutil.rmtree(bad / "classification" / "val" / "star")
    with pytest.raises(DatasetError, match="different classes.*star"):
        knn.run(knn_cfg(knn, random_ckpt, bad, tmp_path / "o", cache_dir=""))
    # Empty split: class folders without images.
    for d in (bad / "classification" / "val").iterdir():
        for f in d.iterdir():
            f.unlink()
    with pytest.raises(DatasetError, match="val"):
        knn.run(knn_cfg(knn, random_ckpt, bad, tmp_path / "o", cache_dir=""))
    with pytest.raises(CghError, match="checkpoint not found"):
        knn.run(knn_cfg(knn, tmp_path / "nope.safetensors", synth_cls_root, tmp_path / "o"))


def test_sharded_extraction_equals_single_process(tmp_path):
    """Two gloo processes each embed every other image; the gathered result is in dataset order."""
    import torch.multiprocessing as mp
    from torch.utils.data import TensorDataset

    from _helpers_eval import ddp_extract_worker
    from cgh.backbone import build_backbone

    mp.spawn(ddp_extract_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_backbone("resnet18")
    x = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, labels = features_mod.extract_features(model, TensorDataset(x, torch.arange(11)), batch_size=4,
                                                num_workers=0)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["labels"], labels)          # 0..10: order restored, padding trimmed
        torch.testing.assert_close(got["features"], ref, rtol=1e-4, atol=1e-5)


def test_cli_flags_map_to_config_keys(synth_cls_root, random_ckpt, tmp_path, capsys):
    from cgh.cli import main

    out = tmp_path / "cli"
    code = main(["eval", "knn", "--config", "eval/knn_synth", "--checkpoint", str(random_ckpt),
                 "--data-root", str(synth_cls_root), "-o", str(out), "resize=32", "crop=32", "ks=[5,10]",
                 "num_workers=0", f"cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    rec = read_record(out / "result.json")
    assert rec["config"]["ks"] == [5, 10] and rec["config"]["dataset"] == "synthshapes"
    assert rec["config"]["temperature"] == 0.07 and rec["config"]["checkpoint"] == str(random_ckpt)
    assert "record:" in capsys.readouterr().out
    # A user error is one line on stderr and exit status 2.
    code = main(["eval", "knn", "--config", "eval/knn_synth", "--checkpoint", str(tmp_path / "missing.safetensors"),
                 "--data-root", str(synth_cls_root), "-o", str(out)])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


# --- Exact bf16 search: bf16 candidates, float32 re-ranking, a certificate, float32 fallback ---

def neighbours(xtr, xte, k, **kw):
    stats = {}
    out = list(knn.nearest_neighbours(xtr, xte, k, stats=stats, **kw))
    return torch.cat([s for _, s, _ in out]), torch.cat([i for _, _, i in out]), stats


def near_ties(n_base=300, copies=6, n_test=120, dim=256, eps=2e-3, seed=0):
    """Train rows in tight groups: each base row plus copies perturbed by ``eps``, so in-group cosine
    gaps (~1e-4) lie far below bf16 resolution (~4e-3) yet far above float32 rounding (~1e-7);
    queries sit near base rows, so their k nearest are such a group: bf16 alone cannot order them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_base, dim, generator=g)
    groups = base.repeat_interleave(copies, 0)
    xtr = groups + eps * torch.randn(groups.shape, generator=g)
    xte = base[torch.randint(0, n_base, (n_test,), generator=g)] + 0.3 * torch.randn(n_test, dim, generator=g)
    return xtr, xte


def same_sets(a, b):
    return (a.sort(1).values == b.sort(1).values).all(1)


def assert_same_neighbours(sim_a, idx_a, sim_b, idx_b, tol=1e-6):
    """Same neighbour sets, ties aside: where sets differ, the swapped rows tie with the k-th
    similarity within float32 rounding (two summation orders); the similarities agree everywhere."""
    torch.testing.assert_close(sim_a, sim_b, rtol=0, atol=tol)
    for r in (~same_sets(idx_a, idx_b)).nonzero()[:, 0].tolist():
        only_a = [j for j, t in enumerate(idx_a[r].tolist()) if t not in set(idx_b[r].tolist())]
        assert (sim_a[r, only_a] - sim_b[r, -1]).abs().max() <= tol, (r, sim_a[r], sim_b[r])


@pytest.mark.parametrize("data", ["clustered", "near_ties"])
def test_bf16_search_equals_fp32_and_brute_force(data):
    if data == "clustered":
        xtr, ytr, xte, _ = clustered(n_train=3000, n_test=200, dim=64, seed=2)
    else:
        xtr, xte = near_ties()
        ytr = torch.randint(0, 7, (len(xtr),), generator=torch.Generator().manual_seed(3))
    k = 10
    s32, i32, st32 = neighbours(xtr, xte, k, precision="fp32")
    s16, i16, st16 = neighbours(xtr, xte, k, precision="bf16", chunk_size=64)
    assert st32["precision"] == "fp32" and st16["precision"] == "bf16"
    assert_same_neighbours(s16, i16, s32, i32)              # float32 dot products either way
    # The certificate held for most rows (the fast path is really taken, not always the fallback).
    assert st16["fallback_rows"] < len(xte) // 2, st16
    # Same vote as the float64 one-query-at-a-time definition.
    scores = weighted_knn(xtr, ytr, xte, 7, ks=(k,), temperature=0.07, precision="bf16")[k].double().numpy()
    np.testing.assert_allclose(scores, brute_force_knn(xtr, ytr, xte, k, 0.07, 7), rtol=1e-4, atol=1e-30)


def test_top_m_equals_topk_with_padding_and_ties():
    """The strided-block candidate selection returns exactly topk's values (ties included: values
    are multiples of 1/64), on a row width that needs -inf padding; columns point at those values,
    never at the padding, and no column repeats."""
    g = torch.Generator().manual_seed(7)
    n, rows = 1003, 40
    width = knn._padded_width(n, torch.device("cpu"))
    assert width > n and width % knn.SELECT_BLOCKS == 0
    sim = torch.full((rows, width), float("-inf"), dtype=torch.bfloat16)
    sim[:, :n] = (torch.randint(-40, 40, (rows, n), generator=g) / 64).bfloat16()
    for m in (1, 20, 31, 50):       # blocks of 125 columns: m <= 31 takes the block path, 50 topk
        values, cols = knn._top_m(sim, m, n)
        assert torch.equal(values, sim[:, :n].topk(m, dim=1).values), m
        assert (cols < n).all() and torch.equal(sim.gather(1, cols), values)
        assert all(len(set(r)) == m for r in cols.tolist())


def test_bf16_search_over_several_product_slices_stays_exact(monkeypatch):
    """With the CPU product cut into slices of 257 train rows (ragged last slice), the bf16 search
    still equals the float32 one: each slice lands in its own columns of the similarity buffer."""
    monkeypatch.setattr(knn, "CPU_GEMM_COLUMNS", 257)
    xtr, _, xte, _ = clustered(n_train=3000, n_test=100, dim=64, seed=4)
    s32, i32, _ = neighbours(xtr, xte, 10, precision="fp32")
    s16, i16, st = neighbours(xtr, xte, 10, precision="bf16", chunk_size=64)
    assert st["fallback_rows"] < len(xte) // 2, st
    assert_same_neighbours(s16, i16, s32, i32)


def test_certificate_catches_bf16_misorder():
    """With no margin the bf16 top k is the only candidate set; on near-ties bf16 picks wrong
    members for many rows, the certificate must reject those and the float32 fallback fix them."""
    xtr, xte = near_ties(n_test=60)
    k = 5
    s32, i32, _ = neighbours(xtr, xte, k, precision="fp32")
    xtr_n = torch.nn.functional.normalize(xtr, dim=1)
    xte_n = torch.nn.functional.normalize(xte, dim=1)
    bf16_only = (xte_n.bfloat16() @ xtr_n.bfloat16().T).float().topk(k, dim=1).indices
    wrong = int((~same_sets(bf16_only, i32)).sum())
    assert wrong > 10                                    # the data does defeat bf16 alone
    s16, i16, st = neighbours(xtr, xte, k, precision="bf16", margin=0)
    assert st["fallback_rows"] >= wrong                  # every wrong row was caught ...
    assert_same_neighbours(s16, i16, s32, i32)           # ... and redone exactly
    # Margin 1: k + 1 candidates miss group members, so rows go to the second tier (k + 4 candidates,
    # the whole group), which certifies them without the float32 fallback.
    s16, i16, st = neighbours(xtr, xte, k, precision="bf16", margin=1)
    assert st["wider_rows"] >= wrong and st["fallback_rows"] < wrong, st
    assert_same_neighbours(s16, i16, s32, i32)
    # A margin covering the whole group certifies rows at once, still exactly.
    s16, i16, st = neighbours(xtr, xte, k, precision="bf16", margin=40)
    assert st["wider_rows"] < wrong and st["fallback_rows"] < wrong, st
    assert_same_neighbours(s16, i16, s32, i32)


def test_bf16_error_bound_holds_when_rounding_errors_align():
    """The certificate's delta bounds |bf16 similarity - exact| even for vectors built so that
    every element's bf16 rounding error has the sign of the other vector's element (the
    Cauchy-Schwarz worst case), and for random ones; float64 gives the exact value."""
    g = torch.Generator().manual_seed(5)
    dim = 512
    # Positive elements just below the midpoint between two bf16 numbers: each rounds down by almost
    # half an ulp, so in x.x every product loses, none compensates.
    v = torch.nn.functional.normalize(torch.rand(dim, generator=g) + 0.1, dim=0)
    lo = v.view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32)          # v truncated to bf16
    ulp = (lo.view(torch.int32) + 0x10000).view(torch.float32) - lo
    x = lo + 0.499 * ulp                                                        # norm 1 - O(2^-9)
    assert torch.equal(x.bfloat16().float(), lo)
    rand = torch.nn.functional.normalize(torch.randn(250, dim, generator=g), dim=1)
    train, query = torch.cat([x[None], rand[:200]]), torch.cat([x[None], rand[200:]])
    search = knn._Bf16Search(train, margin=0)
    q16 = query.bfloat16()
    out = (q16 @ search.train_bf16.T).double()
    exact = query.double() @ train.double().T
    err = (out - exact).abs()
    allowed = knn.U_BF16 * out.abs() + search.delta(query, q16).double()[:, None]
    assert (err <= allowed).all()
    assert err[0, 0] > 0.5 * allowed[0, 0]   # the aligned pair uses much of the bound: it is not slack


def test_precision_option_is_checked(tmp_path):
    xtr, ytr, xte, _ = clustered(n_train=50, n_test=5)
    with pytest.raises(ValueError, match="precision"):
        weighted_knn(xtr, ytr, xte, 7, ks=(3,), precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        knn.run(knn_cfg(knn, tmp_path / "c.safetensors", tmp_path, tmp_path / "o", precision="half"))
    assert knn.resolve_precision("auto", torch.device("cpu"), 100, 10 ** 7, 2048, 40) == "fp32"   # too few rows
    assert knn.resolve_precision("auto", torch.device("cpu"), 10 ** 5, 10 ** 4, 256, 40) == "fp32"  # dim too small
    assert knn.resolve_precision("bf16", torch.device("cpu"), 100, 1, 8, 40) == "bf16"             # as asked


def test_unit_rows_is_f_normalize_bit_for_bit():
    """The search's own row normalisation equals ``F.normalize`` exactly, zero rows included."""
    import torch.nn.functional as F

    from eval.knn import _unit_rows
    x = torch.randn(257, 96, generator=torch.Generator().manual_seed(5)) * 3
    x[7] = 0.0
    x[9] = 1e-30
    assert torch.equal(_unit_rows(x), F.normalize(x, dim=1))
    inplace = x.clone()
    assert _unit_rows(inplace, out=inplace).data_ptr() == inplace.data_ptr()
    assert torch.equal(inplace, F.normalize(x, dim=1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_rows_normalised_by_the_caller_give_the_same_scores(precision):
    """``run`` normalises the train features in place and says so (``train_is_unit``), which saves
    a float32 copy of the train set; the scores are the ones of the raw features, bit for bit."""
    from eval.knn import _unit_rows
    xtr, ytr, xte, _ = clustered(n_train=600, n_test=50, seed=3)
    xtr = xtr * 5 + 1
    raw = weighted_knn(xtr, ytr, xte, 7, ks=(10, 50), precision=precision)
    unit = _unit_rows(xtr.clone())
    told = weighted_knn(unit, ytr, xte, 7, ks=(10, 50), precision=precision, train_is_unit=True)
    for k in (10, 50):
        assert torch.equal(told[k], raw[k]), k
    assert not torch.allclose(xtr.norm(dim=1), torch.ones(600))   # so the raw search had work to do
