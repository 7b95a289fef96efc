"""CGH losses as pure functions of embeddings, queues and temperatures.

Notation (paper sec. 3.2): a student embedding ``z1`` and a teacher embedding ``z2`` (both
L2-normalised, ``[B, D]``) are compared with a queue ``Q`` (``[K, D]``, normalised) by cosine
similarity; ``softmax(sim / tau)`` over the K queue entries is a similarity distribution. The
student learns the teacher's distribution by cross-entropy, ``CE(y1, y2) = -sum_k y2[k] log y1[k]``.

Temperatures belong to the embedding, identically in every mode: student global ``tau_s`` (0.1),
teacher global ``tau_t`` (0.04), hypercolumn (student or teacher) ``tau_h`` (0.08).

Similarities, softmax and log-softmax are computed in float32 even under bf16 autocast: the
teacher's temperature of 0.04 multiplies any rounding error of the similarities by 25. On CUDA
the similarity products may use TF32 (``run.tf32``, ``cgh.train.setup_tf32``): 10 mantissa bits
like the authors' fp16, 8x finer than bf16.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cgh.errors import CghError

MODES = ("cross", "same", "global")
# authors: CGH's code (InfoNCE warm-up, weights 0.5); paper: CGH eq. 6 (plain sum); ressl: ReSSL's
# own objective (global mode only: the relational term at weight 1 from the first step, no InfoNCE).
SCHEDULES = ("authors", "paper", "ressl")


def similarities(embeddings: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[B, K]`` (float32) of normalised ``embeddings`` ``[B, D]`` with the
    normalised ``queue`` ``[K, D]``. The queue never receives gradients."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return embeddings.float() @ queue.detach().float().t()


def relational_loss(student_sims: torch.Tensor, teacher_sims: torch.Tensor,
                    tau_s: float, tau_t: float) -> torch.Tensor:
    """``mean_b CE(softmax(student_sims[b] / tau_s), softmax(teacher_sims[b] / tau_t))`` (scalar).

    ``student_sims``, ``teacher_sims``: ``[B, K]`` similarities to the same queue. The teacher's
    distribution is the target and is detached (paper eq. 3/5; ReSSL's loss).
    """
    target = F.softmax(teacher_sims.detach().float() / tau_t, dim=1)
    log_pred = F.log_softmax(student_sims.float() / tau_s, dim=1)
    return -(target * log_pred).sum(dim=1).mean()


def _relational_term(student: torch.Tensor, queue: torch.Tensor, teacher_sims: torch.Tensor,
                     tau_s: float, tau_t: float) -> torch.Tensor:
    return relational_loss(similarities(student, queue), teacher_sims, tau_s, tau_t)


@functools.cache
def _compiled_relational_term():
    """``_relational_term`` through ``torch.compile`` (``run.compile``): its softmaxes, product and
    sum over the ``[B, K]`` similarities become a few fused kernels, forward and backward, instead
    of one full pass over ``[B, K]`` per operation (K = 131072 on ImageNet)."""
    return torch.compile(_relational_term)


def _multi_view(student_views: list[torch.Tensor], queue: torch.Tensor, teacher_sims: torch.Tensor,
                tau_student: float, tau_teacher: float, compiled: bool = False) -> torch.Tensor:
    """Mean of the relational loss over student views that share one target (multi-crop: the small
    crops' losses are averaged with the main view's, as in the authors' and ReSSL's code)."""
    term = _compiled_relational_term() if compiled else _relational_term
    losses = [term(z, queue, teacher_sims, tau_student, tau_teacher) for z in student_views]
    return torch.stack(losses).mean()


def _views(z: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(z) if isinstance(z, (list, tuple)) else [z]


def cross_context_loss(student_global, student_hyper, teacher_global: torch.Tensor,
                       teacher_hyper: torch.Tensor, queue_global: torch.Tensor,
                       queue_hyper: torch.Tensor, tau_s: float, tau_t: float,
                       tau_h: float, compiled: bool = False) -> dict[str, torch.Tensor]:
    """CGH (paper eq. 6): ``{"gh": L_gh, "hg": L_hg}``.

    - global-hypercolumn alignment ``L_gh = CE(y1^g, y2^h)``: student global vs global queue at
      ``tau_s``, target = teacher hypercolumn vs hypercolumn queue at ``tau_h``;
    - hypercolumn-global alignment ``L_hg = CE(y1^h, y2^g)``: student hypercolumn vs hypercolumn
      queue at ``tau_h``, target = teacher global vs global queue at ``tau_t``.

    ``student_global``/``student_hyper``: ``[B, D]`` or a list of them (extra global views are the
    multi-crop small crops, averaged into ``L_gh``); teachers ``[B, D]``; queues ``[K, D]``.
    ``compiled``: compute the terms with ``torch.compile`` (same values; ``run.compile``).
    """
    teacher_h = similarities(teacher_hyper, queue_hyper)
    teacher_g = similarities(teacher_global, queue_global)
    return {"gh": _multi_view(_views(student_global), queue_global, teacher_h, tau_s, tau_h, compiled),
            "hg": _multi_view(_views(student_hyper), queue_hyper, teacher_g, tau_h, tau_t, compiled)}


def same_context_loss(student_global, student_hyper, teacher_global: torch.Tensor,
                      teacher_hyper: torch.Tensor, queue_global: torch.Tensor,
                      queue_hyper: torch.Tensor, tau_s: float, tau_t: float,
                      tau_h: float, compiled: bool = False) -> dict[str, torch.Tensor]:
    """Same-context ablation (paper Table 5): ``{"gg": CE(y1^g, y2^g), "hh": CE(y1^h, y2^h)}``,
    each context supervised by the teacher's distribution of the same context. Shapes as in
    ``cross_context_loss``."""
    teacher_g = similarities(teacher_global, queue_global)
    teacher_h = similarities(teacher_hyper, queue_hyper)
    return {"gg": _multi_view(_views(student_global), queue_global, teacher_g, tau_s, tau_t, compiled),
            "hh": _multi_view(_views(student_hyper), queue_hyper, teacher_h, tau_h, tau_h, compiled)}


def global_context_loss(student_global, teacher_global: torch.Tensor, queue_global: torch.Tensor,
                        tau_s: float, tau_t: float, compiled: bool = False) -> dict[str, torch.Tensor]:
    """Global-context ablation, identical to ReSSL: ``{"gg": CE(y1^g, y2^g)}``."""
    teacher_g = similarities(teacher_global, queue_global)
    return {"gg": _multi_view(_views(student_global), queue_global, teacher_g, tau_s, tau_t, compiled)}


def infonce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
                 temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE (scalar): for each query ``[B, D]`` the positive is its own teacher ``key``
    ``[B, D]`` (detached), the negatives are the ``queue`` ``[K, D]``; CE over the K+1 logits
    ``[q.k, q.Q] / temperature`` with the positive at index 0."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = query.float()
        pos = (q * key.detach().float()).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, similarities(q, queue)], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)


def warmup_weights(step: int, warmup_steps: int) -> dict[str, float]:
    """The authors' loss warm-up: with ``alpha = step / warmup_steps`` (1 after the warm-up),
    ``w_infonce = 1 - alpha`` and each cross-context term gets ``w_cross = 0.5 * alpha``; from
    ``warmup_steps`` on: 0 and 0.5. (Their code warms up for 5 epochs, per iteration.)"""
    if step < 0:
        raise CghError(f"step must be >= 0 (got {step})")
    alpha = 1.0 if warmup_steps <= 0 or step >= warmup_steps else step / warmup_steps
    return {"w_infonce": 1.0 - alpha, "w_cross": 0.5 * alpha}


def cgh_loss(outputs: dict, mode: str = "cross", tau_s: float = 0.1, tau_t: float = 0.04,
             tau_h: float = 0.08, schedule: str = "authors", step: int = 0, warmup_steps: int = 0,
             infonce_temperature: float = 0.2, compiled: bool = False) -> dict:
    """The pretraining objective from ``CGHModel``'s outputs.

    ``mode``: ``"cross"`` (CGH: ``gh`` + ``hg``), ``"same"`` (``gg`` + ``hh``) or ``"global"``
    (ReSSL: ``gg``). ``schedule``: ``"authors"`` (default; their code) weighs each relational term
    by ``w_cross`` and adds ``w_infonce * infonce`` (``warmup_weights``; InfoNCE on the global and,
    when present, the hypercolumn branch, summed); in global mode the single term gets ``2 *
    w_cross`` so that it ends at weight 1 like ReSSL. ``"paper"``: the plain sum of the relational
    terms (eq. 6), no InfoNCE. ``"ressl"`` (global mode only): ReSSL's official loss,
    ``CE(softmax(s . Q / tau_s), softmax(t . Q / tau_t))`` at weight 1 from the first step with no
    warm-up term (ReSSL's ``ressl.py``); the same numbers as ``"paper"`` there. ``compiled``: the
    relational terms through ``torch.compile`` (``run.compile``; the same values, fewer kernels).

    Returns ``{"total": scalar with gradient, <each term>: detached scalar, "infonce": detached
    scalar (0 when its weight is 0), "w_cross": float, "w_infonce": float}``.
    """
    if mode not in MODES:
        raise CghError(f"unknown loss mode '{mode}'; expected one of {', '.join(MODES)}")
    if schedule not in SCHEDULES:
        raise CghError(f"unknown loss schedule '{schedule}'; expected one of {', '.join(SCHEDULES)}")
    if schedule == "ressl" and mode != "global":
        raise CghError(f"loss schedule 'ressl' is ReSSL's objective and needs mode 'global' (got '{mode}')")
    has_hyper = outputs.get("teacher_hyper") is not None
    if mode != "global" and not has_hyper:
        raise CghError(f"loss mode '{mode}' needs the hypercolumn branch (use_hypercolumn=True)")

    sg, tg, qg = outputs["student_global"], outputs["teacher_global"], outputs["queue_global"]
    if mode == "global":
        terms = global_context_loss(sg, tg, qg, tau_s, tau_t, compiled)
    else:
        fn = cross_context_loss if mode == "cross" else same_context_loss
        terms = fn(sg, outputs["student_hyper"], tg, outputs["teacher_hyper"], qg,
                   outputs["queue_hyper"], tau_s, tau_t, tau_h, compiled)

    if schedule in ("paper", "ressl"):
        w = {"w_infonce": 0.0, "w_cross": 1.0}
    else:
        w = warmup_weights(step, warmup_steps)
        if mode == "global":
            w["w_cross"] *= 2.0
    total = w["w_cross"] * sum(terms.values())
    infonce = torch.zeros((), device=tg.device)
    if w["w_infonce"] > 0:
        infonce = infonce_loss(_views(sg)[0], tg, qg, infonce_temperature)
        if mode != "global":
            infonce = infonce + infonce_loss(_views(outputs["student_hyper"])[0],
                                             outputs["teacher_hyper"], outputs["queue_hyper"],
                                             infonce_temperature)
        total = total + w["w_infonce"] * infonce
    return {"total": total, **{k: v.detach() for k, v in terms.items()},
            "infonce": infonce.detach(), **w}
