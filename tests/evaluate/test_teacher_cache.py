"""The teacher's evaluation outputs are cached per (model, prompts, settings): a second evaluation of the same
teacher reuses them, a changed setting or retrained weights miss (issue 23). Real models on the transformers
engine (the cache sits above the engine)."""

from __future__ import annotations

import json
import os

import pytest

from kdpipe.pipeline.evaluate import evaluate
from kdpipe.pipeline.evaluate.config import EvalConfig


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_teacher, tiny_student):
    """The suite's shared tiny teacher and student (built once per session) and two held-out rows."""
    data = tmp_path_factory.mktemp("cache_data") / "held.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "text": d, "summary": s}) + "\n" for i, (d, s) in enumerate([
        ("The city council approved a new budget for parks.", "Council approves park budget."),
        ("Researchers in Paris reported that the river rose.", "Paris river rose."),
    ])))
    return tiny_teacher, tiny_student, data


def run(models, out, cache, **kw):
    teacher, student, data = models
    names = ("teacher", "student") if student is not None else ("teacher",)
    values = dict(models=tuple(str(m) for m in (teacher, student) if m is not None), names=names, data=str(data), out=str(out),
                  engine="hf", similarity_model="none", max_new_tokens=4, bootstrap_samples=100, warmup_requests=1,
                  reference_scores=False, plots=False, teacher_cache=str(cache))
    values.update(kw)
    return evaluate(EvalConfig(**values))


def test_a_second_evaluation_reuses_the_teachers_outputs(models, tmp_path):
    cache = tmp_path / "cache"
    first = run(models, tmp_path / "r1", cache)
    assert first["models"][0]["outputs_from_cache"] is None
    assert (tmp_path / "r1" / "logs" / "evaluate-teacher.log").is_file()  # the teacher generated
    [cached_file] = cache.glob("teacher-outputs-*.json")
    assert not list(cache.glob("*.tmp"))

    second = run(models, tmp_path / "r2", cache)
    t1, t2 = first["models"][0], second["models"][0]
    assert t2["outputs_from_cache"] == {"file": str(cached_file), "rows": 2}
    assert not (tmp_path / "r2" / "logs" / "evaluate-teacher.log").exists()  # no teacher generation this time
    assert (tmp_path / "r2" / "logs" / "evaluate-student.log").is_file()  # the student still generates
    assert second["models"][1]["outputs_from_cache"] is None  # only the teacher is cached
    assert t2["latency"]["per_request_s"] == t1["latency"]["per_request_s"]
    outs1 = [json.loads(x) for x in (tmp_path / "r1" / "outputs.jsonl").read_text().splitlines()]
    outs2 = [json.loads(x) for x in (tmp_path / "r2" / "outputs.jsonl").read_text().splitlines()]
    assert [o["teacher"] for o in outs1] == [o["teacher"] for o in outs2]
    assert "outputs and latencies come from the teacher cache" in (tmp_path / "r2" / "report.md").read_text()

    # a changed generation setting misses the cache (and is cached beside the first)
    third = run(models, tmp_path / "r3", cache, max_new_tokens=5)
    assert third["models"][0]["outputs_from_cache"] is None
    assert len(list(cache.glob("teacher-outputs-*.json"))) == 2


def test_retrained_weights_or_a_damaged_cache_file_miss(models, tmp_path):
    import shutil

    teacher, student, data = models
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    cache = tmp_path / "cache"
    student = None  # the teacher alone: only its outputs are cached
    run((copy, student, data), tmp_path / "r1", cache)
    [f] = cache.glob("teacher-outputs-*.json")
    f.write_text("{not json")
    assert run((copy, student, data), tmp_path / "r2", cache)["models"][0]["outputs_from_cache"] is None
    assert run((copy, student, data), tmp_path / "r3", cache)["models"][0]["outputs_from_cache"] is not None
    w = copy / "model.safetensors"
    w.write_bytes(w.read_bytes())  # rewritten weights (a retrained teacher at the same path): new mtime
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert run((copy, student, data), tmp_path / "r4", cache)["models"][0]["outputs_from_cache"] is None
