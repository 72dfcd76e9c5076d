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
float32 at 128k × 4096) and scaled by the incoming gradient of `loss` in backward. Only `loss` is differentiable: `ce` and `kd` are returned
for logging (backward through them raises). Exactly the values and gradients of the default path
(tests/train/test_fused.py compares them in float64, every divergence and tail mode).
"""

from __future__ import annotations

from typing import Callable

import torch

from kdpipe.pipeline.train.losses import kd_divergence_from_kept


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(z after the logit transforms in float32 [c, V], lse(z) [c, 1])."""
    z = torch.nn.functional.linear(h, weight, bias)  # [c, V]
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    if spec.logit_scale != 1.0:
        z = z * spec.logit_scale
    if spec.logit_softcap:
        z = spec.logit_softcap * torch.tanh(z / spec.logit_softcap)
    return z, torch.logsumexp(z, dim=-1, keepdim=True)


def _chunk_forward(h, weight, bias, target_ids, teacher_ids, spec):
    """(z [c, V], lse [c, 1], CE per row [c], log q_T at the kept ids [c, K] or None)."""
    z, lse = _logits(h, weight, bias, spec)
    ce_rows = lse.squeeze(-1) - z.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # [c]
    if teacher_ids is None:
        return z, lse, ce_rows, None
    if spec.temperature == 1.0:
        kept = z.gather(-1, teacher_ids) - lse  # [c, K]
    else:
        zt = z / spec.temperature
        kept = zt.gather(-1, teacher_ids) - torch.logsumexp(zt, dim=-1, keepdim=True)  # [c, K]
    return z, lse, ce_rows, kept


def _chunk_grad_z(z, lse, target_ids, teacher_ids, g, spec, out_dtype):
    """dloss/d(raw logits) [c, V] in `out_dtype` (see module doc); g = dD/dkept [c, K] or None."""
    p = torch.exp(z - lse)  # [c, V]
    grad = spec.alpha * p
    grad.scatter_add_(-1, target_ids.unsqueeze(-1), torch.full_like(z[:, :1], -spec.alpha))
    if g is not None:
        w = (1.0 - spec.alpha) * spec.temperature
        p_t = p if spec.temperature == 1.0 else torch.softmax(z / spec.temperature, dim=-1)
        grad = grad - (w * g.sum(-1, keepdim=True)) * p_t
        grad.scatter_add_(-1, teacher_ids, w * g)
    if spec.logit_softcap:
        grad = grad * (1.0 - (z / spec.logit_softcap) ** 2)
    if spec.logit_scale != 1.0:
        grad = grad * spec.logit_scale
    return grad.to(out_dtype)


class _InForwardLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, teacher_ids, teacher_logprobs, teacher_tail, spec, fns):
        chunk_fwd, chunk_grad = fns
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
                z, lse, ce_rows, kept = chunk_fwd(h_c, w_mm, b_mm, t_c, ids_c, spec)
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
                dz = chunk_grad(z, lse, t_c, ids_c, g, spec, mm)  # [c, V]
                del z, lse
                if need_h:
                    grad_h[sl] = dz @ w_mm  # [c, H]
                if need_w and grad_w.dtype == mm and grad_w.is_contiguous():
                    grad_w.addmm_(dz.t(), h_c)  # [V, H] += [V, c] @ [c, H]
                elif need_w:
                    grad_w += dz.t() @ h_c  # float32 master weights under bf16 autocast
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
                                        spec, (compiled(_chunk_forward), compiled(_chunk_grad_z)))
    return {"ce": ce, "kd": kd, "loss": loss}
