"""`kdpipe run`: the tiny chain runs locally (real teacher pass, finalize, student training) from
a directory whose name is hostile; then the store left behind drives reuse and resume plans."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kdpipe.jobs.plan import make_plan
from kdpipe.jobs.spec import load_job
from kdpipe.jobs.status import collect_status, format_status
from kdpipe.jobs.submit import render_step
from kdpipe.storage import open_store
from kdpipe.storage.errors import ConfigError

from jobs_helpers import tiny_job_text

pytestmark = pytest.mark.slow  # a real teacher pass and student training (~2 min on 2 cores)

HOSTILE_DIR = "job $(touch PWNED-L1) `touch PWNED-L2`; it's"


def _kdpipe() -> str:
    return shutil.which("kdpipe", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_teacher, vllm_student, tiny_data):
    root = tmp_path_factory.mktemp("local")
    base = root / HOSTILE_DIR
    (base / "models").mkdir(parents=True)
    os.symlink(tiny_teacher, base / "models" / "teacher $(x)")
    os.symlink(vllm_student, base / "models" / "student `y`")
    shutil.copy(tiny_data, base / "docs; rm -rf x.jsonl")
    job_file = base / "job.toml"
    job_file.write_text(tiny_job_text("models/teacher $(x)", "models/student `y`", "docs; rm -rf x.jsonl",
                                      store="store $(touch PWNED-L3)"))
    r = subprocess.run([_kdpipe(), "run", str(job_file)], capture_output=True, text=True, cwd=root, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return root, base, job_file, r.stdout


def test_local_run_completes_the_chain(local_run):
    root, base, job_file, out = local_run
    for line in ("generate task 0", "generate task 1", "finalize", "train-s"):
        assert f"ok  {line}" in out
    store = base / "store $(touch PWNED-L3)"
    m = open_store(store)
    assert m.num_sequences == 8
    run = base / "runs" / "tiny" / "runs" / "s"
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert metrics and metrics[-1]["step"] == 2
    assert (run / "final").is_dir()
    summary = json.loads((base / "runs" / "tiny" / "run.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["generate", "generate", "finalize", "train-s"]
    assert not list(root.rglob("PWNED-*"))
    st = collect_status(base / "runs" / "tiny")
    assert st["runs"][0]["last_metrics"]["step"] == 2
    assert "run s:" in format_status(st)


def test_events_are_in_order(local_run):
    _, base, _, _ = local_run
    events = [ln.split() for ln in (base / "runs" / "tiny" / "events.log").read_text().splitlines()]
    kinds = [(e[1], e[2]) for e in events]
    assert kinds == [("start", "generate"), ("exit", "generate")] * 2 + [("start", "finalize"), ("exit", "finalize"), ("start", "train"), ("exit", "train")]
    assert all(e[-1] == "0" for e in events if e[1] == "exit")


def test_rerun_skips_finished_work(local_run):
    _, base, job_file, _ = local_run
    plan = make_plan(load_job(job_file))
    # The store is finalized with the same key, and the run's final/ holds the same config.
    assert plan.store.status == "finalized" and plan.store.expected_key == plan.store.cache_key
    assert plan.steps == () and len(plan.skipped) == 1 and plan.skipped[0].startswith("train-s:")
    # A changed student setting trains again on the reused store, with nothing to wait for.
    changed = base / "job-more-steps.toml"
    changed.write_text(job_file.read_text().replace("steps = 2", "steps = 3"))
    plan = make_plan(load_job(changed))
    assert [s.name for s in plan.steps] == ["train-s"] and plan.steps[0].after == ()
    assert "resume = true" in plan.steps[0].config_text  # an interrupted run continues


def test_incomplete_store_runs_only_missing_tasks(local_run, tmp_path):
    _, base, job_file, _ = local_run
    copy = tmp_path / "job"
    shutil.copytree(base, copy, symlinks=True)
    store = copy / "store $(touch PWNED-L3)"
    (store / "manifest.json").unlink()
    (store / "tasks" / "task-00001.json").unlink()
    plan = make_plan(load_job(copy / "job.toml"))
    assert plan.store.status == "partial" and plan.store.done_tasks == (0,)
    assert plan.step("generate").tasks == (1,)
    assert plan.step("finalize").after == ("generate",)
    assert "--task-index" in plan.step("generate").argv
    script = render_step(plan, plan.step("generate"), [])
    assert "#SBATCH --array=1\n" in script  # only the missing task is resubmitted


def test_store_with_another_cache_key_is_refused(local_run, tmp_path):
    _, base, job_file, _ = local_run
    changed = tmp_path / "job.toml"
    # Same store, but k = 3: other targets, so another cache key.
    text = job_file.read_text().replace("k = 4", "k = 3")
    for key in ("store = \"", "model = \"", "dataset = \""):  # relative paths: make them point at `base`
        text = text.replace(key, f"{key}{base}/")
    changed.write_text(text)
    with pytest.raises(ConfigError) as e:
        make_plan(load_job(changed, run_dir=tmp_path / "run"))
    msg = str(e.value)
    assert "cache key" in msg and "new directory" in msg
    assert "this job's teacher/data/recipe/codec settings give cache key" in msg  # the key was computed
    assert not (tmp_path / "run").exists()
