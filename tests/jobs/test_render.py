"""Rendered sbatch scripts of the shipped examples say what the templates promise, and submit
chains them by job id (an `sbatch` stand-in records what it was given; the real Slurm chain is in
test_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kdpipe.jobs.plan import make_plan
from kdpipe.jobs.render import placeholders, template_text
from kdpipe.jobs.spec import load_job
from kdpipe.jobs.submit import SubmitError, render_all, submit_plan

from jobs_helpers import EXAMPLES, with_local_models

SHIPPED = sorted(EXAMPLES.glob("*.toml"))


def sbatch_lines(script: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M):
        out.setdefault(m.group(1), []).append(m.group(2) or "")
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_rendered_scripts_match_the_plan(path, tmp_path):
    job = load_job(with_local_models(path, tmp_path), run_dir=tmp_path / "run")
    plan = make_plan(job)
    scripts = dict((s.name, (s, text)) for s, text in render_all(plan))
    for name, (step, text) in scripts.items():
        opts = sbatch_lines(text)
        assert opts["job-name"] == [f"{job.name}-{name}"]
        assert opts["cpus-per-task"] == [str(job.slurm.cpus_per_task)]
        if step.kind in job.slurm.time:
            assert opts["time"] == [job.slurm.time[step.kind]]
        assert opts.get("dependency", []) == ([f"afterok:{':'.join(f'<{a}>' for a in step.after)}"] if step.after else [])
        assert text.startswith("#!/bin/bash\n")
        for line in job.slurm.setup:
            assert line in text
        r = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr

    gen_step, gen = scripts["generate"]
    opts = sbatch_lines(gen)
    n = job.generation.num_tasks
    assert opts["array"] == [f"0-{n - 1}" if n > 1 else "0"]
    if job.slurm.gpus_per_node:
        assert opts["gpus-per-node"] == [str(job.teacher.tensor_parallel_size)]
    else:  # CPU-only nodes: no GPU request at all
        assert "gpus-per-node" not in opts
    assert opts["nodes"] == ["1"]
    assert '--task-index "$SLURM_ARRAY_TASK_ID"' in gen
    assert sbatch_lines(scripts["finalize"][1])["dependency"] == ["afterok:<generate>"]
    assert f"--num-tasks {job.generation.num_tasks}" in scripts["finalize"][1]

    for run in plan.runs:
        step, text = scripts[f"train-{run.name}"]
        opts = sbatch_lines(text)
        assert opts["dependency"] == ["afterok:<finalize>"]
        assert opts["nodes"] == [str(run.nodes)]
        assert opts.get("gpus-per-node") == ([str(run.gpus)] if run.gpus else None)
        if run.nodes * run.procs_per_node > 1:
            # one torchrun per node via srun, rendezvous on the first node of the allocation
            assert f"srun --nodes={run.nodes} --ntasks-per-node=1" in text
            assert f"--nnodes={run.nodes} --nproc-per-node={run.procs_per_node}" in text
            assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
            assert f"rdzv_port=$(( {job.slurm.rdzv_port} + SLURM_JOB_ID % 1000 ))" in text
            assert '--rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="$SLURM_JOB_ID"' in text
        else:
            assert "srun --" not in text and "torch.distributed.run" not in text
        assert "train-student --config" in text
        if job.evaluation is not None:
            _, etext = scripts[f"evaluate-{run.name}"]
            eopts = sbatch_lines(etext)
            assert eopts["dependency"] == [f"afterok:<train-{run.name}>"]
            assert eopts["gpus-per-node"] == [str(job.evaluation["tensor_parallel_size"])]


def test_every_template_placeholder_is_known():
    # render() refuses unfilled or unused placeholders; this pins the template contract.
    for name in ("generate", "finalize", "train", "evaluate"):
        ph = placeholders(template_text(name))
        assert {"job_name", "sbatch_lines", "setup", "events", "base_dir", "log_pattern"} <= ph


def fake_sbatch(tmp_path: Path, fail_on_call: int | None = None, message: str = "") -> Path:
    """A stand-in `sbatch --parsable` printing ids 101, 102, ...; call N fails with `message`."""
    state = tmp_path / "fake-sbatch-calls.jsonl"
    script = tmp_path / "sbatch"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"state = {str(state)!r}\n"
        "calls = open(state).read().splitlines() if __import__('os').path.exists(state) else []\n"
        "n = len(calls) + 1\n"
        f"if n == {fail_on_call!r}:\n"
        f"    sys.stderr.write({message!r} + '\\n'); sys.exit(1)\n"
        "open(state, 'a').write(json.dumps({'argv': sys.argv[1:], 'cwd': __import__('os').getcwd()}) + '\\n')\n"
        "print(100 + n)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_submit_chains_real_job_ids(tmp_path):
    plan = make_plan(load_job(EXAMPLES / "llama-3.1-70b-to-8b.toml", run_dir=tmp_path / "run"))
    sb = fake_sbatch(tmp_path)
    ids = submit_plan(plan, sbatch=str(sb), echo=lambda s: None)
    order = [s.name for s in plan.steps]
    assert list(ids) == order and ids["generate"] == "101" and ids["finalize"] == "102"
    run_dir = tmp_path / "run"
    for step in plan.steps:
        text = (run_dir / "scripts" / f"{step.name}.sbatch").read_text()
        deps = sbatch_lines(text).get("dependency", [])
        assert deps == ([f"afterok:{':'.join(ids[a] for a in step.after)}"] if step.after else [])
    sub = json.loads((run_dir / "submission.json").read_text())
    assert sub["complete"] is True
    assert {j["step"]: j["job_id"] for j in sub["jobs"]} == ids
    assert (run_dir / "configs" / "generate.toml").exists()
    assert (run_dir / "configs" / "job.toml").read_text() == (EXAMPLES / "llama-3.1-70b-to-8b.toml").read_text()
    assert "array 16 task(s) [0-15] of 16" in (run_dir / "configs" / "plan.txt").read_text()
    calls = [json.loads(ln) for ln in (tmp_path / "fake-sbatch-calls.jsonl").read_text().splitlines()]
    assert all(c["argv"][0] == "--parsable" and c["cwd"] == str(run_dir / "logs") for c in calls)


def test_sbatch_refusing_midway_says_which_jobs_exist(tmp_path):
    plan = make_plan(load_job(EXAMPLES / "llama-3.1-70b-to-8b.toml", run_dir=tmp_path / "run"))
    sb = fake_sbatch(tmp_path, fail_on_call=3, message="sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified")
    with pytest.raises(SubmitError) as e:
        submit_plan(plan, sbatch=str(sb), echo=lambda s: None)
    msg = str(e.value)
    assert "Invalid account or account/partition combination" in msg  # sbatch's own message
    assert "generate=101" in msg and "finalize=102" in msg and "scancel 101 102" in msg
    sub = json.loads((tmp_path / "run" / "submission.json").read_text())
    assert sub["complete"] is False and [j["job_id"] for j in sub["jobs"]] == ["101", "102"]
    assert "Invalid account" in sub["error"]


def test_sbatch_missing(tmp_path):
    plan = make_plan(load_job(EXAMPLES / "gemma-2-27b-to-2b.toml", run_dir=tmp_path / "run"))
    with pytest.raises(SubmitError) as e:
        submit_plan(plan, sbatch=str(tmp_path / "no-such-sbatch"), echo=lambda s: None)
    assert "not found" in str(e.value) and "Nothing was submitted" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_dry_run_writes_and_submits_nothing(tmp_path):
    out: list[str] = []
    plan = make_plan(load_job(EXAMPLES / "qwen2.5-72b-to-7b.toml", run_dir=tmp_path / "run"))
    assert submit_plan(plan, dry_run=True, sbatch=str(tmp_path / "no-such-sbatch"), echo=out.append) == {}
    text = "\n".join(out)
    assert text.count("#!/bin/bash") == len(plan.steps)
    assert not (tmp_path / "run").exists()


def test_cli_check_and_dry_run(tmp_path):
    kdpipe = shutil.which("kdpipe", path=os.path.dirname(sys.executable))
    r = subprocess.run([kdpipe, "check", str(EXAMPLES / "basic-reading.toml"), "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "array 8 task(s) [0-7] of 8" in r.stdout
    r = subprocess.run([kdpipe, "submit", "--dry-run", str(EXAMPLES / "basic-reading.toml"), "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "#SBATCH --array=0-7" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text((EXAMPLES / "basic-reading.toml").read_text().replace("[slurm]", "[slurm]\npartiton = \"x\""))
    r = subprocess.run([kdpipe, "check", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "did you mean 'partition'" in r.stderr and "Traceback" not in r.stderr
