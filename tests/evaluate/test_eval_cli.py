"""`kdpipe evaluate` end to end: two tiny models under the real vLLM CPU engine, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdtest import require
from eval_helpers import build_nli

pytestmark = [pytest.mark.vllm]


def kdpipe(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "kdpipe.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A teacher (2 layers) and a student training run (1 layer) sharing a tokenizer; head_dim 32 for vLLM CPU."""
    from kdpipe.pipeline.tiny import DEFAULT_CORPUS, TinyModelConfig, build_model, build_tiny

    root = tmp_path_factory.mktemp("eval-models")
    teacher = build_tiny(root / "teacher", [DEFAULT_CORPUS] * 4, TinyModelConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2))
    run = root / "runs" / "kd"
    build_model(run / "final", teacher, TinyModelConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, seed=1))
    # The parts of a training run the report reads: the loss curve and the resolved config.
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s, "loss_ce": 2.0 / s, "loss_kd": 1.0 / s}) + "\n" for s in range(1, 6)
    ) + '{"step": 6, "loss": \n')  # a line cut by a crash is skipped
    (run / "train_config.toml").write_text('student = "x"\nstores = []\nout = "y"\nalpha = 0.5\nsteps = 5\n')
    return teacher, run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [json.loads(l) for l in (Path(__file__).parents[2] / "pipeline/data/summarization.jsonl").read_text().splitlines()]
    p = tmp_path_factory.mktemp("eval-data") / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[-6:]))
    return p


@pytest.fixture(scope="module")
def report(tmp_path_factory, models, data):
    require("vllm", "evaluate generates with vLLM")
    teacher, run = models
    nli = build_nli(tmp_path_factory.mktemp("nli"), {0: "entailment", 1: "neutral", 2: "contradiction"})
    out = tmp_path_factory.mktemp("report")
    r = kdpipe("evaluate", "--model", str(teacher), "--model", str(run), "--data", str(data), "--out", str(out),
               "--text-field", "document", "--max-new-tokens", "8", "--max-model-len", "512", "--nli-model", str(nli), "--bootstrap-samples", "200")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_report_files(report):
    out, stdout = report
    for f in ("report.json", "report.md", "metrics.png", "latency.png", "loss.png", "outputs.jsonl", "eval_config.toml"):
        assert (out / f).is_file(), f
    assert "ROUGE-L" in stdout and "report.md" in stdout


def test_report_numbers(report):
    out, _ = report
    rep = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in rep["models"]] == ["teacher", "kd"]
    assert [m["role"] for m in rep["models"]] == ["teacher", "student"]
    assert rep["data"]["num_examples"] == 6  # every row of the file is held out
    for m in rep["models"]:
        q = m["quality"]
        assert set(q) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "similarity_reference", "similarity_source", "nli_entailment"}
        for v in q.values():
            assert v["ci_low"] <= v["mean"] <= v["ci_high"] and v["n"] == 6
        lat = m["latency"]
        assert lat["requests"] == 6 and len(lat["per_request_s"]) == 6
        assert 0 < lat["p50_s"] <= lat["p95_s"]
        assert 0 < lat["mean_output_tokens"] <= 8 and lat["tokens_per_s"] > 0
    kd = rep["models"][1]
    assert kd["model"].endswith("final") and kd["run"].endswith("kd")
    assert set(kd["retention_vs_teacher_pct"]) == set(kd["quality"])
    assert kd["speedup_vs_teacher"]["p50"] > 0
    assert rep["scorers"]["nli"]["entailment_index"] == 0  # from the label names, this model lists entailment first
    assert len(rep["runs"]["kd"]["curve"]["loss"]) == 5 and rep["runs"]["kd"]["config"]["alpha"] == 0.5
    outputs = [json.loads(l) for l in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 6 and set(outputs[0]) == {"id", "reference", "teacher", "kd"}


def test_report_markdown_sections(report):
    md = (report[0] / "report.md").read_text()
    for h in ("## Headline", "## Quality", "## Latency", "## Retention", "## Against the CE-only baseline", "## Stores and runs", "## Plots"):
        assert h in md


def test_bad_inputs_fail_before_generation(tmp_path, models, data):
    teacher, run = models
    bad = tmp_path / "noref.jsonl"
    bad.write_text(json.dumps({"id": "1", "text": "x", "split": "heldout"}) + "\n")
    r = kdpipe("evaluate", "--model", str(teacher), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "has no field 'summary'" in r.stderr and "Traceback" not in r.stderr
    nli = build_nli(tmp_path / "nli", {0: "LABEL_0", 1: "LABEL_1"})
    r = kdpipe("evaluate", "--model", str(teacher), "--data", str(data), "--out", str(tmp_path / "o"), "--nli-model", str(nli),
               "--text-field", "document")
    assert r.returncode != 0 and "no entailment label" in r.stderr
    r = kdpipe("evaluate", "--model", str(tmp_path / "missing"), "--data", str(data), "--out", str(tmp_path / "o"),
               "--text-field", "document")
    assert r.returncode != 0 and "does not exist" in r.stderr
    assert not (tmp_path / "o" / "outputs.jsonl").exists()
