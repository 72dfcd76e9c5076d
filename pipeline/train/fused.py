"""The chunked loss with its gradients computed in the forward pass (`loss_backward = "in_forward"`).

The default path (chunked.py) checkpoints each chunk and recomputes its logits in backward: four
[chunk, H] × [H, V] matmuls per chunk (forward, recompute, and the two of backward). Here each
chunk's gradient with respect to its logits z is known in closed form as soon as z is, so the
forward pass computes it and immediately multiplies it back through the lm_head: three matmuls,
no recompute, and no [chunk, V] tensor outlives its chunk. This is the "fused linear" scheme of
Liger-Kernel's losses, for kdpipe's sparse teacher targets.

Per chunk (T = temperature, α = alpha, p = softmax(z), p_T = softmax(z / T)):
    CE      = Σ_rows  lse(z) − z[target]                 dCE/dz   = p − onehot(target)
    kept_k  = z[id_k] / T − lse(z / T)                   dkept_k/dz = (onehot(id_k) − p_T) / T
    D       = kd_divergence_from_kept(kept, …)   (autograd on the small [chunk, K] values: g = dD/dkept)
    loss    = α·CE + (1 − α)·T²·D
    dloss/dz = α·(p − onehot(target)) + (1 − α)·T·(scatter_add(ids, g) − Σ_k g_k · p_T)
then through the logit transforms (softcap: × (1 − (z/cap)²); logit_scale: × scale), and
    dloss/dh_chunk = dz @ W ,  dloss/dW += dz^T @ h_chunk ,  dloss/db += Σ_rows dz.
The gradients are stored in the parameters' dtypes (dW: a [V, H] buffer, 1 GiB in bf16 / 2 GiB in
float32 at 128k × 4096) and scaled by the incoming gradient of `loss` in backward; autograd hands
that buffer on as W.grad without a copy. Only `loss` is differentiable: `ce` and `kd` are returned
for logging (backward through them raises). Exactly the values and gradients of the default path
(tests/train/test_fused.py compares them in float64, every divergence, tail mode and codec).

Memory (issue 22 §3). A chunk holds one [chunk, V] buffer in the matmul dtype: the lm_head output,
read by reductions and gathers (no float32 copy of the logits is written), then overwritten in place
by dloss/dz (pointwise, float32 inside the kernel), then the 1 + K one-hot positions per row are
overwritten with their exact values, and dz is multiplied back into dh and dW (addmm_ into the
gradient buffer). Compiled, each step writes in place (checked in inductor's generated code on CPU:
no [chunk, V] allocation in the two gradient graphs). Before, the compiled path held the float32
logits, p, the scattered gradient and its bf16 cast: ~4 float32 [chunk, V] buffers (7.9 GiB beyond
the inputs at 8k tokens × 128k × 4096, chunk 4096, on an H200); now ~1 GiB of buffer + 1 GiB of dW
in bf16 there (expected, not yet measured on a GPU; benchmarks/bench_loss_memory.py shows it on CPU).
"""

from __future__ import annotations

from typing import Callable

import torch

from kdpipe.pipeline.train.losses import kd_divergence_from_kept


def _transformed(buf: torch.Tensor, spec) -> torch.Tensor:
    """The logits z after the float32 upcast and the logit transforms, [c, V]: `buf` itself when none applies
    (float32/float64 logits, no scale, no softcap), else a new tensor (fused into its readers when compiled)."""
    z = buf if buf.dtype in (torch.float32, torch.float64) else buf.float()
    if spec.logit_scale != 1.0:
        z = z * spec.logit_scale
    if spec.logit_softcap:
        z = spec.logit_softcap * torch.tanh(z / spec.logit_softcap)
    return z


def _chunk_stats(buf, target_ids, teacher_ids, spec):
    """(lse(z) [c, 1], lse(z / T) [c, 1] or None, CE per row [c], log q_T at the kept ids [c, K] or None).

    Reads the raw logits buf [c, V] and writes no [c, V] tensor (compiled: reductions and gathers only).
    """
    z = _transformed(buf, spec)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [c, 1]
    ce_rows = lse.squeeze(-1) - z.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # [c]
    if teacher_ids is None:
        return lse, None, ce_rows, None
    if spec.temperature == 1.0:
        return lse, None, ce_rows, z.gather(-1, teacher_ids) - lse  # [c, K]
    zt = z / spec.temperature
    lse_t = torch.logsumexp(zt, dim=-1, keepdim=True)  # [c, 1]
    return lse, lse_t, ce_rows, zt.gather(-1, teacher_ids) - lse_t  # [c, K]


def _dense_grad_(x, lse, lse_t, a, b, spec, extra=None):
    """In place on float raw logits x [c, P] (P = V, or a few gathered ids): x <- dloss/dx without the scatters,

        x <- (a·p + b·p_T + extra) · softcap'(x) · scale,   p = exp(z − lse), p_T = exp(z/T − lse_t),

    a, b [c, 1] (T = 1: b folded into a). In place so that eager keeps one [c, V] buffer (one more with
    T != 1 or a softcap); compiled, the chain is one pointwise kernel that writes over its input.
    """
    if spec.logit_scale != 1.0:
        x.mul_(spec.logit_scale)
    slope = None
    if spec.logit_softcap:
        x.div_(spec.logit_softcap).tanh_()
        slope = 1.0 - x * x  # d(cap·tanh(u/cap))/du
        x.mul_(spec.logit_softcap)
    p_t = None
    if b is not None and lse_t is not None:
        p_t = (x / spec.temperature).sub_(lse_t).exp_().mul_(b)  # b · p_T
    x.sub_(lse).exp_().mul_(a)  # a · p
    if p_t is not None:
        x.add_(p_t)
    if extra is not None:
        x.add_(extra)
    if slope is not None:
        x.mul_(slope)
    if spec.logit_scale != 1.0:
        x.mul_(spec.logit_scale)
    return x


def _grad_at_one_hots(buf, lse, lse_t, target_ids, teacher_ids, g, spec):
    """(a [c, 1], b [c, 1] or None, pos [c, P], exact [c, P]): the gradient's dense coefficients, and its exact
    float32 values at the P = 1 + K positions with a one-hot term, from the raw logits there (see _chunk_grad_).

    dloss/dz = α·p − α·onehot(target) + w·(scatter(ids, g) − Σ_k g_k·p_T),  w = (1 − α)·T;
    an id given twice in a row (the target among the kept ids, padding clamped to one id) gets every term at it.
    """
    alpha = spec.alpha
    pos = target_ids.unsqueeze(-1) if g is None else torch.cat([target_ids.unsqueeze(-1), teacher_ids], -1)  # [c, P]
    acc = lse.dtype
    corr = torch.full_like(lse, -alpha)  # [c, 1]
    a, b = torch.full_like(lse, alpha), None
    if g is not None:
        w = (1.0 - alpha) * spec.temperature
        corr = torch.cat([corr, (w * g).to(acc)], -1)  # [c, 1 + K]
        s = (w * g.sum(-1, keepdim=True)).to(acc)  # [c, 1]
        if lse_t is None:  # T = 1: p_T = p
            a = a - s
        else:
            b = -s
        same = (pos.unsqueeze(-1) == pos.unsqueeze(-2)).to(acc)  # [c, P, P] equal ids in a row
        corr = (same @ corr.unsqueeze(-1)).squeeze(-1)  # [c, P]
    exact = _dense_grad_(buf.gather(-1, pos).to(acc), lse, lse_t, a, b, spec, extra=corr)  # [c, P]
    return a, b, pos, exact.to(buf.dtype)


def _dense_grad_over_(buf, lse, lse_t, a, b, spec):
    """buf [c, V] <- the dense part of the gradient (_dense_grad_), in buf's dtype, in place.
    Compiled: one pointwise kernel reading and writing buf (float32 inside the kernel only)."""
    x = buf if buf.dtype == lse.dtype else buf.to(lse.dtype)
    x = _dense_grad_(x, lse, lse_t, a, b, spec)
    if x is not buf:
        buf.copy_(x)
    return buf


def _chunk_grad_(buf, lse, lse_t, target_ids, teacher_ids, g, spec, fns=(None, None)):
    """Overwrite the raw logits buf [c, V] with dloss/d(raw logits) in buf's dtype (see module doc); g = dD/dkept.

    The dense part is written over buf in place; then the P positions with a one-hot term are
    overwritten with their exact values, computed in float32 from the logits gathered before the
    overwrite: one rounding to buf's dtype per element, as a float32 gradient cast once. Three
    steps, so that compiled each writes in place (a scatter fused into the pointwise kernel would
    make inductor write a second [c, V] buffer and copy it back). `fns`: compiled twins of the first two.
    """
    at_one_hots, dense_over = fns[0] or _grad_at_one_hots, fns[1] or _dense_grad_over_
    a, b, pos, exact = at_one_hots(buf, lse, lse_t, target_ids, teacher_ids, g, spec)  # before buf is overwritten
    dense_over(buf, lse, lse_t, a, b, spec)
    return buf.scatter_(-1, pos, exact)


class _InForwardLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, teacher_ids, teacher_logprobs, teacher_tail, spec, fns):
        chunk_stats, grad_fns = fns
        with_kd = teacher_ids is not None
        # The matmul dtype: the autocast dtype when autocast is on (as the default path's linear), else the weight's.
        dev = hidden.device.type
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        h_mm, w_mm = hidden.to(mm), weight.to(mm)
        b_mm = bias.to(mm) if bias is not None else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # Gradients in the parameters' own dtypes, as autograd would accumulate them (bf16 weights: in place, addmm).
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # [N, H]
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # [V, H]
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen lm_head (LoRA) needs no dW
        need_b = bias is not None and ctx.needs_input_grad[2]
        ce_sum = hidden.new_zeros((), dtype=acc)
        kd_sum = hidden.new_zeros((), dtype=acc)
        n = hidden.shape[0]
        with torch.autocast(dev, enabled=False):
            for start in range(0, n, spec.chunk_size):
                sl = slice(start, min(start + spec.chunk_size, n))
                h_c, t_c = h_mm[sl], target_ids[sl]
                ids_c = teacher_ids[sl] if with_kd else None
                buf = torch.nn.functional.linear(h_c, w_mm, b_mm)  # [c, V] raw logits, later their gradient
                lse, lse_t, ce_rows, kept = chunk_stats(buf, t_c, ids_c, spec)
                ce_sum = ce_sum + ce_rows.sum()
                g = None
                if with_kd:
                    with torch.enable_grad():  # the divergence on [c, K]: autograd gives dD/dkept
                        k = kept.detach().requires_grad_()
                        d = kd_divergence_from_kept(
                            k, ids_c, teacher_logprobs[sl], teacher_tail[sl], divergence=spec.divergence,
                            tail_mode=spec.tail_mode, temperature=spec.temperature, jsd_beta=spec.jsd_beta,
                            codec=spec.codec, target_ids=t_c,
                        ).sum()
                        (g,) = torch.autograd.grad(d, k)  # [c, K]
                    kd_sum = kd_sum + spec.temperature**2 * d.detach()
                dz = _chunk_grad_(buf, lse, lse_t, t_c, ids_c, g, spec, grad_fns)  # [c, V] dloss/dlogits, in place of the logits
                del buf
                if need_h:
                    if grad_h.dtype == mm:
                        torch.mm(dz, w_mm, out=grad_h[sl])  # [c, H], no temporary
                    else:
                        grad_h[sl] = dz @ w_mm  # float32 hidden states under bf16 autocast
                if need_w and grad_w.dtype == mm and grad_w.is_contiguous():
                    grad_w.addmm_(dz.t(), h_c)  # [V, H] += [V, c] @ [c, H], into the buffer autograd hands on as .grad
                elif need_w:
                    grad_w += dz.t() @ h_c  # float32 master weights under bf16 autocast: a [V, H] bf16 product per chunk
                if need_b:
                    grad_b += dz.sum(0).to(grad_b.dtype)
        # Kept on ctx (not save_for_backward): backward scales them in place and drops them; one backward only.
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.set_materialize_grads(False)
        loss = spec.alpha * ce_sum + (1.0 - spec.alpha) * kd_sum
        ce_out, kd_out = ce_sum.clone(), kd_sum.clone()
        ctx.mark_non_differentiable(ce_out, kd_out)
        return ce_out, kd_out, loss

    @staticmethod
    def backward(ctx, g_ce, g_kd, g_loss):
        if g_ce is not None or g_kd is not None:
            raise RuntimeError("loss_backward = 'in_forward' differentiates only parts['loss'] (ce and kd are for "
                               "logging); backpropagate the loss, or use loss_backward = 'recompute'")
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("loss_backward = 'in_forward': backward ran twice through the same loss")
        if g_loss is None:
            return (None,) * 9
        grad_h, grad_w, grad_b = (None if t is None else t.mul_(g_loss.to(t.dtype)) for t in grads)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def in_forward_loss_parts(hidden, weight, target_ids, teacher_ids, teacher_logprobs, teacher_tail, spec, bias,
                          compiled: Callable[[Callable], Callable]) -> dict[str, torch.Tensor]:
    """{"ce", "kd", "loss"} as chunked_loss_parts, gradients computed in forward (see module doc).

    weight/bias are already sliced to the vocabulary; teacher_ids already clamped (None = CE only);
    `compiled(fn)` returns fn or its torch.compile'd twin.
    """
    ce, kd, loss = _InForwardLoss.apply(hidden, weight, bias, target_ids, teacher_ids, teacher_logprobs, teacher_tail,
                                        spec, (compiled(_chunk_stats), (compiled(_grad_at_one_hots), compiled(_dense_grad_over_))))
    return {"ce": ce, "kd": kd, "loss": loss}
