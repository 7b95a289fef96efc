"""CGH losses against straightforward hand-written formulas (explicit loops, float64 math)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cgh.errors import CghError
from cgh.losses import (cgh_loss, cross_context_loss, global_context_loss, infonce_loss,
                        relational_loss, same_context_loss, warmup_weights)

B, K, D = 4, 16, 8
# Deliberately distinct temperatures: swapping any two of them changes every term.
TAU_S, TAU_T, TAU_H = 0.1, 0.04, 0.07


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def dot(u, v):
    return sum(float(a) * float(b) for a, b in zip(u, v))


def ref_ce(student, teacher, queue_s, queue_t, tau_s, tau_t):
    """mean_b -sum_k p_t[k] log p_s[k] with p = softmax(cosine / tau), written out by hand."""
    total = 0.0
    for b in range(student.shape[0]):
        s = [dot(student[b], queue_s[k]) / tau_s for k in range(queue_s.shape[0])]
        t = [dot(teacher[b], queue_t[k]) / tau_t for k in range(queue_t.shape[0])]
        log_z_s = math.log(sum(math.exp(x) for x in s))
        z_t = sum(math.exp(x) for x in t)
        total += -sum(math.exp(t[k]) / z_t * (s[k] - log_z_s) for k in range(len(s)))
    return total / student.shape[0]


def ref_infonce(q, k, queue, tau):
    total = 0.0
    for b in range(q.shape[0]):
        logits = [dot(q[b], k[b]) / tau] + [dot(q[b], queue[j]) / tau for j in range(queue.shape[0])]
        total += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    return total / q.shape[0]


@pytest.fixture()
def emb():
    return {"sg": unit(B, D, seed=1), "sh": unit(B, D, seed=2), "tg": unit(B, D, seed=3),
            "th": unit(B, D, seed=4), "qg": unit(K, D, seed=5), "qh": unit(K, D, seed=6),
            "small": unit(B, D, seed=7)}


def outputs(e, small=False):
    return {"student_global": [e["sg"]] + ([e["small"]] if small else []),
            "student_hyper": [e["sh"]], "teacher_global": e["tg"], "teacher_hyper": e["th"],
            "queue_global": e["qg"], "queue_hyper": e["qh"]}


def close(a, b):
    assert float(a) == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_relational_loss_formula(emb):
    e = emb
    got = relational_loss(e["sg"] @ e["qg"].T, e["tg"] @ e["qg"].T, TAU_S, TAU_T)
    close(got, ref_ce(e["sg"], e["tg"], e["qg"], e["qg"], TAU_S, TAU_T))


def test_cross_context_terms(emb):
    e = emb
    got = cross_context_loss(e["sg"], e["sh"], e["tg"], e["th"], e["qg"], e["qh"], TAU_S, TAU_T, TAU_H)
    # L_gh: student global on the global queue at tau_s, target teacher hypercolumn at tau_h.
    close(got["gh"], ref_ce(e["sg"], e["th"], e["qg"], e["qh"], TAU_S, TAU_H))
    # L_hg: student hypercolumn on the hypercolumn queue at tau_h, target teacher global at tau_t.
    close(got["hg"], ref_ce(e["sh"], e["tg"], e["qh"], e["qg"], TAU_H, TAU_T))


def test_same_context_terms(emb):
    e = emb
    got = same_context_loss(e["sg"], e["sh"], e["tg"], e["th"], e["qg"], e["qh"], TAU_S, TAU_T, TAU_H)
    close(got["gg"], ref_ce(e["sg"], e["tg"], e["qg"], e["qg"], TAU_S, TAU_T))
    close(got["hh"], ref_ce(e["sh"], e["th"], e["qh"], e["qh"], TAU_H, TAU_H))


def test_global_context_is_ressl(emb):
    e = emb
    got = global_context_loss(e["sg"], e["tg"], e["qg"], TAU_S, TAU_T)
    assert set(got) == {"gg"}
    close(got["gg"], ref_ce(e["sg"], e["tg"], e["qg"], e["qg"], TAU_S, TAU_T))


def test_multi_crop_small_views_average_into_the_global_term(emb):
    e = emb
    got = cgh_loss(outputs(e, small=True), mode="cross", tau_s=TAU_S, tau_t=TAU_T, tau_h=TAU_H,
                   schedule="paper")
    main = ref_ce(e["sg"], e["th"], e["qg"], e["qh"], TAU_S, TAU_H)
    small = ref_ce(e["small"], e["th"], e["qg"], e["qh"], TAU_S, TAU_H)
    close(got["gh"], (main + small) / 2)
    close(got["hg"], ref_ce(e["sh"], e["tg"], e["qh"], e["qg"], TAU_H, TAU_T))


def test_infonce_formula(emb):
    e = emb
    close(infonce_loss(e["sg"], e["tg"], e["qg"], 0.2), ref_infonce(e["sg"], e["tg"], e["qg"], 0.2))


@pytest.mark.parametrize("step, w_infonce, w_cross", [
    (0, 1.0, 0.0), (50, 0.5, 0.25), (99, 0.01, 0.495), (100, 0.0, 0.5), (10_000, 0.0, 0.5)])
def test_warmup_weights(step, w_infonce, w_cross):
    w = warmup_weights(step, 100)
    assert w["w_infonce"] == pytest.approx(w_infonce)
    assert w["w_cross"] == pytest.approx(w_cross)


def test_no_warmup_means_final_weights():
    assert warmup_weights(0, 0) == {"w_infonce": 0.0, "w_cross": 0.5}


def test_cgh_loss_totals_by_schedule_and_mode(emb):
    e = emb
    gh = ref_ce(e["sg"], e["th"], e["qg"], e["qh"], TAU_S, TAU_H)
    hg = ref_ce(e["sh"], e["tg"], e["qh"], e["qg"], TAU_H, TAU_T)
    gg = ref_ce(e["sg"], e["tg"], e["qg"], e["qg"], TAU_S, TAU_T)
    hh = ref_ce(e["sh"], e["th"], e["qh"], e["qh"], TAU_H, TAU_H)
    nce_g = ref_infonce(e["sg"], e["tg"], e["qg"], 0.2)
    nce_h = ref_infonce(e["sh"], e["th"], e["qh"], 0.2)
    kw = dict(tau_s=TAU_S, tau_t=TAU_T, tau_h=TAU_H, infonce_temperature=0.2)

    paper = cgh_loss(outputs(e), mode="cross", schedule="paper", step=0, warmup_steps=100, **kw)
    close(paper["total"], gh + hg)
    assert paper["w_infonce"] == 0.0 and float(paper["infonce"]) == 0.0

    # Authors' code, 30% through the warm-up: 0.7 * InfoNCE(global + hyper) + 0.15 * (gh + hg).
    authors = cgh_loss(outputs(e), mode="cross", schedule="authors", step=30, warmup_steps=100, **kw)
    close(authors["infonce"], nce_g + nce_h)
    close(authors["total"], 0.7 * (nce_g + nce_h) + 0.15 * (gh + hg))
    after = cgh_loss(outputs(e), mode="cross", schedule="authors", step=100, warmup_steps=100, **kw)
    close(after["total"], 0.5 * (gh + hg))

    same = cgh_loss(outputs(e), mode="same", schedule="paper", **kw)
    close(same["total"], gg + hh)
    ressl = cgh_loss(outputs(e), mode="global", schedule="authors", step=30, warmup_steps=100, **kw)
    close(ressl["total"], 0.7 * nce_g + 0.3 * gg)
    close(cgh_loss(outputs(e), mode="global", schedule="authors", step=100, warmup_steps=100,
                   **kw)["total"], gg)


def ressl_reference(student, teacher, queue, tau_s=0.1, tau_t=0.04):
    """ReSSL's loss (mingkai-zheng/ReSSL, ressl.py): ``-sum(softmax(t . Q / 0.04) *
    log_softmax(s . Q / 0.1), dim=1).mean()``, here in float64 with explicit softmaxes."""
    logits_q = student.double() @ queue.double().t() / tau_s
    logits_k = teacher.double() @ queue.double().t() / tau_t
    p_k = torch.exp(logits_k - logits_k.max(1, keepdim=True).values)
    p_k = p_k / p_k.sum(1, keepdim=True)
    log_q = logits_q - torch.log(torch.exp(logits_q).sum(1, keepdim=True))
    return float(-(p_k * log_q).sum(1).mean())


@pytest.mark.parametrize("step", [0, 30, 100, 10_000])
def test_ressl_schedule_is_ressls_loss_at_every_step(emb, step):
    """``schedule="ressl"``: ReSSL's own objective at weight 1 from the first step, no InfoNCE
    (the ``authors`` schedule would be 0.7 InfoNCE + 0.3 x it at step 30 of 100)."""
    e = emb
    want = ressl_reference(e["sg"], e["tg"], e["qg"])
    assert want == pytest.approx(ref_ce(e["sg"], e["tg"], e["qg"], e["qg"], 0.1, 0.04), rel=1e-9)
    no_hyper = {**outputs(e), "teacher_hyper": None, "student_hyper": [], "queue_hyper": None}
    got = cgh_loss(no_hyper, mode="global", schedule="ressl", tau_s=0.1, tau_t=0.04, step=step,
                   warmup_steps=100)
    close(got["total"], want)
    close(got["gg"], want)
    assert got["w_infonce"] == 0.0 and got["w_cross"] == 1.0 and float(got["infonce"]) == 0.0
    with pytest.raises(CghError, match="'ressl' is ReSSL's objective and needs mode 'global'"):
        cgh_loss(outputs(e), mode="cross", schedule="ressl")


def test_gradients_reach_only_the_student(emb):
    e = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
    loss = cgh_loss(outputs(e), mode="cross", step=10, warmup_steps=100)
    loss["total"].backward()
    for name in ("sg", "sh"):
        assert e[name].grad is not None and e[name].grad.abs().sum() > 0
    for name in ("tg", "th", "qg", "qh"):
        assert e[name].grad is None
    assert not any(v.requires_grad for k, v in loss.items() if k != "total" and torch.is_tensor(v))


def test_bf16_autocast_keeps_float32_precision(emb):
    e = emb
    ref = cgh_loss(outputs(e), mode="cross", schedule="paper")["total"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cgh_loss(outputs(e), mode="cross", schedule="paper")["total"]
    assert got.dtype == torch.float32
    close(got, float(ref))


def test_bad_mode_schedule_and_missing_branch(emb):
    with pytest.raises(CghError, match="unknown loss mode 'hyper'"):
        cgh_loss(outputs(emb), mode="hyper")
    with pytest.raises(CghError, match="unknown loss schedule"):
        cgh_loss(outputs(emb), schedule="fast")
    no_hyper = {**outputs(emb), "teacher_hyper": None, "student_hyper": [], "queue_hyper": None}
    with pytest.raises(CghError, match="use_hypercolumn"):
        cgh_loss(no_hyper, mode="cross")
    assert float(cgh_loss(no_hyper, mode="global", schedule="paper")["total"]) > 0
