"""Cross-tokenizer distillation losses on aligned groups: pure functions, named for what they compute.

The student (tokenizer B) learns from a store written by a teacher with tokenizer A.
`xtok/align.py` cuts both target token sequences into aligned groups (shortest runs ending at
the same byte offset). The loss of one optimizer step is

    loss = α · CE(student, its target tokens) + (1 − α) · T² · Σ_groups D_g

summed over the step and divided by the number of **student** target tokens (the trainer's
normalization, unchanged). A group g is scored in one of two ways:

* **vocabulary-mapped KL** (`mapped_divergence`) when g is 1:1 and the map covers the teacher's
  kept ids: every ``cross_tokenizer`` option uses it where all kept ids map onto single student
  tokens (then it is exact: nothing is approximated), ``hybrid`` also where the mapped ids hold at
  least ``xtok_min_mapped_mass`` of the kept mass. The teacher is tempered on its stored K+1
  categories exactly as in losses.py (``p_T(i) = p_i^(1/T) / Z``, tail ``r^(1/T) / Z``); then the
  unmapped kept ids are merged into the tail bucket (after tempering). The student is
  ``q_T = softmax(z / T)`` at the mapped ids, its bucket ``1 − Σ_mapped q_T``. ``renormalize``
  drops the bucket and renormalizes both over the mapped ids. The divergence is the configured
  one (``divergence``), with the same tail floor. With identical tokenizers every group is 1:1
  and fully mapped, so every option computes today's same-tokenizer KD exactly.
* otherwise by the option:
  - **span** (`span_divergence`): the teacher's probability of the group's byte string is the
    chain rule over its teacher tokens, ``log P = Σ log p_T(actual token)`` (tempered stored
    categories; an actual token outside the kept ids gets ``min(tail, p_K)``, its upper bound),
    the student's ``log Q = Σ log q_T(student token)`` over its tokens of the same bytes. Both
    condition on the same bytes before the group. D is the configured divergence between the
    Bernoulli distributions (string, not string): categories ``[P, 1 − P]`` vs ``[Q, 1 − Q]``,
    each ``1 − x`` floored like a tail (``TAIL_FLOOR_EPS · eps``). Exact on every group, needs no
    vocabulary map.
  - **uld** (`uld_distance`, Boizard et al., 2024): the Wasserstein-1 distance between the sorted
    probability vectors at the group's first teacher and first student token (the positions that
    predict the group's first byte, after the same bytes): ``Σ_r |p_(r) − q_(r)|`` over the K
    ranks of the teacher's kept ids (stored sorted) against the student's top-K of q_T, plus
    ``|r_T − (1 − Σ_topK q_T)|`` for the two tails as one bucket each. No map needed; the other
    tokens of an n:m group get only the CE.
  - **hybrid**: the mapped KL on 1:1 groups whose mapped ids hold ≥ ``xtok_min_mapped_mass`` of
    the kept mass, span elsewhere.

T² scales every D_g (as in losses.py). The CE always uses T = 1 on the student's own tokens.

Memory: `xtok_chunked_loss_parts` runs the student's lm_head chunk by chunk over its N target
tokens under checkpoint, exactly like chunked.py: one [chunk, V_student] tensor at a time; it
gathers [target, mapped ids] ([chunk, 1+K]) and, for uld, the top-K of the unmapped groups'
first tokens. No [N, V] tensor, and nothing of the teacher's vocabulary beyond its K kept ids.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from kdpipe.pipeline.train.chunked import LossSpec, chunk_loss
from kdpipe.pipeline.train.losses import (
    forward_kl_from_kept, tail_floor, divergence_fn, student_categories, teacher_categories,
)


def mapped_divergence(
    kept_log_q: torch.Tensor,  # [M, K] log q_T gathered at the mapped student ids (any finite value where unmapped)
    teacher_logprobs: torch.Tensor,  # [M, K] untempered teacher log p of its kept ids (-inf padding)
    teacher_tail: torch.Tensor,  # [M]
    mapped: torch.Tensor,  # [M, K] bool: the kept id maps onto a student id
    *,
    divergence: str = "forward_kl",
    tail_mode: str = "bucket",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """D over the mapped categories + bucket per 1:1 group [M] (module doc). Not multiplied by T²."""
    K = teacher_logprobs.shape[-1]
    valid = teacher_logprobs > -math.inf
    with torch.no_grad():
        log_p = teacher_categories(teacher_logprobs, teacher_tail, temperature, tail_mode).to(kept_log_q.dtype)
        unmapped = valid & ~mapped  # [M, K]
        if bool(unmapped.any()):
            kept_p = torch.where(mapped, log_p[:, :K], torch.full_like(log_p[:, :K], -math.inf))
            if tail_mode == "bucket":
                log_un = torch.logsumexp(torch.where(unmapped, log_p[:, :K], torch.full_like(kept_p, -math.inf)), -1)
                log_p = torch.cat([kept_p, torch.logaddexp(log_p[:, K], log_un).unsqueeze(-1)], -1)  # [M, K+1]
            else:
                renorm = kept_p - torch.logsumexp(kept_p, -1, keepdim=True)
                log_p = torch.where(unmapped.any(-1, keepdim=True), renorm, log_p)
    if divergence == "forward_kl":
        return forward_kl_from_kept(log_p, kept_log_q, mapped, tail_mode)
    return divergence_fn(divergence, jsd_beta)(log_p, student_categories(kept_log_q, mapped, tail_mode))


def _bernoulli(log_x: torch.Tensor) -> torch.Tensor:
    """[G] log x -> [G, 2] log [x, 1 − x], 1 − x floored like a tail."""
    log_x = log_x.clamp_max(0.0)
    rest = (-torch.expm1(log_x)).clamp_min(0.0) + tail_floor(log_x.dtype)
    return torch.stack([log_x, rest.log()], -1)


def span_divergence(teacher_log_p: torch.Tensor, student_log_q: torch.Tensor, *, divergence: str = "forward_kl",
                    jsd_beta: float = 0.5) -> torch.Tensor:
    """D(Bernoulli(P) ‖ Bernoulli(Q)) per group [G]; log P, log Q [G] = chain-rule string log-probs."""
    with torch.no_grad():
        lp = _bernoulli(teacher_log_p.to(student_log_q.dtype))
    return divergence_fn(divergence, jsd_beta)(lp, _bernoulli(student_log_q))


def uld_distance(teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor, student_top_log_q: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Wasserstein-1 between sorted probability vectors + tails per group [U] (module doc).

    teacher_logprobs [U, K] (stored sorted, descending; -inf padding), teacher_tail [U],
    student_top_log_q [U, K'] = the student's top-K' log q_T, sorted descending.
    """
    with torch.no_grad():
        log_p = teacher_categories(teacher_logprobs, teacher_tail, temperature, "bucket").to(student_top_log_q.dtype)
        p = log_p.exp()  # [U, K+1]; padding -> 0
        p_kept, p_tail = p[:, :-1], p[:, -1]
    q = student_top_log_q.exp()  # [U, K']
    K = max(p_kept.shape[-1], q.shape[-1])
    p_kept = torch.nn.functional.pad(p_kept, (0, K - p_kept.shape[-1]))
    q_kept = torch.nn.functional.pad(q, (0, K - q.shape[-1]))
    q_tail = (1.0 - q.sum(-1)).clamp_min(0.0)
    return (p_kept - q_kept).abs().sum(-1) + (p_tail - q_tail).abs()


# ---------------------------------------------------------------- chunked over the student's targets


def _xchunk(h, weight, bias, target_ids, kd_ids, uld_rows, k_uld: int, spec: LossSpec):
    """(Σ CE, log q_T at [target, kd ids] [c, 1+K], top-k log q_T at uld_rows [u, k_uld]) — all that needs [c, V].

    CE and the gathers are chunked.py's own `chunk_loss` (with the target as an extra kept column),
    so a cross-tokenizer step computes bit for bit what a same-tokenizer step does on the same ids.
    """
    cols = torch.cat([target_ids.unsqueeze(-1), kd_ids], dim=-1)  # [c, 1+K]
    ce, g = chunk_loss(h, weight, bias, target_ids, cols, spec)
    k = min(k_uld, weight.shape[0])
    if not k:
        return ce, g, g.new_zeros((0, 0))
    z = torch.nn.functional.linear(h.index_select(0, uld_rows), weight, bias)  # [u, V]: the unmapped groups' first rows
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    if spec.logit_scale != 1.0:
        z = z * spec.logit_scale
    if spec.logit_softcap:
        z = spec.logit_softcap * torch.tanh(z / spec.logit_softcap)
    top = torch.log_softmax(z / spec.temperature, dim=-1).topk(k, dim=-1).values  # [u, k]
    return ce, g, top


def xtok_chunked_loss_parts(
    hidden: torch.Tensor,  # [N, H] final hidden states at the student's target positions
    weight: torch.Tensor,  # [V_model, H]
    vocab_size: int,  # the student tokenizer's vocabulary
    target_ids: torch.Tensor,  # [N]
    xtok: dict,  # XBatch.xtok tensors (see collate.XBatch)
    spec: LossSpec,
    option: str,  # 'span' | 'uld' | 'hybrid'
    bias: torch.Tensor | None = None,
    use_checkpoint: bool = True,
) -> dict[str, torch.Tensor]:
    """Summed loss parts {"ce", "kd" (= T²·Σ_g D_g), "loss"} over the student's N target tokens."""
    w = weight[:vocab_size]
    b = bias[:vocab_size] if bias is not None else None
    n = hidden.shape[0]
    with_kd = spec.alpha < 1.0
    kd_ids = xtok["kd_ids"] if with_kd else xtok["kd_ids"][:, :0]  # [N, K]
    u_rows = xtok["u_srow"] if (with_kd and option == "uld") else xtok["u_srow"][:0]
    k_uld = xtok["u_logprobs"].shape[-1] if len(u_rows) else 0
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ce_sum = hidden.new_zeros((), dtype=acc)
    kept_chunks, top_chunks = [], []
    for start in range(0, n, spec.chunk_size):
        end = min(start + spec.chunk_size, n)
        rows = u_rows[(u_rows >= start) & (u_rows < end)] - start
        args = (hidden[start:end], w, b, target_ids[start:end], kd_ids[start:end], rows, k_uld if len(rows) else 0, spec)
        if use_checkpoint and n > spec.chunk_size and torch.is_grad_enabled():
            ce, kept, top = checkpoint(_xchunk, *args, use_reentrant=False)
        else:
            ce, kept, top = _xchunk(*args)
        ce_sum = ce_sum + ce
        kept_chunks.append(kept)
        if len(rows):
            top_chunks.append(top)
    kd = ce_sum.new_zeros(())
    if with_kd and n > 0:
        kept = torch.cat(kept_chunks) if len(kept_chunks) > 1 else kept_chunks[0]  # [N, 1+K]
        kw = dict(divergence=spec.divergence, jsd_beta=spec.jsd_beta)
        rows = xtok["kd_row"]
        if bool(rows.any()):
            d_map = mapped_divergence(
                kept[rows, 1:], xtok["kd_logprobs"][rows], xtok["kd_tail"][rows], xtok["kd_mapped"][rows],
                tail_mode=spec.tail_mode, temperature=spec.temperature, **kw,
            )  # [M]
            kd = kd + d_map.sum()
        other = xtok["g_other"]  # [G]
        if option in ("span", "hybrid") and bool(other.any()):
            G = other.shape[0]
            g_logq = kept.new_zeros(G).index_add(0, xtok["s_group"], kept[:, 0])  # [G] Σ log q_T per group
            kd = kd + span_divergence(xtok["g_teacher_logp"][other], g_logq[other], **kw).sum()
        elif option == "uld" and len(u_rows):
            top = torch.cat(top_chunks)  # [U, K]
            kd = kd + uld_distance(xtok["u_logprobs"], xtok["u_tail"], top, spec.temperature).sum()
        kd = spec.temperature**2 * kd
    return {"ce": ce_sum, "kd": kd, "loss": spec.alpha * ce_sum + (1.0 - spec.alpha) * kd}


def xtok_dense_loss_parts(student_logits: torch.Tensor, target_ids: torch.Tensor, xtok: dict, spec: LossSpec,
                          option: str) -> dict[str, torch.Tensor]:
    """The same parts from dense student logits [N, V] (the reference path for tests)."""
    V, N = student_logits.shape[-1], student_logits.shape[0]
    eye = torch.eye(V, dtype=student_logits.dtype)
    return xtok_chunked_loss_parts(student_logits, eye, V, target_ids, xtok,
                                   LossSpec(**{**spec.__dict__, "chunk_size": max(N, 1)}), option, use_checkpoint=False)
