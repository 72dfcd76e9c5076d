"""A newcomer's first hour (issue 12), on one real phase-one store shared by the module.

The store is written once by the real `kdpipe generate-logits` CLI (vLLM on CPU, --dtype auto,
without -v), so its printed output is what a user sees; every other check reuses it: finalize,
inspect, store reuse with another --top-k, train/resume, a job chain that is already complete.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from kdtest import require

from kdpipe.pipeline.cli import main

pytestmark = [pytest.mark.vllm]

DOCS = [
    "The city council approved a new budget for parks and schools on Monday.",
    "Researchers in Paris reported that the river reached its highest level in ten years.",
    "A small bakery opened near the station and sold out of bread by noon.",
    "The team won the final match after a long and difficult season.",
]
# What phase one runs with, as flags and as a job file (the same settings give the same cache key).
GEN_FLAGS = ["--top-k", "4", "--max-new-tokens", "8", "--max-model-len", "256", "--enforce-eager", "--id-field", "id",
             "--dtype", "auto"]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONWARNINGS", None)
    r = subprocess.run([sys.executable, "-m", "kdpipe.pipeline.cli", *args], capture_output=True, timeout=timeout, env=env)
    # Decoded by hand: text=True would turn a progress bar's \r redraws into separate lines.
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cli-data") / "docs.jsonl"
    p.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCS)))
    return p


@pytest.fixture(scope="module")
def phase_one(tmp_path_factory, tiny_teacher, data):
    """(store dir, the finished CLI process) of a quiet phase-one run, then finalized."""
    require("vllm", "phase one runs the teacher under vLLM")
    store = tmp_path_factory.mktemp("cli-store") / "store"
    r = cli("generate-logits", "--teacher", str(tiny_teacher), "--data", str(data), "--out", str(store), *GEN_FLAGS)
    assert r.returncode == 0, r.stderr[-3000:]
    f = invoke("finalize", str(store))
    assert f.exit_code == 0, f.output
    return store, r


def _lines(text: str) -> list[str]:
    # A progress bar redraws with \r on one line; a person sees the last drawing of each line.
    return [ln.rsplit("\r", 1)[-1] for ln in text.split("\n") if ln.rsplit("\r", 1)[-1].strip()]


def test_phase_one_prints_a_few_lines_and_logs_the_engine(phase_one):
    store, r = phase_one
    lines = _lines(r.stdout) + _lines(r.stderr)
    # the engine-start line (naming the log), the progress bar, the summary line; nothing of vLLM's
    assert len(lines) <= 4, "\n".join(lines)
    assert not re.search(r"INFO|WARNING|Warning|force kill|leaked", r.stdout + r.stderr), r.stderr
    logs = list((store / "logs").glob("generate-task-*.log"))
    assert len(logs) == 1 and "INFO" in logs[0].read_text(errors="replace")  # vLLM's own output is kept there
    assert str(logs[0]) in r.stderr


def test_progress_bar_and_summary_give_the_same_rate(phase_one):
    _, r = phase_one
    bar = re.findall(r"(\d+) target tok/s", r.stderr)
    summary = re.search(r"(\d+) target tok/s\); ", r.stdout)
    assert bar and summary, (r.stdout, r.stderr)
    assert "after engine start" in r.stdout
    a, b = float(bar[-1]), float(summary.group(1))
    assert abs(a - b) <= max(1.0, 0.05 * b), (a, b)


def test_dtype_auto_is_resolved_recorded_and_in_the_cache_key(phase_one, tiny_teacher, data):
    import dataclasses

    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import expected_cache_key

    store, _ = phase_one
    meta = json.loads((store / "meta.json").read_text())
    assert meta["meta"]["generation_params"]["dtype"] == "float32"  # auto on CPU, not "auto"
    assert 'dtype = "float32"' in (store / "generate-config.toml").read_text()
    cfg = GenerateConfig(teacher=str(tiny_teacher), data=str(data), out=str(store), top_k=4, max_new_tokens=8,
                         max_model_len=256, enforce_eager=True, id_field="id", dtype="auto")
    assert expected_cache_key(cfg) == meta["cache_key"] == expected_cache_key(dataclasses.replace(cfg, dtype="float32"))
    assert expected_cache_key(dataclasses.replace(cfg, dtype="bfloat16")) != meta["cache_key"]


def test_reusing_the_store_with_another_top_k_names_the_values(phase_one, tiny_teacher, data):
    store, _ = phase_one
    r = invoke("generate-logits", "--teacher", str(tiny_teacher), "--data", str(data), "--out", str(store),
               *GEN_FLAGS, "--top-k", "2")
    assert r.exit_code != 0 and "codec.top_k: 4 -> 2" in r.output, r.output


def test_inspect_says_how_the_entropy_is_estimated(phase_one):
    store, _ = phase_one
    r = invoke("inspect", str(store), "--json")
    rep = json.loads(r.output)
    assert 0 <= rep["teacher_entropy_nats"] <= rep["teacher_entropy_nats_upper"]
    assert "tail" in rep["teacher_entropy_how"]
    text = invoke("inspect", str(store)).output
    assert "kept entries + tail: tail as one category .. spread evenly over the other ids" in text


def test_broken_jsonl_names_the_same_line_in_phase_one_and_evaluate(tmp_path, tiny_teacher):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps({"id": f"d{i}", "text": t, "summary": "s"}) for i, t in enumerate(DOCS[:3])]
    broken = '{"id": "d3", "text": "cut off'
    bad.write_text("\n".join(rows) + "\n" + broken + "\n")
    try:
        json.loads(broken)
    except json.JSONDecodeError as e:
        parser = str(e)  # the parser's whole message, e.g. "Unterminated string starting at: line 1 column 22 (char 21)"
    r1 = invoke("generate-logits", "--teacher", str(tiny_teacher), "--data", str(bad), "--out", str(tmp_path / "s"))
    r2 = invoke("evaluate", "--model", str(tiny_teacher), "--data", str(bad), "--out", str(tmp_path / "r"), "--split", "")
    for r in (r1, r2):
        assert r.exit_code != 0 and f"line 4 is not valid JSON ({parser})" in r.output, r.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_evaluate_with_a_missing_store_refuses_before_any_engine(tmp_path, tiny_teacher, data):
    r = invoke("evaluate", "--model", str(tiny_teacher), "--data", str(data), "--out", str(tmp_path / "r"),
               "--split", "", "--store", str(tmp_path / "no-store"))
    assert r.exit_code != 0 and str(tmp_path / "no-store") in r.output
    assert not (tmp_path / "r").exists()  # no report folder, no engine log: nothing started


def test_refused_train_student_leaves_no_run_dir(tmp_path, tiny_teacher):
    out = tmp_path / "run"
    r = invoke("train-student", "--student", str(tiny_teacher), "--store", str(tmp_path / "missing"), "--out", str(out))
    assert r.exit_code != 0 and str(tmp_path / "missing") in r.output
    assert not out.exists()


def test_resume_says_where_it_continues_and_what_changed_steps_do(phase_one, tmp_path, tiny_teacher):
    store, _ = phase_one
    out = tmp_path / "run"
    base = ["train-student", "--student", str(tiny_teacher), "--store", str(store), "--out", str(out),
            "--tokens-per-batch", "512", "--save-every", "1", "--lr", "1e-3", "--warmup-steps", "0"]
    assert invoke(*base, "--steps", "2").exit_code == 0
    r = invoke(*base, "--steps", "4", "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming {out} from checkpoint-2 (step 2 of 4)" in r.output
    assert "--steps changed 2 -> 4: the cosine schedule is rebuilt for 4 steps" in r.output
    assert "pass --steps 2 to keep the old schedule" in r.output


def test_a_complete_chain_says_why_each_step_is_skipped(phase_one, tmp_path, tiny_teacher, data):
    """`kdpipe run` ends with where things are; `submit --dry-run` prints the plan, the skip reasons and how to rerun."""
    from kdpipe.jobs.plan import make_plan
    from kdpipe.jobs.spec import load_job

    store, _ = phase_one
    job = tmp_path / "job.toml"
    job.write_text(f"""name = "newcomer"
run_dir = "{tmp_path / 'chain'}"
[teacher]
model = "{tiny_teacher}"
max_model_len = 256
enforce_eager = true
dtype = "auto"
[data]
dataset = "{data}"
id_field = "id"
[generation]
k = 4
max_new_tokens = 8
store = "{store}"
[[students]]
name = "s"
model = "{tiny_teacher}"
steps = 1
tokens_per_batch = 512
save_every = 0
gpus = 0
""")
    plan = make_plan(load_job(job))
    assert plan.store.status == "finalized" and [s.kind for s in plan.steps] == ["train"]  # the store is reused
    cfg = tmp_path / "train.toml"
    cfg.write_text(plan.steps[0].config_text)
    # the chain's one step, done here as write_configs prepares it: the run's folder exists (resume = true)
    (tmp_path / "chain" / "runs" / "s").mkdir(parents=True)
    r = invoke("train-student", "--config", str(cfg))
    assert r.exit_code == 0, r.output

    r = invoke("submit", str(job), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "0 job(s) would be submitted" in r.output
    assert "generate + finalize: skipped" in r.output and "skipped train-s:" in r.output
    assert f"to rerun a skipped step, remove its output: generate + finalize: delete or move the store {store}" in r.output
    assert f"train-s: delete {tmp_path / 'chain' / 'runs' / 's' / 'final'}" in r.output

    r = invoke("run", str(job))
    assert r.exit_code == 0, r.output
    tail = r.output.splitlines()[-4:]
    assert tail[0] == "done: job newcomer" and tail[1].split() == ["store", str(store)]
    assert tail[2].split()[:3] == ["run", "s:", str(tmp_path / "chain" / "runs" / "s")]
    assert tail[3].startswith("  logs")
