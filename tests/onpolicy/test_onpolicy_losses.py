"""On-policy losses against the dense formulas: the sampled-token estimator and reverse KL.

The sampled-token estimator k(x) = log q(x) − log p(x) is checked in expectation by
enumerating every token x with weight q(x): Σ_x q(x)·k(x) = KL(q‖p) (value) and
Σ_x q(x)·∇k(x) = ∇KL(q‖p) (gradient, through the score-function form).
"""

from __future__ import annotations

import pytest
import torch

from kdpipe.pipeline.divergence import default_divergence
from kdpipe.pipeline.train.chunked import LossSpec, chunked_loss_parts
from kdpipe.pipeline.train.losses import (
    check_supported, distillation_loss_parts, kd_divergence, sampled_token_reverse_kl,
)
from kdpipe.storage.errors import ConfigError

N, V = 5, 23


def dense_reverse_kl(z, t):
    lq, lp = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    return (lq.exp() * (lq - lp)).sum(-1)  # [N]


def full_vocab_store(t):
    """A k = V teacher entry set (sorted, tail 0), as an on-policy store at k = V holds it."""
    lp = torch.log_softmax(t, -1)
    vals, ids = lp.sort(-1, descending=True)
    return ids, vals, torch.zeros(t.shape[0], dtype=t.dtype)


def test_sampled_token_estimator_is_unbiased_for_reverse_kl_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    t = torch.randn(N, V, dtype=torch.float64) * 2
    ids, lps, tail = full_vocab_store(t)
    log_q = torch.log_softmax(z, -1)  # [N, V]
    # every token x at every position, weighted by q(x): the expectation over x ~ q, exactly
    rows = torch.arange(N).repeat_interleave(V)
    xs = torch.arange(V).repeat(N)
    d = kd_divergence(log_q[rows], ids[rows], lps[rows], tail[rows], divergence="reverse_kl_sampled_token",
                      target_ids=xs)  # [N*V]
    w = log_q.exp().detach()[rows, xs]
    expected_value = (w * d).view(N, V).sum(-1)
    dense = dense_reverse_kl(z, t)
    torch.testing.assert_close(expected_value, dense.detach(), rtol=1e-10, atol=1e-12)
    g_est, = torch.autograd.grad((w * d).sum(), z)
    g_dense, = torch.autograd.grad(dense.sum(), z)
    torch.testing.assert_close(g_est, g_dense, rtol=1e-9, atol=1e-12)


def test_naive_differentiation_of_the_estimator_would_have_no_signal():
    """Why the score-function form: ∇(log q(x) − log p(x)) averages to E_q[∇ log q] = 0."""
    torch.manual_seed(1)
    z = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(z, -1)
    naive = (log_q.exp().detach() * log_q).sum()
    g, = torch.autograd.grad(naive, z)
    assert g.abs().max() < 1e-12
    lq = log_q[:, 0]
    out = sampled_token_reverse_kl(lq, torch.zeros_like(lq))
    torch.testing.assert_close(out, lq.detach())  # the value is the estimate itself


def test_estimator_chunked_equals_dense_and_skips_positions_without_the_target():
    torch.manual_seed(2)
    H, K = 8, 6
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V + 3, H, dtype=torch.float64, requires_grad=True)  # padded model rows
    t = torch.randn(N, V, dtype=torch.float64)
    ids, lps, _ = full_vocab_store(t)
    ids, lps = ids[:, :K].clone(), lps[:, :K].clone()
    target = ids[:, 2].clone()
    target[-1] = ids[-1, -1]  # the kept entry with the smallest log-prob
    ids[0, 3], lps[0, 3] = -1, -float("inf")  # padding
    target[1] = int(torch.tensor([x for x in range(V) if x not in ids[1].tolist()][0]))  # not an entry -> 0
    tail = (1 - lps.exp().sum(-1)).clamp_min(0)
    spec = LossSpec(alpha=0.0, divergence="reverse_kl_sampled_token", chunk_size=2)
    c = chunked_loss_parts(hidden, weight, V, target, ids, lps, tail, spec)
    d = distillation_loss_parts(hidden @ weight[:V].T, target, ids, lps, tail, alpha=0.0, divergence="reverse_kl_sampled_token")
    torch.testing.assert_close(c["kd"], d["kd"])
    gc = torch.autograd.grad(c["loss"], (hidden, weight))
    gd = torch.autograd.grad(d["loss"], (hidden, weight))
    for a, b in zip(gc, gd):
        torch.testing.assert_close(a, b)
    # by hand: Σ over positions whose target is an entry of (log q(x) − log p(x))
    log_q = torch.log_softmax(hidden @ weight[:V].T, -1).detach()
    want = sum(float(log_q[n, target[n]] - lps[n][ids[n] == target[n]][0]) for n in range(N) if n != 1)
    assert abs(float(c["kd"].detach()) - want) < 1e-9


def test_reverse_kl_on_an_on_policy_entry_set_at_k_equals_v_is_the_dense_reverse_kl():
    torch.manual_seed(3)
    z = torch.randn(N, V, dtype=torch.float64)
    t = torch.randn(N, V, dtype=torch.float64)
    ids, lps, tail = full_vocab_store(t)
    target = torch.randint(0, V, (N,))
    got = distillation_loss_parts(z, target, ids, lps, tail, alpha=0.0, divergence="reverse_kl")["kd"]
    torch.testing.assert_close(got, dense_reverse_kl(z, t).sum(), rtol=1e-9, atol=1e-9)


def test_default_divergence_and_refusals():
    assert default_divergence("topk", on_policy=True) == "reverse_kl"
    assert default_divergence("topk", on_policy=False) == "forward_kl"
    assert default_divergence("sampled", on_policy=True) == "forward_kl"
    with pytest.raises(ConfigError, match="sampled"):
        check_supported("sampled", "reverse_kl_sampled_token", 1.0)
    with pytest.raises(ConfigError, match="temperature"):
        check_supported("topk", "reverse_kl_sampled_token", 2.0)
    check_supported("topk", "reverse_kl_sampled_token", 1.0)
