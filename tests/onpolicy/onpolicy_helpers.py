"""Shared helpers of the on-policy tests: tiny datasets, configs, reading stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tomli_w

WORDS = ("the city council approved a new budget for parks and schools on monday researchers in paris "
         "reported that river reached its highest level ten years quick brown fox jumps over lazy dog").split()

K = 8
MAX_LEN = 256
NEW = 12


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))).capitalize() + "." for _ in range(n)]


def write_docs(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(make_docs(n, seed))),
                    encoding="utf-8")
    return path


def onpolicy_cfg(teacher, sampler, data, out, **kw):
    from kdpipe.pipeline.generate.config import GenerateConfig

    base = dict(teacher=str(teacher), sampler=None if sampler is None else str(sampler), data=str(data), out=str(out), recipe="on-policy", top_k=K,
                max_model_len=MAX_LEN, dtype="float32", enforce_eager=True, max_new_tokens=NEW, id_field="id",
                progress=False, shard_mb=0.002, samples_per_prompt=2, sampling_temperature=1.0, seed=5)
    base.update(kw)
    return GenerateConfig(**base)


def read_records(store: Path) -> dict:
    """row id -> Record (finalizing the store first if needed); asserts every row is stored once."""
    from kdpipe.storage import StoreReader, finalize_store

    if not (Path(store) / "manifest.json").exists():
        finalize_store(store)
    recs = {}
    for r in StoreReader(str(store), shuffle=False):
        assert r.sample_id not in recs, f"row {r.sample_id} stored twice"
        recs[r.sample_id] = r
    return recs


def completions(recs: dict) -> dict:
    """row id -> (prompt ids, completion ids) of a store."""
    out = {}
    for sid, r in recs.items():
        t0 = int(r.target_positions[0])
        out[sid] = (r.input_ids[:t0].tolist(), r.input_ids[t0:].tolist())
    return out


def job_doc(teacher, student, prompts, **on_policy) -> dict:
    op = {"rounds": 2, "samples_per_prompt": 2, "temperature": 1.0, "steps_per_round": 2,
          "start_model": str(student), "prompts": {"dataset": str(prompts), "id_field": "id"},
          "train": {"tokens_per_batch": 256, "save_every": 0, "lr": 1e-3}, "generation": {"max_new_tokens": 6}}
    op.update(on_policy)
    op = {k: v for k, v in op.items() if v is not None}  # None: leave the key out
    return {
        "name": "op", "run_dir": "run",
        "teacher": {"model": str(teacher), "dtype": "float32", "max_model_len": 256, "engine": "hf"},
        "generation": {"k": 4, "num_tasks": 1, "store": "unused-store", "progress": False},
        "on_policy": op,
        "slurm": {"cpus_per_task": 1, "mem": "2G"},
    }


def write_job(base: Path, doc: dict) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    p = base / "op.toml"
    p.write_text(tomli_w.dumps(doc))
    return p
