"""A 2-round on-policy chain through a REAL one-node Slurm (munge + slurmctld + slurmd).

Checks: every job completed; the afterok links (round 2's generate after round 1's train,
finalize after its array, train after finalize) are in the scripts and held in time; status
shows the rounds; a resubmission skips the finished rounds and submits nothing; a lost round 2
resumes alone, from its finalized store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from kdtest import IN_CI
from onpolicy_helpers import job_doc, write_docs

from kdpipe.jobs.plan import make_plan
from kdpipe.jobs.spec import load_job
from kdpipe.jobs.status import collect_status, format_status
from kdpipe.jobs.submit import submit_plan

pytestmark = pytest.mark.slurm
STEPS = ["onpolicy-r1-generate", "onpolicy-r1-finalize", "onpolicy-r1-train",
         "onpolicy-r2-generate", "onpolicy-r2-finalize", "onpolicy-r2-train"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import SlurmCluster, missing_programs

    why = "apt-get install slurmctld slurmd slurm-client munge (.ci/run does), as root"
    if missing_programs() or os.geteuid() != 0:
        if IN_CI:
            pytest.fail(f"Slurm is required in CI: {why}")
        pytest.skip(f"Slurm not available: {why}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm-op"))
    c.start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)
    try:
        yield c
    finally:
        c.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def chain(cluster, tmp_path_factory, tiny_teacher, tiny_student):
    base = tmp_path_factory.mktemp("op-slurm")
    prompts = write_docs(base / "prompts.jsonl", 4, seed=9)
    doc = job_doc(tiny_teacher, tiny_student, prompts)
    doc["slurm"]["time"] = {"generate": "00:15:00", "finalize": "00:05:00", "train": "00:15:00"}
    job = base / "op.toml"
    job.write_text(tomli_w.dumps(doc))
    kdpipe = shutil.which("kdpipe", path=os.path.dirname(sys.executable))
    r = subprocess.run([kdpipe, "submit", str(job)], capture_output=True, text=True, cwd=base, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = base / "run"
    sub = json.loads((run_dir / "submission.json").read_text())
    ids = {j["step"]: j["job_id"] for j in sub["jobs"]}
    infos = cluster.wait(list(ids.values()), timeout=840)
    return base, job, run_dir, sub, ids, infos


def test_every_round_completed_with_its_afterok_links(chain):
    base, job, run_dir, sub, ids, infos = chain
    assert list(ids) == STEPS
    bad = {s: r["JobState"] for s, i in ids.items() for r in infos[i] if r["JobState"] != "COMPLETED"}
    assert not bad, f"{bad}\n" + "\n".join(p.read_text()[-2000:] for p in (run_dir / "logs").glob("*.out"))
    links = {"onpolicy-r1-finalize": "onpolicy-r1-generate", "onpolicy-r1-train": "onpolicy-r1-finalize",
             "onpolicy-r2-generate": "onpolicy-r1-train", "onpolicy-r2-finalize": "onpolicy-r2-generate",
             "onpolicy-r2-train": "onpolicy-r2-finalize"}
    start = {s: min(r["StartTime"] for r in infos[i]) for s, i in ids.items()}
    end = {s: max(r["EndTime"] for r in infos[i]) for s, i in ids.items()}
    for step, before in links.items():
        script = (run_dir / "scripts" / f"{step}.sbatch").read_text()
        assert f"#SBATCH --dependency=afterok:{ids[before]}" in script, step
        assert start[step] >= end[before], f"{step} started before {before} ended"
    assert "--dependency" not in (run_dir / "scripts" / "onpolicy-r1-generate.sbatch").read_text()
    for r in (1, 2):
        assert (run_dir / "onpolicy" / f"round-{r}" / "run" / "final" / "config.json").is_file()


def test_status_shows_rounds_and_resubmission_skips_them(chain):
    base, job, run_dir, sub, ids, infos = chain
    st = collect_status(run_dir)
    assert [r["state"] for r in st["rounds"]] == ["done", "done"]
    text = format_status(st)
    assert "round 1: done" in text and "round 2: done" in text
    plan = make_plan(load_job(job))
    assert plan.steps == () and [r.state for r in plan.rounds] == ["done", "done"]
    out: list[str] = []
    assert submit_plan(plan, echo=out.append) == {}
    assert "nothing to submit" in out[0] and "round 2 done" in out[0]


def test_replan_after_a_lost_round_resumes_only_that_round(chain):
    base, job, run_dir, sub, ids, infos = chain
    r2 = run_dir / "onpolicy" / "round-2" / "run"
    shutil.move(r2 / "final", base / "final-r2")  # e.g. preempted before RUN/final was written
    try:
        plan = make_plan(load_job(job))
        assert [s.name for s in plan.steps] == ["onpolicy-r2-train"]  # its store is reused
        assert plan.step("onpolicy-r2-train").after == ()
        assert [r.state for r in plan.rounds] == ["done", "store reused"]
    finally:
        shutil.move(base / "final-r2", r2 / "final")
