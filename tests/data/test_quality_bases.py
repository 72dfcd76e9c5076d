"""benchmarks/qualitylib.py's pretrained bases: built once per architecture, seed and tokenizer, cached with a
config hash under the benchmark's folder, and shared by bench_quality, bench_onpolicy and bench_xtok (which all
call ensure_teacher on one ROOT; bench_xtok asks for its student in tokenizer B)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import qualitylib  # noqa: E402

TINY = dict(corpus=str(REPO / "pipeline" / "data" / "summarization.jsonl"), vocab_size=400, max_doc_chars=120,
            teacher_layers=2, teacher_hidden=64, student_layers=1, student_hidden=32, teacher_steps=3, teacher_batch=4,
            teacher_base_steps=4, student_base_steps=4, base_seq_len=32, base_batch=4, max_position_embeddings=256)


def test_bases_are_cached_by_hash_and_shared_across_benchmarks(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from kdpipe.pipeline.tiny import build_unigram_tokenizer

    said: list[str] = []
    first = qualitylib.ensure_teacher(tmp_path, log=said.append, **TINY)  # e.g. bench_quality
    assert first["teacher_seconds"] > 0 and "teacher" in first["bases"]
    assert first["bases"]["teacher"]["ppl_heldout"] > 1
    assert (tmp_path / "teacher" / "train_log.jsonl").is_file() and (tmp_path / "bases" / "teacher" / "train_log.jsonl").is_file()
    s0 = first["student_init"](0)
    assert s0 == tmp_path / "bases" / "student-s0" and (s0 / "model.safetensors").is_file()
    assert first["student_init"](1) != s0  # one base per seed
    built = (s0 / "model.safetensors").stat().st_mtime_ns
    teacher_built = (tmp_path / "teacher" / "model.safetensors").stat().st_mtime_ns

    said.clear()
    second = qualitylib.ensure_teacher(tmp_path, log=said.append, **TINY)  # e.g. bench_onpolicy on the same ROOT
    assert second["teacher_seconds"] == 0 and any("teacher cache" in s and "reused" in s for s in said)
    assert second["student_init"](0) == s0 and (s0 / "model.safetensors").stat().st_mtime_ns == built
    assert (tmp_path / "teacher" / "model.safetensors").stat().st_mtime_ns == teacher_built

    # bench_xtok: the student in tokenizer B gets its own base, pretrained on the same text in B's tokenization.
    tok_b = tmp_path / "tokenizer-b"
    build_unigram_tokenizer(tok_b, [r["document"] for r in second["corpus"]["train"]], vocab_size=300)
    sb = second["student_init"](0, tokenizer=tok_b)
    assert sb != s0 and sb.name.startswith("student-tok") and (sb / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(sb).vocab_size == len(AutoTokenizer.from_pretrained(tok_b))

    # A changed base setting rebuilds the bases it touches (and says why); the teacher's base is unchanged.
    said.clear()
    third = qualitylib.ensure_teacher(tmp_path, log=said.append, **{**TINY, "student_base_steps": 5})
    assert third["teacher_seconds"] == 0
    third["student_init"](0)
    assert any("base student-s0: config hash differs (steps changed)" in s for s in said)
    assert (s0 / "model.safetensors").stat().st_mtime_ns != built


def test_size_ratio_and_random_init_design():
    # The defaults keep the seeds' ratio (70B->8B 9x, 72B->7B 10x, 27B->2B 13x).
    s = qualitylib.QualitySettings()
    ratio = qualitylib.non_embedding_params(s.teacher_layers, s.teacher_hidden) / qualitylib.non_embedding_params(
        s.student_layers, s.student_hidden)
    assert 8 <= ratio <= 14


def test_random_init_students_without_bases(tmp_path):
    t = qualitylib.ensure_teacher(tmp_path, log=lambda s: None, **{**TINY, "pretrained_bases": False})
    assert t["bases"] == {} and not (tmp_path / "bases").exists()
    assert t["student_init"](0) == tmp_path / "students" / "init-s0"
