"""loss_backward = "in_forward" (fused.py): the same values and gradients as the default recompute path."""

from __future__ import annotations

import math

import pytest
import torch

from kdpipe.pipeline.train.chunked import LossSpec, chunked_loss_parts

from train_stores import topk_store  # noqa: F401 (fixture)


def _inputs(N=37, H=12, V=61, K=6, pad=3, seed=0, codec="topk", bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V + pad, H, generator=g, dtype=torch.float64) * 0.4  # rows beyond V: padded vocabulary
    b = torch.randn(V + pad, generator=g, dtype=torch.float64) * 0.1 if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    lp, ids = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1).topk(K, -1)
    if codec == "sampled":  # counts of 8 draws over the kept ids + the tail bucket
        counts = torch.multinomial(torch.cat([lp.exp(), (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(0)], -1), 8,
                                   replacement=True, generator=g)
        c = torch.zeros(N, K + 1, dtype=torch.float64).scatter_add_(1, counts, torch.ones_like(counts, dtype=torch.float64))
        lp = torch.where(c[:, :K] > 0, (c[:, :K] / 8).log(), torch.full_like(lp, -math.inf))
        tail = c[:, K] / 8
    else:
        lp[:3, -2:] = -math.inf  # padded entries (fewer than K kept ids)
        ids[:3, -2:] = 0
        tail = (1 - lp.exp().sum(-1)).clamp_min(0)
    return h, w, b, V, target, ids, lp, tail


def _run(spec, inputs, teacher=True):
    h, w, b, V, target, ids, lp, tail = inputs
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    t = (ids, lp, tail) if teacher else (None, None, None)
    parts = chunked_loss_parts(h, w, V, target, *t, spec, bias=b)
    (parts["loss"] * 0.37).backward()
    return parts, h.grad, w.grad, None if b is None else b.grad


CASES = [
    dict(alpha=0.5, temperature=1.0),
    dict(alpha=0.3, temperature=2.0),
    dict(alpha=0.0, temperature=1.5, tail_mode="renormalize"),
    dict(alpha=0.5, divergence="reverse_kl"),
    dict(alpha=0.5, temperature=2.0, divergence="generalized_jsd", jsd_beta=0.3),
    dict(alpha=0.5, divergence="total_variation"),
    dict(alpha=1.0),
    dict(alpha=0.5, temperature=2.0, logit_softcap=3.0, logit_scale=0.7),
    dict(alpha=0.5, temperature=2.0, tail_mode="renormalize", divergence="reverse_kl"),
    dict(alpha=0.4, logit_softcap=2.0),
    dict(alpha=0.5, divergence="reverse_kl_sampled_token"),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("chunk", [8, 64])
def test_in_forward_equals_recompute(kw, chunk):
    inputs = _inputs(bias="logit_softcap" in kw)
    inputs[5][5:9, 1] = inputs[4][5:9]  # the target among the kept ids: two one-hot terms at one logit
    want = _run(LossSpec(chunk_size=chunk, **kw), inputs)
    got = _run(LossSpec(chunk_size=chunk, backward="in_forward", **kw), inputs)
    for k in ("ce", "kd", "loss"):
        torch.testing.assert_close(got[0][k], want[0][k], rtol=1e-10, atol=1e-10)
    for g, w in zip(got[1:], want[1:]):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert torch.count_nonzero(got[2][61:]) == 0  # padded vocabulary rows: no gradient


@pytest.mark.parametrize("backward", ["recompute", "in_forward"])
def test_unpadded_vocabulary_passes_the_weight_itself(backward):
    """V = the lm_head's rows: no slice (whose backward would allocate a second [V, H] gradient), same values."""
    h, w, b, V, target, ids, lp, tail = _inputs(pad=0, bias=True)
    ref = _run(LossSpec(chunk_size=8, alpha=0.5, temperature=2.0), _inputs(pad=0, bias=True))
    hh, ww, bb = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    parts = chunked_loss_parts(hh, ww, V, target, ids, lp, tail, LossSpec(chunk_size=8, alpha=0.5, temperature=2.0,
                                                                         backward=backward), bias=bb)
    (parts["loss"] * 0.37).backward()
    assert type(ww.grad_fn).__name__ != "SliceBackward0"
    torch.testing.assert_close(parts["loss"].detach(), ref[0]["loss"].detach(), rtol=1e-10, atol=1e-10)
    for g, want in zip((hh.grad, ww.grad, bb.grad), ref[1:]):
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


def test_in_forward_sampled_codec_and_ce_only():
    inputs = _inputs(codec="sampled")
    for teacher in (True, False):
        want = _run(LossSpec(chunk_size=10, codec="sampled"), inputs, teacher)
        got = _run(LossSpec(chunk_size=10, codec="sampled", backward="in_forward"), inputs, teacher)
        torch.testing.assert_close(got[0]["loss"], want[0]["loss"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=1e-12)


def test_in_forward_under_bf16_autocast_matches_recompute():
    """bf16 matmuls, float32 master weights, float32 loss: as train-student on CUDA (here CPU autocast)."""
    h, w, _, V, target, ids, lp, tail = _inputs(N=40, H=32, V=200, K=8)
    h, w, lp, tail = h.float(), w.float(), lp.float(), tail.float()
    out = []
    for mode in ("recompute", "in_forward"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parts = chunked_loss_parts(hh, ww, V, target, ids, lp, tail, LossSpec(chunk_size=16, backward=mode))
        parts["loss"].backward()
        assert parts["loss"].dtype == torch.float32 and ww.grad.dtype == torch.float32
        out.append((parts["loss"].detach(), hh.grad, ww.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out[1][2], out[0][2], rtol=2e-2, atol=2e-3)


def test_in_forward_refuses_backward_through_ce():
    h, w, _, V, target, ids, lp, tail = _inputs()
    h = h.requires_grad_()
    parts = chunked_loss_parts(h, w, V, target, ids, lp, tail, LossSpec(chunk_size=8, backward="in_forward"))
    assert type(parts["loss"].grad_fn).__name__ == "_InForwardLossBackward"
    assert not parts["ce"].requires_grad and parts["loss"].requires_grad
    with torch.no_grad():  # validation: the default path, no stored gradients
        p2 = chunked_loss_parts(h, w, V, target, ids, lp, tail, LossSpec(chunk_size=8, backward="in_forward"))
    torch.testing.assert_close(p2["loss"], parts["loss"].detach())


def test_train_student_in_forward_reproduces_the_recompute_run(tiny_student, topk_store, tmp_path):
    """train-student end to end: the same loss curve and final weights with either backward mode."""
    from safetensors.torch import load_file

    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train

    runs = {}
    for mode in ("recompute", "in_forward"):
        cfg = TrainConfig(student=str(tiny_student), stores=(str(topk_store),), out=str(tmp_path / mode), steps=3,
                          tokens_per_batch=160, grad_accum=2, lr=3e-3, save_every=0, shuffle_buffer=4, alpha=0.5,
                          temperature=2.0, divergence="forward_kl", seed=3, loss_chunk_size=16, loss_backward=mode)
        runs[mode] = train(cfg)
    import json

    def curve(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert curve(runs["in_forward"].run) == pytest.approx(curve(runs["recompute"].run), rel=1e-5)
    a = load_file(runs["in_forward"].final / "model.safetensors")
    b = load_file(runs["recompute"].final / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_in_forward_keeps_one_chunk_buffer(tmp_path):
    """Issue 22 §3: the logits buffer of a chunk is overwritten by its gradient (no float32 copy, no p, no
    separate dz). Peak bytes beyond the inputs, from the dispatcher's view of every allocation
    (benchmarks/bench_loss_memory.py): the gradients, one [chunk, V] buffer, and eager logsumexp's two
    temporaries; it was ~7 [chunk, V] buffers before."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_loss_memory.py"
    spec = importlib.util.spec_from_file_location("bench_loss_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    N, H, V, K, chunk = 512, 64, 4000, 8, 256
    grads = (N * H + V * H) * 4
    unit = chunk * V * 4  # one float32 [chunk, V] buffer
    for temperature in (1.0, 2.0):
        extra = bench.peak_extra("in_forward", chunk, N, H, V, K, torch.float32, temperature=temperature)
        assert (extra - grads) / unit <= (2.6 if temperature == 1.0 else 3.6), (temperature, (extra - grads) / unit)
    recompute = bench.peak_extra("recompute", chunk, N, H, V, K, torch.float32)
    assert bench.peak_extra("in_forward", chunk, N, H, V, K, torch.float32) < 0.7 * recompute
