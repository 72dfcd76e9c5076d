"""The newcomer's path as the README's CPU quickstart gives it, with default flags only (issue 23):
tiny-model -> generate-logits -> finalize -> inspect --verify -> train-student -> evaluate.

Only sizes are given (tiny-model's and train-student's --steps, a few rows), never a flag that works around a
default: no --max-model-len (each model's own), no --dtype, no VLLM_CPU_KVCACHE_SPACE (kdpipe sizes the CPU KV
cache), evaluate exactly in the form `kdpipe --help` shows.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from kdtest import require, run_in_lane

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

CORPUS = Path(__file__).resolve().parents[2] / "pipeline" / "data" / "summarization.jsonl"


def kdpipe(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # a newcomer sets nothing
    r = run_in_lane([sys.executable, "-m", "kdpipe.pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                    text=True, timeout=900)
    assert r.returncode == 0, f"kdpipe {' '.join(args)}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stdout + r.stderr


def newcomer_path(root: Path) -> dict[str, str]:
    """The path, step by step (the session's BackgroundLane runs it): each step's terminal output by step."""
    require("vllm", "phase one and evaluate run the default engine")
    rows = [json.loads(x) for x in CORPUS.read_text().splitlines()[:16]]
    (root / "docs.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "text": r["document"], "summary": r["summary"]}) + "\n" for r in rows[:12]))
    (root / "heldout.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "text": r["document"], "summary": r["summary"]}) + "\n" for r in rows[12:]))
    out = {"root": str(root)}
    out["tiny-model teacher"] = kdpipe(root, "tiny-model", "teacher", "--train-on", "docs.jsonl", "--steps", "30")
    out["tiny-model student"] = kdpipe(root, "tiny-model", "student", "--train-on", "docs.jsonl", "--layers", "1", "--steps", "0")
    out["generate-logits"] = kdpipe(root, "generate-logits", "--teacher", "teacher", "--data", "docs.jsonl", "--out", "store")
    out["finalize"] = kdpipe(root, "finalize", "store")
    out["inspect"] = kdpipe(root, "inspect", "store", "--verify")
    out["train-student"] = kdpipe(root, "train-student", "--student", "student", "--store", "store", "--out", "run", "--steps", "4")
    out["evaluate"] = kdpipe(root, "evaluate", "--model", "teacher", "--model", "run", "--data", "heldout.jsonl", "--out", "report")
    return out


BACKGROUND_JOB = newcomer_path


def test_newcomer_path_with_default_flags(background_job):
    out = background_job
    root = Path(out["root"])
    assert "wrote 12 samples" in out["generate-logits"], out["generate-logits"]
    # Without VLLM_CPU_KVCACHE_SPACE, vLLM's CPU default reserved 90% of RAM for the KV cache and failed when less was
    # free: kdpipe sizes it from the model and batch (issue 23); 64 MiB is the floor a model this small gets.
    log = next((root / "store" / "logs").glob("*.log")).read_text(errors="replace")
    assert "Explicitly set (0.06/" in log, log[-3000:]
    assert "12" in out["inspect"]
    assert (root / "run" / "final" / "config.json").is_file(), out["train-student"]
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["data"]["num_examples"] == 4 and report["config"]["max_model_len"] == 512
    assert [m["role"] for m in report["models"]] == ["teacher", "student"]
