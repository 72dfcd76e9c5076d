"""Phase one on the real vLLM CPU engine (the session's shared engine, tests/conftest.py; ~20-40 s to start).

Tolerance: stored log-probs are within step/2 (codec quantization, step = 1/512 nats) + 1e-4
(vLLM CPU vs transformers fp32 numerics) of a transformers forward pass; tails within 1e-4.
Ids are compared where the reference probabilities are not tied (gap > 1e-4 to both neighbours).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from kdtest import require
from gen_helpers import Reference, check_against_reference, compare_stores, make_docs, read_records, write_jsonl

from kdpipe.pipeline.generate.config import GenerateConfig
from kdpipe.pipeline.generate.run import generate_logits
from kdpipe.storage import CodecConfig

pytestmark = pytest.mark.vllm

K = 8
MAX_LEN = 512  # the shared engine's (tests/conftest.py)
STEP = CodecConfig().logprob_step
LP_TOL = STEP / 2 + 1e-4


@pytest.fixture(scope="module")
def engine(shared_vllm_engine):
    """The session's in-process engine (tests/conftest.py: an engine start is ~20-40 s on 2 cores)."""
    assert shared_vllm_engine.max_logprobs == K and shared_vllm_engine.max_model_len == MAX_LEN
    return shared_vllm_engine


@pytest.fixture(scope="module")
def reference(tiny_teacher):
    return Reference(tiny_teacher)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    rows = [{"id": f"d{i}", "text": t, "ref": "The city council approved a new budget."}
            for i, t in enumerate(make_docs(24, seed=1))]
    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", rows)


def cfg_for(teacher, data, out, **kw) -> GenerateConfig:
    base = dict(teacher=str(teacher), data=str(data), out=str(out), top_k=K, max_model_len=MAX_LEN, dtype="float32",
                enforce_eager=True, max_new_tokens=16, id_field="id", progress=False, shard_mb=0.02)
    base.update(kw)
    return GenerateConfig(**base)


def cli_args(cfg: GenerateConfig) -> list[str]:
    args = [sys.executable, "-m", "kdpipe.pipeline.cli", "generate-logits"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None or v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        args += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return args


@pytest.fixture(scope="module")
def score_store(engine, tiny_teacher, docs, tmp_path_factory) -> Path:
    """Teacher-forced scoring of the reference targets, one task: the baseline for TP / task tests."""
    out = tmp_path_factory.mktemp("score1")
    s = generate_logits(cfg_for(tiny_teacher, docs, out, recipe="score", target_field="ref"), engine=engine)
    assert s.written == 24 and not s.interrupted
    return out


def test_summarize_matches_transformers_and_score_agrees(engine, reference, tiny_teacher, docs, tmp_path):
    out = tmp_path / "sum"
    s = generate_logits(cfg_for(tiny_teacher, docs, out, limit=10), engine=engine)
    assert s.written == 10 and s.target_tokens > 10
    recs = read_records(out)
    compared = 0
    for rec in recs.values():
        ref_lp = reference.logprobs(rec.input_ids, rec.target_positions)  # [P, V]
        compared += check_against_reference(rec, ref_lp, LP_TOL)["ids_compared"]
        # greedy: each target token is the teacher's argmax (where that is not a tie)
        tgt = rec.input_ids[rec.target_positions]
        top2 = np.sort(ref_lp, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-4
        assert (tgt[clear] == ref_lp.argmax(1)[clear]).all()
    assert compared > 0.75 * sum(len(r.target_positions) for r in recs.values()) * K

    # score with target = the teacher's own greedy output (as token ids) reproduces the same store rows
    rows = [json.loads(line) for line in docs.read_text().splitlines()][:10]
    for r in rows:
        rec = recs[r["id"]]
        r["own"] = rec.input_ids[rec.target_positions[0]:].tolist()
    data2 = write_jsonl(tmp_path / "own.jsonl", rows)
    generate_logits(cfg_for(tiny_teacher, data2, tmp_path / "score", recipe="score", target_field="own"), engine=engine)
    compare_stores(recs, read_records(tmp_path / "score"), lp_tol=STEP + 2e-4)


def test_basic_reading_matches_transformers(engine, reference, tiny_teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(make_docs(3, seed=2, sentences=3))])
    s = generate_logits(cfg_for(tiny_teacher, data, tmp_path / "br", recipe="basic-reading", max_new_tokens=8,
                                  reading_template="Sentence: {sentence}\nEntities:"), engine=engine)
    assert s.written == 3 and s.stats["readings"] == 9
    for rec in read_records(tmp_path / "br").values():
        check_against_reference(rec, reference.logprobs(rec.input_ids, rec.target_positions), LP_TOL)


def test_two_array_tasks_plus_finalize_equal_one_task(engine, tiny_teacher, docs, score_store, tmp_path):
    out = tmp_path / "two"
    written = 0
    for t in (0, 1):
        s = generate_logits(cfg_for(tiny_teacher, docs, out, recipe="score", target_field="ref", task_index=t, num_tasks=2), engine=engine)
        written += s.written
    assert written == 24
    compare_stores(read_records(score_store), read_records(out), lp_tol=STEP + 2e-4)


def test_tensor_parallel_2_gives_the_same_store(tiny_teacher, docs, score_store, tmp_path):
    out = tmp_path / "tp2"
    cfg = cfg_for(tiny_teacher, docs, out, recipe="score", target_field="ref", tensor_parallel_size=2)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1")
    r = subprocess.run(cli_args(cfg), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "wrote 24 samples" in r.stdout
    compare_stores(read_records(score_store), read_records(out), lp_tol=STEP + 2e-4)


# kill -9 mid-run, then a rerun storing every sample once, with this engine: tests/faults/test_fault_pipeline.py
# ::test_kill9_generate_vllm_then_rerun_exactly_once (one trial of the fault harness).


def test_ctrl_c_is_a_clean_interruption_like_sigterm(tiny_teacher, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-run: the same one-line
    "INTERRUPTED (rerun ...)" summary and exit status 143 as SIGTERM, no EngineDeadError trace (issue 23)."""
    require("vllm", "the engine's processes get the SIGINT too")
    n = 160
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"c{i}", "text": t} for i, t in enumerate(make_docs(n, seed=4))])
    out = tmp_path / "ctrlc"
    cfg = cfg_for(tiny_teacher, data, out, max_new_tokens=24)
    proc = subprocess.Popen(cli_args(cfg) + ["--max-inflight", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    try:
        deadline = time.time() + 300
        while not list(out.glob("shard-*.arrow")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        so, se = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, so[-2000:], se[-3000:])
    assert "INTERRUPTED (rerun the same command to continue)" in so, so
    assert "Traceback" not in se and "EngineDeadError" not in se, se[-3000:]
    task = json.loads((out / "tasks" / "task-00000.json").read_text())
    assert task["complete"] is False and 0 < sum(s["rows"] for s in task["shards"]) < n


def test_an_engine_that_cannot_start_is_one_line_naming_its_root_cause(tiny_teacher, docs, tmp_path):
    """An engine that cannot start (here: a KV cache larger than the machine's memory, as vLLM's CPU default of 90%
    of RAM once asked for) is one line on the terminal naming its root cause; its trace stays in STORE/logs/
    (issue 23). kdpipe's own KV-cache sizing when the variable is unset: tests/cli/test_newcomer_path.py."""
    require("vllm", "the engine's own KV cache sizing is what is tested")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    cfg = cfg_for(tiny_teacher, docs, tmp_path / "fail", limit=4)
    r = subprocess.run(cli_args(cfg), env=dict(env, VLLM_CPU_KVCACHE_SPACE="100000"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr and len(err) <= 3, r.stderr[-3000:]
    assert "Error: the teacher engine did not start: ValueError: Available memory" in r.stderr, r.stderr
    assert str(tmp_path / "fail" / "logs") in r.stderr
    # The other half, an engine that starts with kdpipe's own KV cache size when the variable is unset, is the
    # newcomer's phase one (tests/cli/test_newcomer_path.py): the same CLI, no VLLM_CPU_KVCACHE_SPACE, asserted there.
