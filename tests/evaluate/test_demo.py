"""`kdpipe demo --budget small` end to end: tiny teacher trained, phase one under vLLM, KD and CE
students through the jobs layer, evaluation; the report has every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdtest import require

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    require("vllm", "the demo runs phase one and evaluation under vLLM")
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "kdpipe.pipeline.cli", "demo", "--budget", "small", "--out", str(out)],
                       capture_output=True, text=True, timeout=3000, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return out, r.stdout


def test_demo_prints_headline_and_report_path(demo_out):
    out, stdout = demo_out
    assert "| teacher | teacher |" in stdout and "kd-student" in stdout and "ce-student" in stdout
    assert str(out / "report" / "report.md") in stdout


def test_demo_wrote_the_job_file_store_and_runs(demo_out):
    out, _ = demo_out
    assert (out / "demo-job.toml").is_file()
    assert (out / "store" / "manifest.json").is_file()
    for run in ("kd", "ce"):
        run_dir = out / "job" / "runs" / run
        assert (run_dir / "final" / "config.json").is_file()
        assert (run_dir / "metrics.jsonl").is_file()


def test_demo_report_has_every_section(demo_out):
    out, _ = demo_out
    rep = json.loads((out / "report" / "report.json").read_text())
    assert [m["role"] for m in rep["models"]] == ["teacher", "student", "baseline"]
    assert rep["baseline"] == "ce-student"
    kd = rep["models"][1]
    assert "vs_baseline" in kd and "rougeL" in kd["vs_baseline"]["difference_ci"]
    assert "retention_vs_teacher_pct" in kd and "speedup_vs_teacher" in kd
    assert rep["stores"] and rep["stores"][0]["cache_key"]
    assert set(rep["runs"]) == {"kd-student", "ce-student"} and all(r["curve"] for r in rep["runs"].values())
    # the teacher learnt the task: its summaries overlap the references far above chance
    assert rep["models"][0]["quality"]["rougeL"]["mean"] > 0.5
    md = (out / "report" / "report.md").read_text()
    for h in ("## Headline", "## Quality", "## Latency", "## Retention", "## Against the CE-only baseline", "## Stores and runs", "## Plots"):
        assert h in md
    for png in ("metrics.png", "latency.png", "loss.png"):
        assert (out / "report" / png).stat().st_size > 1000
