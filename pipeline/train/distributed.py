"""Distributed training: the process group (Dist, setup_distributed), autocast, and the DDP / FSDP2
wrapping of the loss module (wrap_distributed, no_sync, unwrap)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.student import hf_model
from kdpipe.pipeline.train.student_loss import StudentLoss
from kdpipe.storage.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None = not initialized (one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.backend is not None:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.backend is not None:
            torch.distributed.barrier()



def setup_distributed(cfg: TrainConfig) -> Dist:
    """One process, or the torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device; use device = 'cpu' or 'auto'")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = None
    if world > 1 or cfg.fsdp:  # fully_shard needs a process group, even of one
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        if not torch.distributed.is_initialized():
            kwargs: dict[str, Any] = {}
            if "MASTER_ADDR" not in os.environ:  # a plain one-process run: a private file rendezvous
                kwargs = {"init_method": f"file://{_tmp_rendezvous()}", "rank": 0, "world_size": 1}
            torch.distributed.init_process_group(backend=backend, device_id=device if cuda else None, **kwargs)
    return Dist(rank, world, local, device, backend)



def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA (dtype auto or bfloat16), fp32 on CPU unless bfloat16 is asked for."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()



def wrap_distributed(module: StudentLoss, cfg: TrainConfig, dist: Dist) -> nn.Module:
    """DDP, or FSDP2 `fully_shard` on each decoder layer then the root; unchanged on one process."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        layer_classes = set(getattr(hf_model(module.model), "_no_split_modules", None) or [])
        for m in module.modules():
            if type(m).__name__ in layer_classes:
                fully_shard(m)
        fully_shard(module)
        return module
    if dist.backend is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return module



def _tmp_rendezvous() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="kdpipe-fsdp-")
    os.close(fd)
    os.unlink(path)
    return path



def no_sync(wrapped: nn.Module, last: bool) -> Any:
    """Skip the gradient all-reduce on every micro-batch but the last of a step."""
    if last:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()  # DDP
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        return _restore_sync(wrapped)
    return contextlib.nullcontext()



@contextlib.contextmanager
def _restore_sync(wrapped):
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)



def unwrap(wrapped: nn.Module) -> StudentLoss:
    return wrapped.module if hasattr(wrapped, "module") and isinstance(wrapped.module, StudentLoss) else wrapped
