"""On-policy rounds as a job chain: `kdpipe check` prints it (2 rounds, links), `kdpipe run`
executes a 1-round chain locally (HF reference engine: no engine start per step), and the bad
inputs of the issue are refused with clear errors. test_onpolicy_slurm.py runs 2 rounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from onpolicy_helpers import job_doc, read_records, write_docs, write_job

from kdpipe.jobs.plan import describe, make_plan
from kdpipe.jobs.spec import load_job
from kdpipe.storage.errors import ConfigError

ROUNDS = 2  # onpolicy_helpers.job_doc's rounds


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 4, seed=7)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_teacher, tiny_student, prompts):
    base = tmp_path_factory.mktemp("opjob")
    job = write_job(base, job_doc(tiny_teacher, tiny_student, prompts, rounds=1))
    kdpipe = [sys.executable, "-m", "kdpipe.pipeline.cli"]
    r = subprocess.run(kdpipe + ["run", str(job)], capture_output=True, text=True, timeout=900, cwd=base)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return base, job, r.stdout


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


def test_local_run_executes_the_round_and_status_shows_it(ran):
    """`kdpipe run` of a 1-round chain (test_onpolicy_slurm.py runs 2 rounds and the re-plans)."""
    base, job, stdout = ran
    rd = base / "run"
    # the closing summary names the round's run (paths relative to where `kdpipe run` ran: base)
    assert "run      onpolicy-r1: run/onpolicy/round-1/run  (student: run/onpolicy/round-1/run/final)" in stdout, stdout
    run = rd / "onpolicy" / "round-1" / "run"
    assert (run / "final" / "config.json").is_file()
    assert len(read_records(rd / "onpolicy" / "round-1" / "store")) == 4 * 2
    assert 'resolved to "reverse_kl"' in (run / "train_config.toml").read_text()  # divergence auto, on-policy store
    st = json.loads((rd / "run.json").read_text())
    assert [x["round"] for x in st["on_policy"]] == [1]
    out = subprocess.run([sys.executable, "-m", "kdpipe.pipeline.cli", "status", str(rd)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "round 1: done" in out.stdout, out.stdout + out.stderr
    plan = make_plan(load_job(job))
    assert plan.steps == () and [r.state for r in plan.rounds] == ["done"]


def test_evaluation_after_the_last_round_or_every_round(tmp_path, tiny_teacher, tiny_student, prompts):
    doc = job_doc(tiny_teacher, tiny_student, prompts)
    doc["evaluation"] = {"data": str(prompts), "text_field": "text", "max_samples": 2, "similarity_model": "none"}
    plan = make_plan(load_job(write_job(tmp_path / "a", doc)))
    assert [s.name for s in plan.steps][-1] == "onpolicy-r2-evaluate"
    ev = plan.step("onpolicy-r2-evaluate")
    assert ev.after == ("onpolicy-r2-train",) and "round-2/store" in ev.config_text
    doc["on_policy"]["evaluate_every_round"] = True
    plan = make_plan(load_job(write_job(tmp_path / "b", doc)))
    assert plan.step("onpolicy-r1-evaluate").after == ("onpolicy-r1-train",)


def test_run_summary_lists_every_round_by_name(tmp_path, tiny_teacher, tiny_student, prompts, monkeypatch):
    """`kdpipe run`'s closing summary: every round's store, student and report under the round's name
    (the report names the round's model onpolicy-rN, not its folder "run"); paths without `..`."""
    from kdpipe.jobs.command import outputs_summary

    doc = job_doc(tiny_teacher, tiny_student, prompts)
    doc["evaluation"] = {"data": str(prompts), "text_field": "text", "max_samples": 2, "similarity_model": "none"}
    doc["run_dir"] = "../job-run"
    job = write_job(tmp_path / "jobs", doc)
    plan = make_plan(load_job(tmp_path / "jobs" / ".." / "jobs" / job.name))
    assert 'names = [' in plan.step("onpolicy-r2-evaluate").config_text
    assert '"onpolicy-r2"' in plan.step("onpolicy-r2-evaluate").config_text
    report = tmp_path / "job-run" / "onpolicy" / "round-2" / "run" / "eval" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# report\n")
    monkeypatch.chdir(tmp_path)
    text = outputs_summary(plan)
    assert "/../" not in text and "store    " not in text, text  # an on-policy-only job has no off-policy store
    for r in (1, 2):
        assert f"round {r}  store job-run/onpolicy/round-{r}/store" in text
        assert (f"run      onpolicy-r{r}: job-run/onpolicy/round-{r}/run  (student: job-run/onpolicy/round-{r}/run/final)"
                in text), text
    assert "report   onpolicy-r2: job-run/onpolicy/round-2/run/eval/report.md" in text
    assert "logs     job-run/logs" in text


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
