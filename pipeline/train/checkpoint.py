"""Checkpoints of a run: RUN/checkpoint-STEP/ and RUN/final/, written whole or not at all.

A checkpoint directory holds
    model.safetensors + config.json + tokenizer files   the student (save_pretrained; for LoRA runs the adapter)
    optimizer.pt, scheduler.pt                           state dicts (tensors and plain values only)
    rng-rank{R}.pt                                       torch CPU (and CUDA) RNG state of rank R
    data-rank{R}.json                                    rank R's data cursor (readers, store picks, pending record)
    train_state.json                                     step and counters
    train_config.toml                                    the resolved TrainConfig
It is written into `checkpoint-STEP.tmp/` and renamed into place by rank 0 (os.replace) after
every rank has written its part, so a crash leaves either the whole checkpoint or none.
Everything is loaded with torch.load(weights_only=True) or JSON: no pickled objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.pipeline.card import write_model_card
from kdpipe.pipeline.config import atomic_write_text, write_resolved
from kdpipe.pipeline.train.distributed import Dist
from kdpipe.storage.errors import ConfigError, KdpipeError
from kdpipe.storage.manifest import fsync_dir

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run, oldest first."""
    if not run.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(out)


def latest_checkpoint(run: Path) -> Path | None:
    c = checkpoints(run)
    return c[-1][1] if c else None


def _full_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of the HF model (collective under FSDP; rank 0 gets it)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_state(wrapped: nn.Module, optimizer, fsdp: bool) -> dict[str, Any]:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(model: nn.Module, tokenizer, out: Path, fsdp: bool, dist: Dist, merge_lora: bool = False) -> None:
    """save_pretrained the student (+ tokenizer) into `out` (rank 0 writes; collective under FSDP).

    LoRA runs save the adapter in checkpoints (what resume needs) and, with merge_lora (for
    RUN/final, after the last step: merging changes the weights in place), the merged model
    that vLLM and transformers load as is. Under FSDP the adapter is saved unmerged.
    """
    full = _full_state(model, fsdp)  # collective: every rank must call it
    if not dist.is_main:
        return
    if merge_lora and hasattr(model, "merge_and_unload") and not fsdp:
        model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    else:
        kwargs = {"state_dict": full} if full is not None else {}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(out)


# How torch.save's zip writer and safetensors report a failed write (ENOSPC, EFBIG, EIO): not an OSError.
_WRITE_FAILED = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos", "IoError", "Os {")


def write_failure(e: BaseException) -> bool:
    """A failed write (disk full, file size limit, I/O error), as opposed to a bug or a collective error."""
    if isinstance(e, OSError):
        return True
    wraps_io = isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"
    return wraps_io and any(m in str(e) for m in _WRITE_FAILED)


def write_failed(e: BaseException, tmp: Path, run: Path, what: str) -> KdpipeError:
    """Drop the partial `tmp` dir (best effort) -> a clear error naming it; earlier checkpoints stay intact."""
    shutil.rmtree(tmp, ignore_errors=True)
    cause = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
    last = latest_checkpoint(run)
    return KdpipeError(
        f"{tmp}: cannot write the {what} ({cause}); free space on the filesystem of {run} (or raise the file size "
        f"limit) and rerun with --resume: it continues from {last if last is not None else 'the start (no whole checkpoint yet)'}"
    )


def save_checkpoint(run: Path, step: int, wrapped: nn.Module, model: nn.Module, tokenizer, optimizer, scheduler,
                    data_cursor: dict[str, Any], train_state: dict[str, Any], cfg, dist: Dist, keep: int = 0) -> Path:
    """Write RUN/checkpoint-STEP whole or not at all; a failed write (disk full) raises a KdpipeError."""
    tmp = run / f"checkpoint-{step}.tmp"
    try:
        return _save_checkpoint(run, step, wrapped, model, tokenizer, optimizer, scheduler, data_cursor, train_state,
                                cfg, dist, keep)
    except Exception as e:
        if not write_failure(e):
            raise
        raise write_failed(e, tmp, run, f"checkpoint of step {step}") from e


def _save_checkpoint(run: Path, step: int, wrapped: nn.Module, model: nn.Module, tokenizer, optimizer, scheduler,
                     data_cursor: dict[str, Any], train_state: dict[str, Any], cfg, dist: Dist, keep: int) -> Path:
    final = run / f"checkpoint-{step}"
    tmp = run / f"checkpoint-{step}.tmp"
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_model(model, tokenizer, tmp, cfg.fsdp, dist)
    osd = _optimizer_state(wrapped, optimizer, cfg.fsdp)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{dist.rank}.pt")
    atomic_write_text(tmp / f"data-rank{dist.rank}.json", json.dumps(data_cursor))
    if dist.is_main:
        torch.save(osd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        atomic_write_text(tmp / "train_state.json", json.dumps({"step": step, **train_state}, indent=1))
        write_resolved(cfg, tmp / "train_config.toml")
    dist.barrier()
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run)
        if keep > 0:
            for _, old in checkpoints(run)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save_final(run: Path, model: nn.Module, tokenizer, cfg, dist: Dist) -> Path:
    """Write RUN/final whole or not at all; a failed write (disk full) raises a KdpipeError."""
    try:
        return _save_final(run, model, tokenizer, cfg, dist)
    except Exception as e:
        if not write_failure(e):
            raise
        raise write_failed(e, run / "final.tmp", run, "final model") from e


def _save_final(run: Path, model: nn.Module, tokenizer, cfg, dist: Dist) -> Path:
    final, tmp = run / "final", run / "final.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_model(model, tokenizer, tmp, cfg.fsdp, dist, merge_lora=cfg.lora)
    if dist.is_main:
        write_resolved(cfg, tmp / "train_config.toml")
        write_model_card(tmp, run)  # README.md in the Hub's format: the folder uploads as it is
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(run)
    dist.barrier()
    return final


def load_training_state(ckpt: Path, wrapped: nn.Module, optimizer, scheduler, cfg, dist: Dist) -> tuple[dict, dict]:
    """Restore optimizer, scheduler and this rank's RNG; -> (train_state, this rank's data cursor).

    The model weights were loaded from `ckpt` when the student was built (load_student).
    """
    try:
        train_state = json.loads((ckpt / "train_state.json").read_text())
        cursor = json.loads((ckpt / f"data-rank{dist.rank}.json").read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{ckpt}: checkpoint is missing {Path(e.filename).name}; was it written by a run with "
                          f"another number of ranks? resume with the same world size") from None
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        osd = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu") if dist.is_main else {}
        set_optimizer_state_dict(wrapped, optimizer, osd,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=dist.device))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = torch.load(ckpt / f"rng-rank{dist.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and dist.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], dist.device)
    return train_state, cursor

