"""Where the chunked loss's memory goes, on CPU: peak extra bytes of the loss + backward per setting.

The loss alone, lm_head included, as bench_gpu's `loss_only` (and Liger-Kernel) measure it: hidden
states h [N, H] and the lm_head weight W [V, H] are the inputs, `chunked_loss_parts(...)["loss"]`
forward + backward is the work, W.grad and h.grad are kept (they are its output). "Extra" = the
peak of the bytes held by tensors created during the call (torch's dispatcher sees every
allocation of every op: `LiveBytes` counts each new storage until it is freed), so inputs do not
count and outputs do, exactly like `max_memory_allocated() − inputs` on CUDA. Eager (compile off):
on CUDA, torch.compile fuses some of the eager temporaries away; this benchmark shows what the
code itself keeps alive.

Settings: loss_backward recompute / in_forward × chunk sizes, weights and hidden states in
float32 (the CPU default) and in bfloat16 (bench_gpu's loss_only shape, scaled down). Run it on
two checkouts (PYTHONPATH) for a before/after table. Last line: one JSON object,
{"shape": ..., "by_config": {"<dtype>/<backward>/<chunk>": {"extra_mib": ..., "in_cv_units": ...}}}
where in_cv_units = extra / (chunk × V × 4 bytes), the number of float32 [chunk, V] buffers.
"""

from __future__ import annotations

import argparse
import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode and still alive; `peak` is their high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key = id(s)
                if key not in self._seen and s.nbytes() > 0:
                    self._seen.add(key)
                    self.live += s.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._free, key, s.nbytes())
        return out


def inputs(N: int, H: int, V: int, K: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)  # [N, H]
    w = (torch.randn(V, H, generator=g) * 0.02).to(dtype)  # [V, H]
    target = torch.randint(0, V, (N,), generator=g)  # [N]
    ids = torch.randint(0, V, (N, K), generator=g)  # [N, K]
    lp = torch.log_softmax(torch.randn(N, K, generator=g), -1) - 0.1  # [N, K], 10% tail
    tail = 1 - lp.exp().sum(-1)  # [N]
    return h, w, target, ids, lp, tail


def peak_extra(backward: str, chunk: int, N: int, H: int, V: int, K: int, dtype: torch.dtype,
               alpha: float = 0.5, temperature: float = 1.0) -> int:
    """Peak bytes held beyond the inputs by one loss forward + backward (gradients included)."""
    from kdpipe.pipeline.train.chunked import LossSpec, chunked_loss_parts

    h, w, target, ids, lp, tail = inputs(N, H, V, K, dtype)
    h.requires_grad_()
    w.requires_grad_()
    spec = LossSpec(alpha=alpha, temperature=temperature, chunk_size=chunk, backward=backward)
    with LiveBytes() as mem:
        parts = chunked_loss_parts(h, w, V, target, ids, lp, tail, spec)
        (parts["loss"] / N).backward()
        del parts
    assert w.grad is not None and h.grad is not None
    return mem.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--chunk-sizes", default="256,1024")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for dt in a.dtypes.split(","):
        dtype = getattr(torch, dt)
        for backward in ("recompute", "in_forward"):
            for chunk in (int(c) for c in a.chunk_sizes.split(",")):
                b = peak_extra(backward, chunk, a.tokens, a.hidden, a.vocab, a.top_k, dtype)
                out[f"{dt}/{backward}/{chunk}"] = {"extra_mib": round(b / 2**20, 1),
                                                   "in_cv_units": round(b / (chunk * a.vocab * 4), 2)}
    w_mib = {dt: round(a.vocab * a.hidden * getattr(torch, dt).itemsize / 2**20, 1) for dt in a.dtypes.split(",")}
    print(json.dumps({"shape": {"tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "top_k": a.top_k},
                      "lm_head_grad_mib": w_mib, "by_config": out}))


if __name__ == "__main__":
    main()
