"""Validation end to end on real phase-one output (issue 10 §3): vLLM (int32 ids) -> finalize ->
`kdpipe inspect --verify` -> `train-student --val-fraction --eval-every --save-best` through the CLI.

Uses the session's shared vLLM engine (tests/conftest.py), so it adds no engine start.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from kdtest import require
from gen_helpers import make_docs, read_records, write_jsonl

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("codec", ["topk", "sampled"])
def test_validation_on_a_vllm_store(codec, shared_vllm_engine, tiny_teacher, tiny_student, tmp_path):
    require("vllm", "phase one's default engine")
    from kdpipe.pipeline.cli import main as cli
    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import generate_logits
    from kdpipe.pipeline.train.data import in_validation
    from kdpipe.storage import finalize_store

    rows = [{"id": f"v{i}", "text": t, "ref": r}
            for i, (t, r) in enumerate(zip(make_docs(12, seed=41, sentences=2), make_docs(12, seed=42, sentences=1)))]
    docs = write_jsonl(tmp_path / "docs.jsonl", rows)
    store, run = tmp_path / "store", tmp_path / "run"
    s = generate_logits(GenerateConfig(
        teacher=str(tiny_teacher), data=str(docs), out=str(store), codec=codec, recipe="score", engine="vllm",
        target_field="ref", id_field="id", top_k=8, draws=20, max_model_len=512, dtype="float32", enforce_eager=True,
        progress=False), engine=shared_vllm_engine)
    assert s.written == 12, s.line()
    finalize_store(str(store))
    r = CliRunner().invoke(cli, ["inspect", str(store), "--verify"])
    assert r.exit_code == 0, r.output

    held = {i for i in read_records(store) if in_validation(1, i, 0.25)}
    assert 0 < len(held) < 12
    r = CliRunner().invoke(cli, [
        "train-student", "--student", str(tiny_student), "--store", str(store), "--out", str(run), "--steps", "4",
        "--tokens-per-batch", "256", "--lr", "1e-3", "--save-every", "2", "--alpha", "0.5", "--temperature", "1.0",
        "--divergence", "forward_kl", "--val-fraction", "0.25", "--val-split-seed", "1", "--eval-every", "2",
        "--save-best"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in rows if x.get("split") == "validation"]
    assert [x["step"] for x in val] == [2, 4] and all(x["sequences"] == len(held) for x in val)
    assert all(x["loss_kd"] > 0 and x["target_tokens"] > 0 for x in val)
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == min(val, key=lambda x: x["loss"])["step"]
    assert f"best: step {best['step']}" in r.output
