"""Losses against the dense full-vocabulary formulas, gradients against finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from kdpipe.pipeline.train.chunked import LossSpec, chunked_loss_parts
from kdpipe.pipeline.train.losses import (
    DIVERGENCES,
    TAIL_MODES,
    check_supported,
    distillation_loss_parts,
    kd_divergence,
)
from kdpipe.storage.errors import ConfigError


def dense_divergence(t_logits, s_logits, name, temperature, beta=0.5):
    """Written independently of losses.py: plain probabilities over the whole vocabulary."""
    p = torch.softmax(t_logits / temperature, -1)
    q = torch.softmax(s_logits / temperature, -1)
    if name == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if name == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    if name == "generalized_jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def full_vocab_store(t_logits, shuffle_seed=0):
    """A k = V 'store' entry: every id, sorted by teacher log-prob desc, tail = 0."""
    lp = torch.log_softmax(t_logits, -1)
    vals, ids = lp.sort(-1, descending=True)
    return ids, vals, torch.zeros(t_logits.shape[0], dtype=t_logits.dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("tail_mode", TAIL_MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equals_v_reproduces_dense(divergence, tail_mode, temperature):
    g = torch.Generator().manual_seed(0)
    n, v = 7, 50
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids, lps, tail = full_vocab_store(t)
    log_q = torch.log_softmax(s / temperature, -1)
    got = kd_divergence(log_q, ids, lps, tail, divergence=divergence, tail_mode=tail_mode,
                        temperature=temperature, jsd_beta=0.3)
    want = dense_divergence(t, s, divergence, temperature, beta=0.3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tail_mode", TAIL_MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equals_v_float32_and_chunked(divergence, tail_mode):
    """float32, through the chunked path (hidden @ W, padded model vocab sliced off) at k = V."""
    g = torch.Generator().manual_seed(1)
    n, h, v, v_model = 37, 16, 64, 80
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v_model, h, generator=g) * 0.5
    t = torch.randn(n, v, generator=g) * 2
    target = torch.randint(0, v, (n,), generator=g)
    ids, lps, tail = full_vocab_store(t)
    spec = LossSpec(alpha=0.25, temperature=1.5, divergence=divergence, tail_mode=tail_mode, chunk_size=10)
    got = chunked_loss_parts(hid, w, v, target, ids, lps, tail, spec)
    s = hid.double() @ w[:v].double().T
    ce = torch.nn.functional.cross_entropy(s, target, reduction="sum")
    kd = 1.5**2 * dense_divergence(t.double(), s, divergence, 1.5).sum()
    torch.testing.assert_close(got["ce"].double(), ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["kd"].double(), kd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["loss"].double(), 0.25 * ce + 0.75 * kd, rtol=1e-5, atol=1e-4)


def test_forward_kl_is_kl_not_cross_entropy():
    t = torch.randn(3, 20, dtype=torch.float64)
    ids, lps, tail = full_vocab_store(t)
    same = kd_divergence(torch.log_softmax(t, -1), ids, lps, tail, divergence="forward_kl")
    torch.testing.assert_close(same, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def topk_store(t_logits, k):
    lp = torch.log_softmax(t_logits, -1)
    vals, ids = lp.topk(k, -1)
    tail = 1 - vals.exp().sum(-1)
    return ids, vals, tail


def test_bucket_and_renormalize_formulas_at_small_k():
    """k < V: the (K+1)- and K-category formulas written out by hand."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 30, generator=g, dtype=torch.float64)
    s = torch.randn(4, 30, generator=g, dtype=torch.float64)
    ids, lps, tail = topk_store(t, 5)
    q = torch.softmax(s, -1)
    qk = q.gather(-1, ids)
    pk = lps.exp()
    # bucket, forward KL, T = 1
    P = torch.cat([pk, tail[:, None]], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    want = (P * (P / Q).log()).sum(-1)
    got = kd_divergence(torch.log_softmax(s, -1), ids, lps, tail, divergence="forward_kl", tail_mode="bucket")
    torch.testing.assert_close(got, want)
    # renormalize, reverse KL
    Pr, Qr = pk / pk.sum(-1, keepdim=True), qk / qk.sum(-1, keepdim=True)
    want = (Qr * (Qr / Pr).log()).sum(-1)
    got = kd_divergence(torch.log_softmax(s, -1), ids, lps, tail, divergence="reverse_kl", tail_mode="renormalize")
    torch.testing.assert_close(got, want)


def test_padding_entries_are_ignored():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, 30, generator=g, dtype=torch.float64)
    s = torch.randn(3, 30, generator=g, dtype=torch.float64)
    ids, lps, tail = topk_store(t, 4)
    pad_ids = torch.cat([ids, torch.zeros(3, 2, dtype=ids.dtype)], -1)
    pad_lps = torch.cat([lps, torch.full((3, 2), -math.inf, dtype=lps.dtype)], -1)
    lq = torch.log_softmax(s, -1).requires_grad_()
    for div in DIVERGENCES:
        for mode in TAIL_MODES:
            a = kd_divergence(lq, ids, lps, tail, divergence=div, tail_mode=mode)
            b = kd_divergence(lq, pad_ids, pad_lps, tail, divergence=div, tail_mode=mode)
            torch.testing.assert_close(a, b)
            (gb,) = torch.autograd.grad(b.sum(), lq)
            assert torch.isfinite(gb).all(), (div, mode)


@pytest.mark.parametrize("codec", ["topk", "sampled"])
def test_a_position_without_entries_is_finite(codec):
    """A stored position with 0 entries (every listed log-prob was -inf: p = 0, tail 1; or a sampled
    store that drew only the tail): bucket puts all teacher mass on the tail, renormalize has nothing
    to compare and gives 0; the other positions' values are unchanged and every gradient is finite."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn(3, 30, generator=g, dtype=torch.float64)
    s = torch.randn(3, 30, generator=g, dtype=torch.float64)
    ids, lps, tail = topk_store(t, 4)
    e_ids, e_lps, e_tail = ids.clone(), lps.clone(), tail.clone()
    e_lps[1] = -math.inf
    e_tail[1] = 1.0
    lq = torch.log_softmax(s, -1).requires_grad_()
    divs = ["forward_kl"] if codec == "sampled" else DIVERGENCES
    for div in divs:
        for mode in TAIL_MODES:
            a = kd_divergence(lq, ids, lps, tail, divergence=div, tail_mode=mode, codec=codec)
            b = kd_divergence(lq, e_ids, e_lps, e_tail, divergence=div, tail_mode=mode, codec=codec)
            assert torch.isfinite(b).all(), (div, mode, b)
            torch.testing.assert_close(b[[0, 2]], a[[0, 2]])
            if mode == "renormalize":
                assert b[1] == 0
            (gb,) = torch.autograd.grad(b.sum(), lq)
            assert torch.isfinite(gb).all(), (div, mode)
            # a whole batch without entries (K = 0)
            z = kd_divergence(lq, ids[:, :0], lps[:, :0], torch.ones(3, dtype=lps.dtype), divergence=div,
                              tail_mode=mode, codec=codec)
            assert torch.isfinite(z).all() and (mode == "bucket" or (z == 0).all()), (div, mode, z)


@pytest.mark.parametrize("tail_mode", TAIL_MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradients_match_finite_differences(divergence, tail_mode):
    g = torch.Generator().manual_seed(4)
    n, h, v = 3, 4, 9
    hid = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    ids, lps, tail = topk_store(t, 4)
    spec = LossSpec(alpha=0.3, temperature=1.7, divergence=divergence, tail_mode=tail_mode, jsd_beta=0.4, chunk_size=2)

    def f(hid, w):
        return chunked_loss_parts(hid, w, v, target, ids, lps, tail, spec)["loss"]

    # TV is not differentiable where P = Q; random logits keep us away from that set.
    assert torch.autograd.gradcheck(f, (hid, w), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_alpha_one_equals_plain_cross_entropy():
    g = torch.Generator().manual_seed(5)
    hid = torch.randn(20, 8, generator=g)
    w = torch.randn(40, 8, generator=g)
    target = torch.randint(0, 40, (20,), generator=g)
    ids, lps, tail = topk_store(torch.randn(20, 40, generator=g), 4)
    got = chunked_loss_parts(hid, w, 40, target, ids, lps, tail, LossSpec(alpha=1.0, chunk_size=6))
    want = torch.nn.functional.cross_entropy(hid @ w.T, target, reduction="sum")
    torch.testing.assert_close(got["loss"], want)
    dense = distillation_loss_parts(hid @ w.T, target, ids, lps, tail, alpha=1.0)
    torch.testing.assert_close(dense["loss"], want)


@pytest.mark.parametrize("chunk_size", [16, 64])  # several checkpointed chunks; one chunk, no checkpoint
def test_chunked_equals_dense_and_backward(chunk_size):
    g = torch.Generator().manual_seed(6)
    n, h, v = 50, 12, 70
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=g)
    ids, lps, tail = topk_store(torch.randn(n, v, generator=g), 8)
    for div in DIVERGENCES:
        spec = LossSpec(alpha=0.4, temperature=2.0, divergence=div, chunk_size=chunk_size)
        a = chunked_loss_parts(hid, w, v, target, ids, lps, tail, spec)["loss"]
        ga = torch.autograd.grad(a, (hid, w))
        b = distillation_loss_parts(hid @ w.T, target, ids, lps, tail, alpha=0.4, temperature=2.0, divergence=div)["loss"]
        gb = torch.autograd.grad(b, (hid, w))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_sampled_forward_kl_is_unbiased_in_expectation():
    """Counts from many draws of a tail-free teacher: the estimator's gradient -> the exact KL gradient."""
    g = torch.Generator().manual_seed(7)
    v, draws, reps = 12, 50, 400
    t = torch.randn(1, v, generator=g, dtype=torch.float64)
    p = torch.softmax(t, -1)[0]
    s = torch.randn(1, v, generator=g, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(dense_divergence(t, s, "forward_kl", 1.0).sum(), s)[0]
    total = torch.zeros_like(s)
    for _ in range(reps):
        counts = torch.bincount(torch.multinomial(p, draws, replacement=True, generator=g), minlength=v).double()
        ids = counts.nonzero()[:, 0][None]
        lp = (counts[ids] / draws).log()
        d = kd_divergence(torch.log_softmax(s, -1), ids, lp, torch.zeros(1, dtype=torch.float64),
                          divergence="forward_kl", tail_mode="bucket", codec="sampled")
        total += torch.autograd.grad(d.sum(), s)[0]
    torch.testing.assert_close(total / reps, exact, atol=0.01, rtol=0)


def test_sampled_store_refuses_what_it_cannot_estimate():
    for div in ("reverse_kl", "generalized_jsd", "total_variation"):
        with pytest.raises(ConfigError, match="cannot be computed from a 'sampled' store"):
            check_supported("sampled", div, 1.0)
    with pytest.raises(ConfigError, match="temperature"):
        check_supported("sampled", "forward_kl", 2.0)
    check_supported("sampled", "forward_kl", 1.0)
    check_supported("topk", "reverse_kl", 3.0)
