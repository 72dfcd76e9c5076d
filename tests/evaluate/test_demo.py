"""`kdpipe demo --budget small` end to end on the Debian corpus: tiny teacher trained on every
training pair, phase one under vLLM, students sft_ref / seqkd / kd on a small transfer set through
the jobs layer, evaluation; a quiet terminal, the report's sections, the teacher visibly above every student."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kdtest import require, run_in_lane

# ~7 min on a quiet 2-core machine (the teacher's 1,000 steps are half of it), started in the session's background
# lane when collection ends (tests/conftest.py); the timeout gives the demo room on a loaded machine.
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(3000)]


def run_demo(root: Path):
    """`kdpipe demo --budget small` into root/demo-output (the session's BackgroundLane runs it)."""
    require("vllm", "the demo runs phase one and evaluation under vLLM")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = root / "demo-output"
    r = run_in_lane([sys.executable, "-m", "kdpipe.pipeline.cli", "demo", "--budget", "small", "--out", str(out)],
                    timeout=3000, capture_output=True, text=True, env=env)
    return out, r


BACKGROUND_JOB = run_demo


@pytest.fixture(scope="module")
def demo_out(background_job):
    """The demo's output (tests/conftest.py started it when collection ended and orders these tests last)."""
    out, r = background_job
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return out, r.stdout, r.stderr


def test_demo_prints_headline_sentence_and_report_path(demo_out):
    out, stdout, stderr = demo_out
    assert "| teacher | teacher |" in stdout
    for name in ("sft_ref", "seqkd", "kd"):
        assert f"| {name} |" in stdout
    assert "benchmarks/bench_quality.py" in stdout and "is the measured claim" in stdout
    assert str(out / "report" / "report.md") in stdout


def test_demo_terminal_is_quiet(demo_out):
    out, _, stderr = demo_out
    # Engine output goes to the steps' log files, not the terminal: one line per stage and step.
    assert "INFO" not in stderr and "Warning" not in stderr, stderr[:3000]
    assert len(stderr.splitlines()) < 40, stderr
    for n in range(1, 6):
        assert f"[{n}/5]" in stderr
    assert (out / "job" / "logs" / "generate-0.log").stat().st_size > 0
    assert (out / "logs" / "evaluate.log").stat().st_size > 0


def test_demo_wrote_the_job_files_stores_and_runs(demo_out):
    out, _, _ = demo_out
    assert (out / "demo-job.toml").is_file() and (out / "demo-ref-job.toml").is_file()
    assert (out / "store" / "manifest.json").is_file() and (out / "store-ref" / "manifest.json").is_file()
    for job, run in (("job", "seqkd"), ("job", "kd"), ("job-ref", "sft_ref")):
        run_dir = out / job / "runs" / run
        assert (run_dir / "final" / "config.json").is_file()
        assert (run_dir / "metrics.jsonl").is_file()
    # The students saw a small transfer set; the teacher every training pair.
    n_transfer = sum(1 for _ in open(out / "data" / "transfer.jsonl"))
    n_train = sum(1 for _ in open(out / "data" / "train.jsonl"))
    assert n_transfer * 10 <= n_train


def test_demo_report_has_every_section_and_the_teacher_leads(demo_out):
    out, _, _ = demo_out
    rep = json.loads((out / "report" / "report.json").read_text())
    assert [m["name"] for m in rep["models"]] == ["teacher", "sft_ref", "seqkd", "kd"]
    assert [m["role"] for m in rep["models"]] == ["teacher", "baseline", "student", "student"]
    assert rep["baseline"] == "sft_ref"
    kd = rep["models"][3]
    assert "vs_baseline" in kd and "rougeL" in kd["vs_baseline"]["difference_ci"]
    assert "retention_vs_teacher_pct" in kd and "speedup_vs_teacher" in kd
    assert len(rep["stores"]) == 2 and all(s["cache_key"] for s in rep["stores"])
    assert set(rep["runs"]) == {"sft_ref", "seqkd", "kd"} and all(r["curve"] for r in rep["runs"].values())
    # The teacher is worth distilling: it beats the student that never saw it (sft_ref) on ROUGE-L,
    # and it gives the human references a lower NLL than every student does.
    rouge = {m["name"]: m["quality"]["rougeL"]["mean"] for m in rep["models"]}
    nll = {m["name"]: m["reference"]["nll_ref"]["mean"] for m in rep["models"]}
    assert rouge["teacher"] > rouge["sft_ref"], rouge
    assert all(nll["teacher"] < nll[s] for s in ("sft_ref", "seqkd", "kd")), nll
    md = (out / "report" / "report.md").read_text()
    for h in ("## Headline", "## Quality", "## Latency", "## Retention", "## Against the CE-only baseline", "## Stores and runs", "## Plots"):
        assert h in md
    for png in ("metrics.png", "latency.png", "loss.png"):
        assert (out / "report" / png).stat().st_size > 1000


def test_demo_teacher_rouge_is_visibly_above_every_student(demo_out):
    # Issue 10 §6: the teacher must visibly beat the students, not trail them. Measured at this budget:
    # teacher 0.210 vs best student (seqkd) 0.134 on 48 documents; earlier runs of one setting differed by
    # up to 0.016 in the teacher's ROUGE-L.
    out, _, _ = demo_out
    rep = json.loads((out / "report" / "report.json").read_text())
    rouge = {m["name"]: m["quality"]["rougeL"]["mean"] for m in rep["models"]}
    assert all(rouge["teacher"] > rouge[s] + 0.02 for s in ("sft_ref", "seqkd", "kd")), rouge
