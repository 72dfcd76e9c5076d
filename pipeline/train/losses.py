"""Distillation losses on sparse teacher targets: pure functions, each named for what it computes.

The training loss of one optimizer step is

    loss = α · CE(student, target tokens) + (1 − α) · T² · D(teacher_T ‖ student_T)

summed over every target token of the step and divided by the number of target tokens
(the trainer does the division, with the count all-reduced over ranks and micro-batches).

Where the temperature T applies
-------------------------------
* Student: ``log q_T = log_softmax(z / T)`` over the full (tokenizer) vocabulary, z = the
  student's logits. The CE term always uses T = 1.
* Teacher: the store holds, per target token, the teacher's untempered full-vocabulary
  log-probs ``log p_i`` of K kept ids and the exact tail mass ``r = 1 − Σ_i p_i``. The teacher
  is tempered on that stored (K+1)-category distribution:
  ``p_T(i) = p_i^(1/T) / Z`` and ``p_T(tail) = r^(1/T) / Z`` with ``Z = Σ_i p_i^(1/T) + r^(1/T)``
  (``renormalize`` drops the tail category). With k = V (no tail) this is exactly
  ``softmax(teacher_logits / T)``; with k < V the tail is treated as one token of mass r,
  which is an approximation whenever T ≠ 1 (there is no exact answer without the tail's logits).
* T² keeps the KD gradient's scale comparable across temperatures (Hinton et al., 2015).

Tail modes (topk stores)
------------------------
* ``bucket``: K+1 categories. Teacher: the kept p_T(i) plus the tail bucket p_T(tail).
  Student: q_T(i) at the kept ids plus ``q_T(tail) = 1 − Σ_kept q_T(i)``, the student's mass
  outside the kept ids (the whole vocabulary is accounted for).
* ``renormalize``: K categories. Both distributions renormalized over the kept ids:
  ``p̃(i) = p_T(i) / Σ_kept p_T``, ``q̃(i) = q_T(i) / Σ_kept q_T``. A position that keeps no
  entry (its listed log-probs were all −inf, i.e. p = 0; or a sampled store drew only the tail)
  has nothing to renormalize over and contributes 0 (``bucket`` puts all its mass on the tail).

A tail is a difference of two numbers close to 1 when the kept ids hold nearly all the mass,
so its rounding noise is ~eps·K. Both tails therefore get ``TAIL_FLOOR_EPS · eps(dtype)`` added
(≈1e-6 in float32, ≈2e-15 in float64): terms like ``q·log(q/p)`` stay finite when the teacher's
tail is 0, and with k = V both tails are the floor, so the tail term is exactly 0.

Divergences (P = teacher categories, Q = student categories, both tempered)
------------------------------------------------------------------------------
* ``forward_kl``       KL(P‖Q) = Σ_c P_c (log P_c − log Q_c). A KL, not a cross-entropy: the
                       teacher entropy is subtracted, so the loss is 0 when the student matches.
* ``reverse_kl``       KL(Q‖P) = Σ_c Q_c (log Q_c − log P_c).
* ``generalized_jsd``  β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q, 0 < β < 1 (Agarwal et al.,
                       2024, "GKD"); β = 0.5 is the Jensen–Shannon divergence.
* ``total_variation``  ½ Σ_c |P_c − Q_c|.

Sampled stores
--------------
A ``sampled`` store keeps, per target token, N draws from the teacher's top-K + tail bucket:
``logprobs = log(n_c / N)`` for the drawn ids and ``tail = n_tail / N``. Only the forward KL has
a count-weighted estimator: ``Σ_c (n_c/N)·(log(n_c/N) − log q(c))`` over the drawn ids (+ the
tail-draw term against the student's mass outside the drawn ids in ``bucket`` mode; dropped and
counts renormalized in ``renormalize`` mode). Its expectation over the draws has the gradient of
KL(P‖Q) exactly when the teacher had no tail draws (its value is offset by the constant
H(P) − E[H(P̂)], which does not depend on the student); tail draws are an approximation, since
the tail token is unknown. Reverse KL, JSD and TV need P at ids the student puts mass on, or
|P − Q| — nonlinear in P — so no unbiased estimate exists from counts: `check_supported` refuses
them, and refuses T ≠ 1 (p^(1/T) is not linear in p either).

On-policy stores and which estimator is unbiased for what
----------------------------------------------------------
An on-policy store (recipe ``on-policy``) holds the teacher's scores of completions x that the
*student* sampled (q = the sampler, the student at the start of the round), and every position's
entries include the sampled token x_t itself (top-K ∪ {x_t}, exact tail). With ``divergence =
"auto"`` (the default) such a store trains on ``reverse_kl`` (mode-seeking, GKD with λ = 1),
every other store on ``forward_kl``.
* ``reverse_kl`` over the stored categories: Σ_c Q_c (log Q_c − log P_c) on the K+1 (bucket) or
  K (renormalize) categories at each position of the student's own text. Exact per position
  for the partition into kept ids + tail (no sampling in the value); biased low relative to the
  full-vocabulary KL(q‖p) by the within-tail term (0 at k = V), like every top-k divergence.
* ``reverse_kl_sampled_token``: the single-sample estimator at the student's own token,
  ``k(x_t) = log q(x_t) − log p(x_t)`` (T = 1). Its *value* is unbiased for the per-token
  KL(q‖p) = E_{x~q}[log q(x) − log p(x)] when x_t was drawn from q itself (sampling temperature
  1, top-p 1, and the sampler's weights = the student's: exact at a round's first step, drifting
  as the student trains within the round). Differentiating k directly gives E_q[∇ log q] = 0 — no
  signal — so the loss uses the score-function form: value k, gradient ``sg(k)·∇ log q(x_t)``,
  whose expectation is ∇_θ KL(q_θ‖p) at the token (the per-token "advantage" of on-policy
  distillation, no credit to earlier tokens for later ones). It needs only log p(x_t), which the
  on-policy store keeps exactly as an entry; its variance is much higher than ``reverse_kl``'s.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kdpipe.storage.errors import ConfigError

Divergence = Literal["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"]
TailMode = Literal["bucket", "renormalize"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation")
# Sampled-token estimators (not divergences over categories): they need log p at the target token
# itself, which only on-policy stores (recipe_params.target_entry) keep as an entry.
TARGET_ENTRY_DIVERGENCES: tuple[str, ...] = ("reverse_kl_sampled_token",)

TAIL_MODES: tuple[str, ...] = ("bucket", "renormalize")
TAIL_FLOOR_EPS = 8.0


def check_supported(codec: str, divergence: str, temperature: float) -> None:
    """Refuse (divergence, temperature) combinations a store's codec cannot support, saying why."""
    if divergence not in DIVERGENCES + TARGET_ENTRY_DIVERGENCES:
        raise ConfigError(f"divergence: {divergence!r} is not one of {', '.join(DIVERGENCES + TARGET_ENTRY_DIVERGENCES)}")
    if divergence in TARGET_ENTRY_DIVERGENCES:
        if codec != "topk":
            raise ConfigError(
                f"divergence: {divergence!r} needs the teacher's exact log-prob at the student's sampled token, which "
                "a 'sampled' store does not hold (its counts estimate p, not log p); use an on-policy 'topk' store"
            )
        if temperature != 1.0:
            raise ConfigError(
                f"temperature: {temperature} != 1 with divergence {divergence!r}: the estimator log q(x) − log p(x) is "
                "unbiased only for the untempered distributions the token was sampled from; use temperature = 1.0"
            )
        return
    if codec == "sampled":
        if divergence != "forward_kl":
            raise ConfigError(
                f"divergence: {divergence!r} cannot be computed from a 'sampled' store: it holds draws from the "
                "teacher, whose counts give an unbiased estimate only of terms linear in the teacher's probabilities "
                "(the forward KL's cross-entropy); reverse KL, JSD and total variation need the teacher's probability "
                "at every id the student puts mass on. Use divergence = 'forward_kl', or a 'topk' store."
            )
        if temperature != 1.0:
            raise ConfigError(
                f"temperature: {temperature} != 1 cannot be applied to a 'sampled' store: the draws come from the "
                "teacher at T = 1 and tempering p^(1/T) is not linear in p, so counts give no unbiased estimate. "
                "Use temperature = 1.0, or a 'topk' store."
            )
    elif codec != "topk":
        raise ConfigError(f"store codec {codec!r} is unknown to train-student (expected 'topk' or 'sampled')")


def tail_floor(dtype: torch.dtype) -> float:
    return TAIL_FLOOR_EPS * torch.finfo(dtype).eps


def _safe(log_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, log x with -inf replaced by 0): keeps 0·(-inf) out of both the value and the gradient."""
    present = log_x > -math.inf
    safe_log = torch.where(present, log_x, torch.zeros_like(log_x))
    return torch.where(present, safe_log.exp(), torch.zeros_like(log_x)), safe_log


# ---------------------------------------------------------------- divergences over categories
# log_p, log_q: [N, C] log-probabilities over the same C categories (-inf = category absent).
# Each returns [N], one value per target token.


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) = Σ_c P_c (log P_c − log Q_c); 0·log 0 = 0."""
    p, lp = _safe(log_p)
    return (p * (lp - log_q.clamp_min(torch.finfo(log_q.dtype).min))).sum(-1)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(Q‖P) = Σ_c Q_c (log Q_c − log P_c); 0·log 0 = 0."""
    return forward_kl(log_q, log_p)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """β·KL(P‖M) + (1−β)·KL(Q‖M) with M = β·P + (1−β)·Q, 0 < β < 1."""
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"jsd_beta: {beta} must be strictly between 0 and 1")
    p, lp = _safe(log_p)
    q, lq = _safe(log_q)
    # log M = log(β·P + (1−β)·Q), finite wherever P or Q is present.
    log_m = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    present = (p > 0) | (q > 0)
    log_m = torch.where(present, log_m, torch.zeros_like(log_m))
    return beta * (p * (lp - log_m)).sum(-1) + (1.0 - beta) * (q * (lq - log_m)).sum(-1)


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """½ Σ_c |P_c − Q_c|."""
    p, _ = _safe(log_p)
    q, _ = _safe(log_q)
    return 0.5 * (p - q).abs().sum(-1)


def sampled_token_reverse_kl(log_q_x: torch.Tensor, log_p_x: torch.Tensor) -> torch.Tensor:
    """Per-token estimator at the sampled token x ~ q: value log q(x) − log p(x), gradient sg(·)·∇ log q(x).

    log_q_x [N] (carries the student's gradient), log_p_x [N] (teacher, no gradient) -> [N].
    E_{x~q}[value] = KL(q‖p) and E_{x~q}[gradient] = ∇ KL(q‖p) (see the module doc).
    """
    k = (log_q_x - log_p_x).detach()
    return k + k * (log_q_x - log_q_x.detach())


def divergence_fn(name: str, beta: float = 0.5):
    """The divergence by its config name, as a function (log_p [N, C], log_q [N, C]) -> [N]."""
    if name == "forward_kl":
        return forward_kl
    if name == "reverse_kl":
        return reverse_kl
    if name == "generalized_jsd":
        return lambda lp, lq: generalized_jsd(lp, lq, beta)
    if name == "total_variation":
        return total_variation
    raise ConfigError(f"divergence: {name!r} is not one of {', '.join(DIVERGENCES)}")


# ---------------------------------------------------------------- teacher / student categories


def teacher_categories(
    teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor, temperature: float, tail_mode: str
) -> torch.Tensor:
    """The tempered teacher over its stored categories: [N, K+1] (bucket) or [N, K] (renormalize).

    teacher_logprobs [N, K] untempered log p_i (-inf = padding); teacher_tail [N] = 1 − Σ_i p_i.
    """
    lp = teacher_logprobs.to(torch.float32 if teacher_logprobs.dtype != torch.float64 else torch.float64)
    if tail_mode == "bucket":
        tail = teacher_tail.to(lp.dtype).clamp_min(0.0)
        lp = torch.cat([lp, tail.log().unsqueeze(-1)], dim=-1)  # [N, K+1]
    elif tail_mode != "renormalize":
        raise ConfigError(f"tail_mode: {tail_mode!r} is not one of {', '.join(TAIL_MODES)}")
    lp = lp / temperature
    log_p = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    if tail_mode == "bucket":
        # Floor the tail (see the module docstring): keeps reverse-type terms finite at tail 0.
        floor = math.log(tail_floor(log_p.dtype))
        log_p = torch.cat([log_p[:, :-1], torch.logaddexp(log_p[:, -1:], torch.full_like(log_p[:, -1:], floor))], -1)
    return log_p


def student_categories(kept_log_q: torch.Tensor, valid: torch.Tensor, tail_mode: str) -> torch.Tensor:
    """The student over the teacher's categories: [N, K+1] (bucket) or [N, K] (renormalize).

    kept_log_q [N, K] = log q_T at the kept ids (full-vocabulary log-softmax, gathered);
    valid [N, K] bool = the entry is a real id, not padding.
    """
    log_q = kept_log_q.masked_fill(~valid, -math.inf)  # [N, K]
    if tail_mode == "renormalize":
        return log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    # 1 − Σ_kept q is the student's mass outside the kept ids; rounding can make it slightly < 0.
    tail = (1.0 - log_q.exp().sum(-1)).clamp_min(0.0) + tail_floor(log_q.dtype)  # [N]
    return torch.cat([log_q, tail.log().unsqueeze(-1)], dim=-1)  # [N, K+1]


def sampled_teacher_categories(teacher_logprobs: torch.Tensor, teacher_tail: torch.Tensor, tail_mode: str) -> torch.Tensor:
    """Count-weighted teacher estimate from a sampled store: [N, K+1] (bucket) or [N, K] (renormalize).

    teacher_logprobs [N, K] = log(n_c / N) of the drawn ids; teacher_tail [N] = n_tail / N.
    """
    lp = teacher_logprobs.to(torch.float32 if teacher_logprobs.dtype != torch.float64 else torch.float64)
    if tail_mode == "renormalize":
        return lp - torch.logsumexp(lp, dim=-1, keepdim=True)
    tail = teacher_tail.to(lp.dtype).clamp_min(0.0)
    return torch.cat([lp, tail.log().unsqueeze(-1)], dim=-1)


# ---------------------------------------------------------------- per-token loss parts


def cross_entropy(log_q: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """−log q(target) per token: log_q [N, V] (T = 1 log-softmax), target_ids [N] -> [N]."""
    return -log_q.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


def kd_divergence_from_kept(
    kept_log_q: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    tail_mode: str = "bucket",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    codec: str = "topk",
    target_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """D(teacher_T ‖ student_T) per token [N], from the student's log q_T gathered at the kept ids.

    kept_log_q [N, K] = log_softmax(z / T)[teacher_ids]; teacher_ids [N, K] (padding: any id, with
    teacher_logprobs = -inf); teacher_logprobs [N, K]; teacher_tail [N]; target_ids [N] (only the
    sampled-token estimator reads them: the target must be one of the kept ids, as in on-policy
    stores; a position where it is not contributes 0). Not multiplied by T².
    """
    valid = teacher_logprobs > -math.inf  # [N, K]
    if tail_mode == "renormalize" and divergence != "reverse_kl_sampled_token":
        if valid.shape[-1] == 0:  # no position of the batch keeps an entry: nothing to renormalize over
            return kept_log_q.sum(-1)  # [N] zeros, still attached to the graph
        # A position with no kept entry (its listed log-probs were all -inf, or a sampled store drew only
        # the tail) has nothing to renormalize over: it contributes 0. One dummy category with
        # log p = log q = 0 gives D = 0 exactly for every divergence, with every value finite, so no
        # NaN can reach the gradient (a torch.where over a NaN branch would still leak it).
        dummy = ~valid.any(-1, keepdim=True) & (torch.arange(valid.shape[-1], device=valid.device) == 0)  # [N, K]
        teacher_logprobs = teacher_logprobs.masked_fill(dummy, 0.0)
        kept_log_q = kept_log_q.masked_fill(dummy, 0.0)
        valid = valid | dummy
    if divergence == "reverse_kl_sampled_token":
        hit = valid & (teacher_ids == target_ids.unsqueeze(-1))  # [N, K] the sampled token's entry
        log_q_x = torch.where(hit, kept_log_q, torch.zeros_like(kept_log_q)).sum(-1)  # [N]
        log_p_x = torch.where(hit, teacher_logprobs, torch.zeros_like(teacher_logprobs)).sum(-1).to(kept_log_q.dtype)
        d = sampled_token_reverse_kl(log_q_x, log_p_x)
        return torch.where(hit.any(-1), d, torch.zeros_like(d))
    with torch.no_grad():  # the teacher side carries no gradient
        if codec == "sampled":
            log_p = sampled_teacher_categories(teacher_logprobs, teacher_tail, tail_mode)
        else:
            log_p = teacher_categories(teacher_logprobs, teacher_tail, temperature, tail_mode)
        log_p = log_p.to(kept_log_q.dtype)
    if divergence == "forward_kl":
        return forward_kl_from_kept(log_p, kept_log_q, valid, tail_mode)
    log_q = student_categories(kept_log_q, valid, tail_mode)
    return divergence_fn(divergence, jsd_beta)(log_p, log_q)


def forward_kl_from_kept(log_p: torch.Tensor, kept_log_q: torch.Tensor, valid: torch.Tensor, tail_mode: str) -> torch.Tensor:
    """forward_kl(log_p, student_categories(kept_log_q, valid, tail_mode)) with fewer kernels.

    KL(P‖Q) = Σ_c P_c log P_c − Σ_c P_c log Q_c: the first sum has no gradient (computed once,
    without autograd); padded entries have P_c = 0, and their gathered log q is finite, so the
    second sum needs no masking. Same value as the generic path (tested at k = V).
    """
    with torch.no_grad():
        p, lp = _safe(log_p)
        neg_entropy = (p * lp).sum(-1)  # [N] Σ P log P
    if tail_mode == "renormalize":
        # log Q̃_i = log q_i − logsumexp_valid(log q); Σ P̃ = 1.
        lse = torch.logsumexp(kept_log_q.masked_fill(~valid, -math.inf), dim=-1)  # [N]
        return neg_entropy - (p * kept_log_q).sum(-1) + lse
    K = kept_log_q.shape[-1]
    tail_q = (1.0 - (kept_log_q.exp() * valid).sum(-1)).clamp_min(0.0) + tail_floor(kept_log_q.dtype)  # [N]
    cross = (p[:, :K] * kept_log_q).sum(-1) + p[:, K] * tail_q.log()  # [N] Σ P log Q
    return neg_entropy - cross


def kd_divergence(
    log_q: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """D(teacher_T ‖ student_T) per token [N]; log_q [N, V] = log_softmax(student_logits / T)."""
    kept = log_q.gather(-1, teacher_ids.clamp_min(0))  # [N, K]
    return kd_divergence_from_kept(kept, teacher_ids, teacher_logprobs, teacher_tail, **kwargs)


def distillation_loss_parts(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    teacher_tail: torch.Tensor | None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    tail_mode: str = "bucket",
    jsd_beta: float = 0.5,
    codec: str = "topk",
) -> dict[str, torch.Tensor]:
    """Summed loss parts of N target tokens from dense student logits [N, V] (the reference path).

    Returns {"ce": Σ CE, "kd": Σ T²·D, "loss": α·ce + (1−α)·kd} as 0-dim sums (divide by the
    global target-token count). `chunked.chunked_loss_parts` computes the same without ever
    holding more than one chunk of logits.
    """
    z = student_logits.float() if student_logits.dtype not in (torch.float32, torch.float64) else student_logits
    log_q1 = torch.log_softmax(z, dim=-1)  # [N, V]
    ce = cross_entropy(log_q1, target_ids).sum()
    if alpha >= 1.0 or teacher_ids is None:
        kd = ce.new_zeros(())
    else:
        log_qt = log_q1 if temperature == 1.0 else torch.log_softmax(z / temperature, dim=-1)  # [N, V]
        d = kd_divergence(
            log_qt, teacher_ids, teacher_logprobs, teacher_tail,
            divergence=divergence, tail_mode=tail_mode, temperature=temperature, jsd_beta=jsd_beta, codec=codec,
            target_ids=target_ids,
        )
        kd = temperature**2 * d.sum()
    return {"ce": ce, "kd": kd, "loss": alpha * ce + (1.0 - alpha) * kd}
