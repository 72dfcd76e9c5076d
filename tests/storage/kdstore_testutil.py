"""Fake teacher outputs and tiny stores for the storage tests (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdpipe.storage import CodecConfig, ShardWriter, StoreMeta, finalize_store

VOCAB = 1000


def make_meta(codec: CodecConfig | None = None, vocab: int = VOCAB, teacher: str = "tiny-teacher") -> StoreMeta:
    return StoreMeta(
        teacher=teacher, teacher_revision=None, tokenizer_fingerprint="fp-test", vocab_size=vocab, recipe="test",
        recipe_params={"n": 1}, codec=codec or CodecConfig(top_k=8), dataset_fingerprint="ds-test",
        generation_params={"temperature": 1.0},
    )


def fake_sample(rng: np.random.Generator, vocab: int = VOCAB, k: int = 16, min_len: int = 4, max_len: int = 40):
    """-> input_ids [L], target_positions [P], top_ids [P, k], top_logprobs [P, k] (full-vocab log-probs)."""
    L = int(rng.integers(min_len, max_len))
    ids = rng.integers(0, vocab, L)
    pos = np.arange(1, L)
    logits = rng.normal(size=(L - 1, vocab)) * 3.0
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.argsort(-lp, axis=1)[:, :k]
    return ids, pos, top, np.take_along_axis(lp, top, axis=1).astype(np.float32)


def build_store(path: Path, n: int = 30, codec: CodecConfig | None = None, num_tasks: int = 1, shard_bytes: int = 4000,
                seed: int = 0, finalize: bool = True) -> dict[str, tuple]:
    """Write n fake sequences over num_tasks tasks; -> sample id -> (ids, pos, top_ids, top_logprobs)."""
    rng = np.random.default_rng(seed)
    meta = make_meta(codec)
    data = {f"s{i:04d}": fake_sample(rng) for i in range(n)}
    names = list(data)
    for t in range(num_tasks):
        with ShardWriter(path, meta, task_index=t, num_tasks=num_tasks, shard_bytes=shard_bytes) as w:
            for sid in names[t::num_tasks]:
                w.add(sid, *data[sid], text=f"text of {sid}")
    if finalize:
        finalize_store(path)
    return data
