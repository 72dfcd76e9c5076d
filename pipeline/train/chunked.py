"""The memory-lean loss: logits, log-softmax, gathers, CE and KD chunk by chunk over target tokens.

Plain fine-tuning materializes logits [B, T, V] (plus their float32 copy and the log-softmax),
which dominates memory for large vocabularies. Here the student's final hidden states are first
gathered at the target positions ([N, H], N target tokens), then each chunk of `chunk_size`
tokens runs  h @ W[:V].T -> log_softmax -> gather(target, teacher ids) -> CE, D  under
`torch.utils.checkpoint`, so only the chunk's inputs are kept for backward and the [chunk, V]
tensors are recomputed there: at most one chunk's [chunk, V] tensors are alive at any time,
in forward or backward.

With T = 1 the CE and the KD term share one logsumexp and one gather of [chunk, 1 + K] ids
(log q at an id = z[id] − logsumexp(z): no [chunk, V] log-softmax is written), so the KD term adds
only [N, K]-sized work to what CE alone already does; that work runs once per micro-batch on the
gathered values, outside the checkpointed chunks.

On CUDA the per-chunk function is `torch.compile`d (LossSpec.compile, TrainConfig.compile_loss:
"auto" = on where Triton is available, off on CPU): the float32 upcast, logit transforms,
logsumexp and gathers fuse into a few kernels around the lm_head matmul. A chunk function that
fails to compile falls back to eager with one warning. Nothing in the chunk loop reads a tensor
value on the host (no .item(), no branch on tensor values): the loop bounds come from shapes,
and the chunk boundaries are fixed multiples of `chunk_size` target tokens of the micro-batch,
whatever the world size; each token's terms are computed row by row, so the sums do not depend
on where the boundaries fall (up to float summation order).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from kdpipe.pipeline.train.losses import kd_divergence_from_kept


@dataclass(frozen=True)
class LossSpec:
    """What the loss computes; mirrors the TrainConfig fields of the same names."""

    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    tail_mode: str = "bucket"
    jsd_beta: float = 0.5
    codec: str = "topk"  # the store's codec: 'topk' or 'sampled'
    chunk_size: int = 1024  # target tokens per chunk of logits
    compile: str = "off"  # torch.compile the per-chunk function: "auto" (CUDA with Triton), "on", "off"
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" compiles without a C compiler / Triton)
    # "recompute": checkpointed chunks, logits recomputed in backward; "in_forward": gradients computed chunk by
    # chunk in the forward pass, one matmul fewer per chunk (fused.py)
    backward: str = "recompute"
    # Transform applied to the raw lm_head logits by some architectures (see logit_transform_of).
    logit_scale: float = 1.0  # logits * logit_scale
    logit_softcap: float | None = None  # cap * tanh(logits / cap)


def logit_transform_of(model_config) -> dict:
    """Logit scaling that a model's forward applies after lm_head, read from its HF config.

    The chunked loss bypasses the model's own logits computation, so it must apply the same
    transform: Gemma-2/3 soft-capping, Cohere `logit_scale`, Granite `logits_scaling` (a divisor).
    """
    out: dict = {}
    cap = getattr(model_config, "final_logit_softcapping", None)
    if cap:
        out["logit_softcap"] = float(cap)
    scale = 1.0
    if getattr(model_config, "logit_scale", None):
        scale *= float(model_config.logit_scale)
    if getattr(model_config, "logits_scaling", None):
        scale /= float(model_config.logits_scaling)
    if scale != 1.0:
        out["logit_scale"] = scale
    return out


def chunk_loss(
    h: torch.Tensor,  # [c, H] final hidden states at the chunk's target positions
    weight: torch.Tensor,  # [V, H] lm_head weight sliced to the tokenizer vocabulary
    bias: torch.Tensor | None,  # [V]
    target_ids: torch.Tensor,  # [c]
    teacher_ids: torch.Tensor | None,  # [c, K] (padding clamped to a valid id)
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE over the chunk, log q_T gathered at the teacher ids [c, K]) — all that needs [c, V].

    The divergence itself is computed outside the checkpoint, on the [N, K] gathered values of
    every chunk at once: it is small, and it is then neither recomputed in backward nor split
    into one round of small kernels per chunk.
    """
    z = torch.nn.functional.linear(h, weight, bias)  # [c, V]
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()  # bf16/fp16 autocast: softmax and the loss in float32
    if spec.logit_scale != 1.0:
        z = z * spec.logit_scale
    if spec.logit_softcap:
        z = spec.logit_softcap * torch.tanh(z / spec.logit_softcap)
    # log q(id) = z[id] - logsumexp(z): a [c] reduction and gathers, no [c, V] log-softmax tensor.
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [c, 1]
    if teacher_ids is None:
        return (lse.squeeze(-1) - z.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)).sum(), z.new_zeros((h.shape[0], 0))
    if spec.temperature == 1.0:
        # One gather for both parts: column 0 is the target, columns 1.. the teacher's kept ids.
        g = z.gather(-1, torch.cat([target_ids.unsqueeze(-1), teacher_ids], dim=-1)) - lse  # [c, 1+K]
        return -g[:, 0].sum(), g[:, 1:]
    ce = (lse.squeeze(-1) - z.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)).sum()
    zt = z / spec.temperature  # [c, V]
    kept = zt.gather(-1, teacher_ids) - torch.logsumexp(zt, dim=-1, keepdim=True)  # [c, K] log q_T at the kept ids
    return ce, kept


# Compiled chunk functions by (function, backend); backends that failed to compile here (eager from then on).
_COMPILED: dict[tuple[str, str], Callable] = {}
_FAILED: set[str] = set()


def compile_wanted(spec: LossSpec, device: torch.device) -> bool:
    """Whether the chunk function runs compiled: "on", or "auto" on CUDA with Triton; never after a failure."""
    if spec.compile == "off" or spec.compile_backend in _FAILED:
        return False
    if spec.compile == "on":
        return True
    from torch.utils._triton import has_triton

    return device.type == "cuda" and has_triton()


def compiled_or_eager(fn: Callable, spec: LossSpec, device: torch.device) -> Callable:
    """`fn`, or its torch.compile'd twin that falls back to `fn` (with one warning) if compiling fails.

    One compiled function per (fn, backend); dynamo specializes it per spec and shape. dynamic=None:
    the first new chunk length (the last, shorter chunk) recompiles once with a symbolic length.
    """
    if not compile_wanted(spec, device):
        return fn
    key = (fn.__qualname__, spec.compile_backend)
    if key not in _COMPILED:
        try:
            _COMPILED[key] = torch.compile(fn, backend=spec.compile_backend, dynamic=None)
        except Exception as e:  # noqa: BLE001 - e.g. an unknown backend: eager is always correct
            _compile_failed(spec, e)
            return fn
    compiled = _COMPILED[key]

    def run(*args):
        if spec.compile_backend in _FAILED:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - a compiler failure of any kind: eager is always correct
            if not _compile_error(e):
                raise
            _compile_failed(spec, e)
            return fn(*args)
    return run


def _compile_error(e: BaseException) -> bool:
    """A failure of the compiler, not control flow (checkpoint's early stop) or memory that eager would hit too."""
    if type(e).__module__.startswith("torch.utils.checkpoint") or isinstance(e, torch.OutOfMemoryError):
        return False
    return True


def _compile_failed(spec: LossSpec, e: BaseException) -> None:
    _FAILED.add(spec.compile_backend)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    warnings.warn(f"loss: torch.compile (backend {spec.compile_backend!r}) of the per-chunk loss failed "
                  f"({type(e).__name__}: {first}); running it eagerly (set compile_loss = 'off' to skip the attempt)",
                  RuntimeWarning, stacklevel=4)


def chunked_loss_parts(
    hidden: torch.Tensor,  # [N, H] final hidden states gathered at Batch.pred_index
    weight: torch.Tensor,  # [V_model, H] lm_head weight (V_model may be padded beyond the tokenizer)
    vocab_size: int,  # the tokenizer's vocabulary V <= V_model: logits beyond it are sliced off
    target_ids: torch.Tensor,  # [N]
    teacher_ids: torch.Tensor | None = None,  # [N, K]
    teacher_logprobs: torch.Tensor | None = None,  # [N, K]
    teacher_tail: torch.Tensor | None = None,  # [N]
    spec: LossSpec = LossSpec(),
    bias: torch.Tensor | None = None,  # [V_model]
    use_checkpoint: bool = True,
) -> dict[str, torch.Tensor]:
    """Summed loss parts {"ce", "kd" (= T²·Σ D), "loss" = α·ce + (1−α)·kd} over N target tokens.

    Same values as `losses.distillation_loss_parts` on the dense logits, without the [N, V] tensor.
    """
    # [V, H]: padded rows get no logits and no gradient. Sliced only when padded: a slice's backward
    # writes its gradient into a new [V_model, H] tensor, a second lm_head-sized buffer.
    padded = vocab_size != weight.shape[0]
    w = weight[:vocab_size] if padded else weight
    b = bias[:vocab_size] if bias is not None and padded else bias
    n = hidden.shape[0]
    with_kd = teacher_ids is not None and spec.alpha < 1.0
    ids = teacher_ids.clamp_min(0) if with_kd else None  # [N, K]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    ce_sum = hidden.new_zeros((), dtype=acc)
    kept_chunks = []
    if spec.backward == "in_forward" and torch.is_grad_enabled() and use_checkpoint:
        from kdpipe.pipeline.train.fused import in_forward_loss_parts

        return in_forward_loss_parts(hidden, w, target_ids, ids, teacher_logprobs, teacher_tail, spec, b,
                                     lambda f: compiled_or_eager(f, spec, hidden.device))
    fn = compiled_or_eager(chunk_loss, spec, hidden.device)
    # One chunk: its [N, V] tensors live until backward either way, so recomputing them would only cost time.
    checkpointed = use_checkpoint and n > spec.chunk_size and torch.is_grad_enabled()
    for start in range(0, n, spec.chunk_size):
        sl = slice(start, min(start + spec.chunk_size, n))
        args = (hidden[sl], w, b, target_ids[sl], ids[sl] if with_kd else None, spec)
        ce, kept = checkpoint(fn, *args, use_reentrant=False) if checkpointed else fn(*args)
        ce_sum = ce_sum + ce
        kept_chunks.append(kept)
    if with_kd and n > 0:
        kept = torch.cat(kept_chunks) if len(kept_chunks) > 1 else kept_chunks[0]  # [N, K] log q_T at the kept ids
        d = kd_divergence_from_kept(
            kept, ids, teacher_logprobs, teacher_tail,
            divergence=spec.divergence, tail_mode=spec.tail_mode, temperature=spec.temperature,
            jsd_beta=spec.jsd_beta, codec=spec.codec, target_ids=target_ids,
        )  # [N]
        kd = spec.temperature**2 * d.sum()
    else:
        kd = ce_sum.new_zeros(())
    return {"ce": ce_sum, "kd": kd, "loss": spec.alpha * ce_sum + (1.0 - spec.alpha) * kd}


def num_chunks(n_targets: int, chunk_size: int) -> int:
    return max(1, math.ceil(n_targets / chunk_size))
