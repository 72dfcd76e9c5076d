"""Shared pieces of the fault-injection harness: trial counts, seeds, the report, fake stores, children.

Everything here is deterministic given the seed (KDPIPE_FAULT_SEED, default 0): the fake teacher
outputs of a sample derive from its id, so a rerun after a crash must reproduce them bit for bit
and a store can be compared row by row with what should be in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = sys.executable
KDPIPE = str(Path(sys.executable).with_name("kdpipe"))
VOCAB = 1000


# ----------------------------------------------------------------------------------------------
# trial counts, seeds (set from env or the pytest options in conftest.py)


def trials(ci_default: int = 3) -> int:
    """Kill/fault trials per scenario: KDPIPE_FAULT_TRIALS (or --fault-trials), else `ci_default`."""
    v = os.environ.get("KDPIPE_FAULT_TRIALS")
    return max(1, int(v)) if v else ci_default


def full_run() -> bool:
    return "KDPIPE_FAULT_TRIALS" in os.environ


def full_only(why: str) -> None:
    """Slow scenarios: skipped in a quick local run, but always run in CI (at the CI trial count)
    and in a full run, so CI never passes with a scenario skipped."""
    import pytest

    if not full_run() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip(f"slow scenario: runs in CI and in the full fault run (--fault-trials N / KDPIPE_FAULT_TRIALS): {why}")


def examples(ci_default: int = 25) -> int:
    """Hypothesis examples per property: modest in CI, ~10x the trial count in a full run."""
    v = os.environ.get("KDPIPE_FAULT_TRIALS")
    return max(ci_default, 10 * int(v)) if v else ci_default


def base_seed() -> int:
    return int(os.environ.get("KDPIPE_FAULT_SEED", "0"))


# ----------------------------------------------------------------------------------------------
# the report: per scenario, trials / faults injected / faults survived / inputs tried


class Report:
    """Accumulates per-scenario figures; conftest writes them to KDPIPE_FAULT_REPORT at session end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scenarios: dict[str, Counter] = {}
        self.notes: dict[str, list[str]] = {}

    def add(self, scenario: str, trials: int = 0, injected: int = 0, survived: int = 0, inputs: int = 0) -> None:
        with self.lock:
            c = self.scenarios.setdefault(scenario, Counter())
            c.update({"trials": trials, "faults_injected": injected, "faults_survived": survived, "inputs_tried": inputs})

    def note(self, scenario: str, text: str) -> None:
        with self.lock:
            self.notes.setdefault(scenario, []).append(text)

    def to_dict(self) -> dict[str, Any]:
        keys = ("trials", "faults_injected", "faults_survived", "inputs_tried")
        scen = {k: {kk: int(v.get(kk, 0)) for kk in keys} for k, v in sorted(self.scenarios.items())}
        total = {kk: sum(s[kk] for s in scen.values()) for kk in keys}
        kill = {kk: sum(s[kk] for name, s in scen.items() if name.startswith("kill")) for kk in keys}
        return {"seed": base_seed(), "trials_per_scenario": trials(), "totals": total, "kill_totals": kill,
                "scenarios": scen, "notes": self.notes}


REPORT = Report()


# ----------------------------------------------------------------------------------------------
# fake teacher outputs and stores (no model needed)


def make_meta(codec=None, vocab: int = VOCAB, teacher: str = "fault-teacher"):
    from kdpipe.storage import CodecConfig, StoreMeta

    return StoreMeta(
        teacher=teacher, teacher_revision=None, tokenizer_fingerprint="fp-faults", vocab_size=vocab, recipe="faults",
        recipe_params={}, codec=codec or CodecConfig(top_k=8), dataset_fingerprint="ds-faults",
        generation_params={"temperature": 1.0},
    )


def sample_for(sample_id: str, seed: int = 0, vocab: int = VOCAB, k: int = 12, max_len: int = 40):
    """Deterministic fake teacher output of one sample id.

    -> input_ids [L], target_positions [P], top_ids [P, k] (sorted by log-prob desc), top_logprobs [P, k].
    """
    import hashlib

    h = int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(h)
    L = int(rng.integers(4, max_len))
    ids = rng.integers(0, vocab, L)
    pos = np.arange(1, L)
    logits = rng.normal(size=(L - 1, vocab)) * 3.0
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.argsort(-lp, axis=1)[:, :k]
    return ids, pos, top, np.take_along_axis(lp, top, axis=1).astype(np.float32)


def sample_ids(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def write_task(store: Path, ids: list[str], task_index: int = 0, num_tasks: int = 1, shard_bytes: int = 3000,
               codec=None, seed: int = 0) -> None:
    """What a phase-one task does: skip done ids, add the rest, close (marks the task complete)."""
    from kdpipe.storage import ShardWriter

    with ShardWriter(store, make_meta(codec), task_index=task_index, num_tasks=num_tasks, shard_bytes=shard_bytes) as w:
        done = w.done_ids()
        for sid in ids:
            if sid not in done:
                w.add(sid, *sample_for(sid, seed), text=f"text of {sid}")


def build_store(store: Path, n: int = 30, num_tasks: int = 1, shard_bytes: int = 3000, codec=None,
                finalize: bool = True) -> list[str]:
    from kdpipe.storage import finalize_store

    ids = sample_ids(n)
    for t in range(num_tasks):
        write_task(store, ids[t::num_tasks], t, num_tasks, shard_bytes, codec)
    if finalize:
        finalize_store(store)
    return ids


def check_store_exact(store: Path, expected_ids: list[str], codec=None, seed: int = 0, cli: bool = False) -> None:
    """The finalized store holds every expected sample exactly once, with the right contents.

    Also: inspect --verify passes (in process; through `kdpipe inspect --verify --json` with
    cli=True, which costs a torch import), no .tmp file is listed, and no shard .tmp is left.
    """
    from kdpipe.storage import CodecConfig, StoreReader, inspect_store, open_store

    codec = codec or CodecConfig(top_k=8)
    m = open_store(store)
    assert not any(s.file.endswith(".tmp") for s in m.shards)
    seen = Counter()
    bound = codec.logprob_step / 2 + 1e-6
    for rec in StoreReader(store, shuffle=False):
        seen[rec.sample_id] += 1
        ids, pos, top, lp = sample_for(rec.sample_id, seed)
        np.testing.assert_array_equal(rec.input_ids, ids)
        np.testing.assert_array_equal(rec.target_positions, pos)
        if codec.name == "topk":
            k = min(codec.top_k, top.shape[1])
            np.testing.assert_array_equal(rec.ids[:, :k], top[:, :k])
            assert np.abs(rec.logprobs[:, :k] - lp[:, :k]).max() <= bound
    dup = [s for s, c in seen.items() if c > 1]
    assert not dup, f"samples stored more than once: {dup[:5]}"
    missing = sorted(set(expected_ids) - set(seen))
    assert not missing, f"samples missing: {missing[:5]}"
    extra = sorted(set(seen) - set(expected_ids))
    assert not extra, f"unexpected samples: {extra[:5]}"
    if cli:
        r = run_cli(["inspect", "--verify", "--json", str(store)])
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout.strip().splitlines()[-1])
    else:
        rep = inspect_store(store, verify=True)
    assert rep["ok"] and rep["sequences"] == len(expected_ids), rep
    assert not list(store.glob("shard-*.tmp")), list(store.glob("shard-*.tmp"))
    # pid-named .tmp of a killed atomic JSON write (finding 6): the rerun of the task / finalize removes it
    left = sorted(str(p.relative_to(store)) for p in store.rglob("*.json.*.tmp"))
    assert not left, f"orphaned JSON temp files left after the rerun: {left}"


# ----------------------------------------------------------------------------------------------
# subprocesses


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([KDPIPE, *args], capture_output=True, text=True, timeout=timeout, env=child_env(), **kw)


def py_script(code: str) -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(code)]


# ----------------------------------------------------------------------------------------------
# byte-level corruption

BYTE_FAULTS = ["truncate", "bitflip", "garbage", "zero_range", "append", "empty"]


def corrupt_bytes(path: Path, kind: str, a: float, b: int) -> None:
    """Damage a file: truncate at fraction a, flip bit b of the byte at a, replace by garbage, ..."""
    data = bytearray(path.read_bytes())
    n = len(data)
    i = min(max(n - 1, 0), int(a * n))
    if kind == "truncate":
        data = data[:i]
    elif kind == "bitflip":
        data[i] ^= 1 << (b % 8)
    elif kind == "garbage":
        data = bytearray(np.random.default_rng(b).integers(0, 256, max(1, n // (1 + b % 4)), dtype=np.uint8).tobytes())
    elif kind == "zero_range":
        data[i:i + 1 + b % 64] = bytes(len(data[i:i + 1 + b % 64]))
    elif kind == "append":
        data += bytes([b % 256]) * (1 + b % 16)
    elif kind == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))
