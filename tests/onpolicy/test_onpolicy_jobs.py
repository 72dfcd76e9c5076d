"""On-policy rounds as a job chain: `kdpipe check` prints it, `kdpipe run` executes a 2-round
chain locally (HF reference engine: no engine start per step), a re-plan skips finished rounds
and resumes a half-done one, and the bad inputs of the issue are refused with clear errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from onpolicy_helpers import read_records, write_docs

from kdpipe.jobs.plan import describe, make_plan
from kdpipe.jobs.spec import load_job
from kdpipe.storage.errors import ConfigError

ROUNDS = 2


def job_doc(teacher, student, prompts, **on_policy) -> dict:
    op = {"rounds": ROUNDS, "samples_per_prompt": 2, "temperature": 1.0, "steps_per_round": 2,
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


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 4, seed=7)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_teacher, tiny_student, prompts):
    base = tmp_path_factory.mktemp("opjob")
    job = write_job(base, job_doc(tiny_teacher, tiny_student, prompts))
    kdpipe = [sys.executable, "-m", "kdpipe.pipeline.cli"]
    r = subprocess.run(kdpipe + ["run", str(job)], capture_output=True, text=True, timeout=900, cwd=base)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return base, job


def test_check_prints_the_chain_with_its_links(tmp_path, tiny_teacher, tiny_student, prompts):
    job = write_job(tmp_path, job_doc(tiny_teacher, tiny_student, prompts))
    plan = make_plan(load_job(job))
    names = [s.name for s in plan.steps]
    assert names == ["onpolicy-r1-generate", "onpolicy-r1-finalize", "onpolicy-r1-train",
                     "onpolicy-r2-generate", "onpolicy-r2-finalize", "onpolicy-r2-train"]
    after = {s.name: s.after for s in plan.steps}
    assert after["onpolicy-r1-generate"] == ()
    assert after["onpolicy-r1-finalize"] == ("onpolicy-r1-generate",)
    assert after["onpolicy-r1-train"] == ("onpolicy-r1-finalize",)
    assert after["onpolicy-r2-generate"] == ("onpolicy-r1-train",)  # round 2 samples from round 1's weights
    text = describe(plan)
    assert "on-policy rounds: 2" in text and "round 2: to run" in text
    r2 = plan.step("onpolicy-r2-train").config_text
    assert "fresh AdamW state and learning-rate schedule" in r2 and "round-1/run/final" in r2
    gen2 = plan.step("onpolicy-r2-generate").config_text
    assert 'recipe = "on-policy"' in gen2 and "round-1/run/final" in gen2 and "samples_per_prompt = 2" in gen2
    out = subprocess.run([sys.executable, "-m", "kdpipe.pipeline.cli", "check", str(job)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "round 1: to run" in out.stdout, out.stdout + out.stderr


def test_local_run_executes_every_round(ran):
    base, job = ran
    rd = base / "run"
    for r in range(1, ROUNDS + 1):
        run = rd / "onpolicy" / f"round-{r}" / "run"
        assert (run / "final" / "config.json").is_file()
        recs = read_records(rd / "onpolicy" / f"round-{r}" / "store")
        assert len(recs) == 4 * 2
        head = (run / "train_config.toml").read_text()
        assert 'resolved to "reverse_kl"' in head  # divergence auto on an on-policy store
    from kdpipe.storage import open_store

    m2 = open_store(rd / "onpolicy" / "round-2" / "store").meta
    assert m2.recipe_params["sampler"].endswith("round-1/run/final")
    m1 = open_store(rd / "onpolicy" / "round-1" / "store").meta
    assert m1.recipe_params["sampler_revision"] != m2.recipe_params["sampler_revision"]  # its own cache key
    st = json.loads((rd / "run.json").read_text())
    assert [x["round"] for x in st["on_policy"]] == [1, 2]
    out = subprocess.run([sys.executable, "-m", "kdpipe.pipeline.cli", "status", str(rd)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "round 1: done" in out.stdout and "round 2: done" in out.stdout, out.stdout + out.stderr


def test_replan_skips_finished_rounds_and_resumes_the_rest(ran):
    base, job = ran
    plan = make_plan(load_job(job))
    assert plan.steps == () and [r.state for r in plan.rounds] == ["done", "done"]
    # round 2's training lost (e.g. preempted before final): only its train step runs again
    r2 = base / "run" / "onpolicy" / "round-2" / "run"
    shutil.move(r2 / "final", base / "final-r2")
    try:
        plan = make_plan(load_job(job))
        assert [s.name for s in plan.steps] == ["onpolicy-r2-train"]
        assert plan.step("onpolicy-r2-train").after == ()
        assert [r.state for r in plan.rounds] == ["done", "store reused"]
    finally:
        shutil.move(base / "final-r2", r2 / "final")


def test_bad_inputs_are_refused(tmp_path, tiny_teacher, tiny_student, prompts):
    def plan_of(name, **op):
        return make_plan(load_job(write_job(tmp_path / name, job_doc(tiny_teacher, tiny_student, prompts, **op))))

    with pytest.raises(ConfigError, match=r"start_model: .*does not exist"):
        plan_of("a", start_model="./no/such/model")
    with pytest.raises(ConfigError, match=r"start: no \[\[students\]\] run named 'nobody'"):
        plan_of("b", start_model=None, start="nobody")
    with pytest.raises(ConfigError, match=r"samples_per_prompt: expected an integer >= 1"):
        plan_of("c", samples_per_prompt=0)
    with pytest.raises(ConfigError, match="rounds: expected an integer >= 1"):
        plan_of("d", rounds=0)
    with pytest.raises(ConfigError, match="train.stores: set by the round chain"):
        plan_of("e", train={"stores": ["x"]})
