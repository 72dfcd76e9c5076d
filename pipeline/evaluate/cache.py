"""The teacher's evaluation outputs, cached per (model, held-out prompts, generation settings).

Every evaluation in a job compares one student with the same teacher on the same held-out set, and
generating with the teacher is the slowest part of it (the largest model). Its outputs (texts, token
counts, finish reasons, per-request latencies) are written once to CACHE_DIR/<key>.json (tmp +
rename) and read back by the next evaluation whose key is the same. The key hashes:
  - the model: its id, or for a local folder the name, size and modification time of every file (a
    retrained model at the same path misses);
  - the prompts' token ids (data file, split, fields, prompt template, chat template, max_samples);
  - every setting that changes the outputs or the latencies (engine, dtype, max_model_len,
    max_new_tokens, temperature, seed, tensor_parallel_size, latency_requests, warmup_requests).
A changed setting misses; a cache file that does not parse or does not fit is ignored (regenerated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdpipe.pipeline.config import atomic_write_text

CACHE_VERSION = 1
# EvalConfig fields that change a model's outputs or latencies (the prompts are hashed themselves).
SETTINGS = ("engine", "dtype", "max_model_len", "max_new_tokens", "temperature", "seed", "tensor_parallel_size",
            "latency_requests", "warmup_requests", "gpu_memory_utilization")


def model_identity(model: str) -> Any:
    """A hub id as is; a local folder by its files' names, sizes and modification times (cheap for 140 GB)."""
    p = Path(model)
    if not p.is_dir():
        return model
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve())] + [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def cache_key(model: str, prompts: list[list[int]], cfg) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "model": model_identity(model),
                         "settings": {k: getattr(cfg, k) for k in SETTINGS}}, sort_keys=True).encode())
    for p in prompts:
        h.update(json.dumps(p).encode() + b"\n")
    return h.hexdigest()


def cache_file(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"teacher-outputs-{key[:32]}.json"


def load(cache_dir: str | os.PathLike, key: str, n_prompts: int) -> dict[str, Any] | None:
    """The cached outputs (a dict of ModelOutputs' fields) for `key`, or None (missing, unreadable, wrong size)."""
    path = cache_file(cache_dir, key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("outputs"), dict):
        return None
    out = data["outputs"]
    if any(len(out.get(k) or []) != n_prompts for k in ("texts", "output_tokens", "finish_reasons")):
        return None
    return out


def save(cache_dir: str | os.PathLike, key: str, outputs) -> Path:
    """Write `outputs` (a ModelOutputs) under `key`, atomically (a reader never sees half a file)."""
    path = cache_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "version": CACHE_VERSION, "outputs": dataclasses.asdict(outputs)},
                                       ensure_ascii=False) + "\n")
    return path
