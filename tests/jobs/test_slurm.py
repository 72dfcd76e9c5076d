"""The demo job, at a tiny budget, through a REAL one-node Slurm (munge + slurmctld + slurmd).

Checks: the generation array ran its tasks; finalize started after every task ended; each
student after finalize; each evaluation after its student; the store and the reports exist; a
second submission reuses the finalized store (students only); sbatch refusing a script shows
its message. The job lives in a directory whose name is hostile to shells.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from kdpipe.jobs.plan import make_plan
from kdpipe.jobs.spec import load_job
from kdpipe.jobs.status import collect_status, format_status
from kdpipe.jobs.submit import SubmitError, submit_plan
from kdpipe.storage import open_store

from jobs_helpers import EXAMPLES

pytestmark = pytest.mark.slurm

HOSTILE_DIR = "slurm job $(touch PWNED-S1) `touch PWNED-S2`; it's"


def tiny_demo_job(base: Path, teacher: Path, student: Path, data: Path, evaluation: bool) -> dict:
    """jobs/examples/demo.toml with this test's tiny models and a tiny budget."""
    job = tomllib.loads((EXAMPLES / "demo.toml").read_text())
    job["run_dir"] = "run"
    job["teacher"].update(model=str(teacher), max_model_len=256, engine="hf")  # HF engine: no 40 s vLLM start per task
    job["data"].update(dataset=str(data), limit=8)
    job["generation"].update(num_tasks=2, store="store $(touch PWNED-S3)", k=4, max_new_tokens=6, progress=False)
    for s in job["students"]:
        s.update(model=str(student), steps=2, tokens_per_batch=256)
        s["optimizer"] = dict(s.get("optimizer", {}), warmup_steps=0)
    job["slurm"] = dict(job.get("slurm", {}), cpus_per_task=1, mem="1G")  # two array tasks side by side on 2 cores
    job["slurm"]["time"] = {"generate": "00:15:00", "finalize": "00:05:00", "train": "00:15:00", "evaluate": "00:20:00"}
    if evaluation:
        job["evaluation"] = {
            "data": str(data), "max_samples": 2, "max_new_tokens": 6, "max_model_len": 256,
            "similarity_model": "none", "bootstrap_samples": 100, "plots": False, "warmup_requests": 0,
            "runs": ["kd"],  # one evaluation keeps the budget small (each starts two vLLM engines)
        }
    else:
        job.pop("evaluation", None)
    return job


def events(run_dir: Path) -> list[tuple[float, str, str, str, str | None]]:
    out = []
    for ln in (run_dir / "events.log").read_text().splitlines():
        p = ln.split()
        out.append((float(p[0]), p[1], p[2], p[3], p[4] if len(p) > 4 else None))
    return out


def times(ev, what: str, kind: str, task: str | None = None) -> list[float]:
    return [e[0] for e in ev if e[1] == what and e[2] == kind and (task is None or e[3] == task)]


@pytest.fixture(scope="module")
def chain(slurm_cluster, tmp_path_factory, tiny_teacher, vllm_student, tiny_data):
    root = tmp_path_factory.mktemp("slurmjob")
    base = root / HOSTILE_DIR
    base.mkdir()
    job_file = base / "demo.toml"
    job_file.write_text(tomli_w.dumps(tiny_demo_job(base, tiny_teacher, vllm_student, tiny_data, evaluation=True)))
    kdpipe = shutil.which("kdpipe", path=os.path.dirname(sys.executable))
    r = subprocess.run([kdpipe, "submit", str(job_file)], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = base / "run"
    sub = json.loads((run_dir / "submission.json").read_text())
    ids = {j["step"]: j["job_id"] for j in sub["jobs"]}
    # Submitting the same run dir again while the chain is queued is refused, naming the jobs.
    again = subprocess.run([kdpipe, "submit", str(job_file)], capture_output=True, text=True, cwd=root, timeout=300)
    assert again.returncode != 0 and "still queued or running" in again.stderr and ids["generate"] in again.stderr
    infos = slurm_cluster.wait(list(ids.values()), timeout=840)  # below pytest-timeout (900 s)
    return root, base, job_file, run_dir, sub, ids, infos


def test_every_job_completed(chain):
    root, base, job_file, run_dir, sub, ids, infos = chain
    assert sub["complete"] is True
    assert list(ids) == ["generate", "finalize", "train-kd", "evaluate-kd", "train-seqkd"]
    logs = run_dir / "logs"
    for step, recs in infos.items():
        bad = [r for r in recs if r["JobState"] != "COMPLETED"]
        assert not bad, f"{step}: {bad}\n" + "\n".join(p.read_text()[-3000:] for p in logs.glob("*.out"))
    assert not list(root.rglob("PWNED-*"))


def test_array_ran_every_task(chain):
    _, base, _, run_dir, sub, ids, infos = chain
    recs = infos[ids["generate"]]
    assert sorted(r["ArrayTaskId"] for r in recs) == ["0", "1"]
    assert sub["jobs"][0]["array"] == "0-1"
    ev = events(run_dir)
    assert sorted(e[3] for e in ev if e[1] == "exit" and e[2] == "generate" and e[4] == "0") == ["0", "1"]
    assert len(list((run_dir / "logs").glob("generate-*_*.out"))) == 2


def test_dependencies_held(chain):
    _, base, _, run_dir, sub, ids, infos = chain
    ev = events(run_dir)
    gen_end = max(times(ev, "exit", "generate"))
    (fin_start,) = times(ev, "start", "finalize")
    (fin_end,) = times(ev, "exit", "finalize")
    assert fin_start >= gen_end, "finalize started before every array task ended"
    for run in ("kd", "seqkd"):
        (t_start,) = times(ev, "start", "train", run)
        assert t_start >= fin_end, f"student {run} started before finalize ended"
    (e_start,) = times(ev, "start", "evaluate", "kd")
    assert e_start >= max(times(ev, "exit", "train", "kd")), "the evaluation started before its run ended"
    # The same order from Slurm's own records (1 s resolution).
    end = {s: max(r["EndTime"] for r in infos[i]) for s, i in ids.items()}
    start = {s: min(r["StartTime"] for r in infos[i]) for s, i in ids.items()}
    assert start["finalize"] >= end["generate"]
    assert start["train-kd"] >= end["finalize"] and start["train-seqkd"] >= end["finalize"]
    assert start["evaluate-kd"] >= end["train-kd"]
    # ... and from the scripts themselves.
    fin_script = (run_dir / "scripts" / "finalize.sbatch").read_text()
    assert f"#SBATCH --dependency=afterok:{ids['generate']}" in fin_script


def test_store_and_reports_exist(chain):
    _, base, _, run_dir, sub, ids, infos = chain
    m = open_store(base / "store $(touch PWNED-S3)")
    assert m.num_sequences == 8
    for run in ("kd", "seqkd"):
        rd = run_dir / "runs" / run
        assert (rd / "final").is_dir()
        assert (rd / "metrics.jsonl").read_text().strip()
    report = json.loads((run_dir / "runs" / "kd" / "eval" / "report.json").read_text())
    assert report and (run_dir / "runs" / "kd" / "eval" / "report.md").exists()


def test_status_reports_the_chain(chain):
    _, base, _, run_dir, sub, ids, infos = chain
    st = collect_status(run_dir)
    assert [j["step"] for j in st["jobs"]] == list(ids)
    assert all(t["state"] == "COMPLETED" for j in st["jobs"] for t in j["tasks"])
    assert len(st["jobs"][0]["tasks"]) == 2
    assert st["store"]["finalized"] and st["store"]["tasks_complete"] == [0, 1]
    assert all(r["last_metrics"] and r["last_metrics"]["step"] == 2 for r in st["runs"])
    text = format_status(st)
    assert "2 COMPLETED" in text and "finalized" in text


def test_second_submission_reuses_the_store(chain, slurm_cluster, tiny_teacher, vllm_student, tiny_data):
    root, base, job_file, run_dir, sub, ids, infos = chain
    job2 = base / "again.toml"
    doc = tiny_demo_job(base, tiny_teacher, vllm_student, tiny_data, evaluation=False)
    doc["run_dir"] = "run-again"
    # kd trains with 2 processes: srun starts torchrun, which meets at the rendezvous on the
    # first node of the allocation (the multi-node path, on one node).
    doc["students"][0]["procs_per_node"] = 2
    job2.write_text(tomli_w.dumps(doc))
    plan = make_plan(load_job(job2))
    assert plan.store.status == "finalized"
    assert plan.store.expected_key == plan.store.cache_key  # checked, not assumed
    new_ids = submit_plan(plan, echo=lambda s: None)
    assert list(new_ids) == ["train-kd", "train-seqkd"]
    sub2 = json.loads((base / "run-again" / "submission.json").read_text())
    assert sub2["store"]["reused"] is True and sub2["store"]["tasks_submitted"] == []
    script = (base / "run-again" / "scripts" / "train-kd.sbatch").read_text()
    assert "--dependency" not in script  # nothing to wait for: the store is final
    assert "srun --nodes=1 --ntasks-per-node=1" in script and "--nproc-per-node=2" in script
    done = slurm_cluster.wait(list(new_ids.values()), timeout=600)
    assert all(r["JobState"] == "COMPLETED" for recs in done.values() for r in recs)
    kd = base / "run-again" / "runs" / "kd"
    assert (kd / "final").is_dir()
    last = json.loads((kd / "metrics.jsonl").read_text().strip().splitlines()[-1])
    assert last["step"] == 2


def test_sbatch_refusal_shows_its_message(chain, tiny_teacher, vllm_student, tiny_data, tmp_path):
    doc = tiny_demo_job(tmp_path, tiny_teacher, vllm_student, tiny_data, evaluation=False)
    doc["slurm"]["partition"] = "nosuchpartition"
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps(doc))
    with pytest.raises(SubmitError) as e:
        submit_plan(make_plan(load_job(job)), echo=lambda s: None)
    msg = str(e.value)
    assert "invalid partition" in msg.lower() and "Nothing was submitted" in msg
