"""The prefix-cache route of teacher-forced scoring stores exactly what full scoring stores (issue 11 §2).

One real vLLM CPU engine (shared, conftest.py) with 32-token KV blocks and a small KV cache (48 blocks = 1,536 tokens),
so a cached prefix is a few blocks of a ~150-token prompt and a prefilled prefix can be evicted
before its scoring request runs. The full route (`score_mode = "full"`) is the reference; the
prefix-cache route must give byte-identical stores (both codecs) when the cache is
  cold       (reset: every scoring request reads only the blocks its own prefill left),
  warm       (the full sequences are cached: the check num_cached_tokens <= t0 - 1 fails, the
              fallback rescoring is taken and counted in the run's stats),
  partially warm (half the documents cached, half cold),
  evicted    (the admission window opened wide on the small cache: prefixes are evicted,
              requests may be preempted, the rows that are not cached are recomputed),
and for basic-reading's scoring pass.

"The same targets" is the bound of docs/generate.md ("Scoring routes"), not byte equality: vLLM's
CPU kernels are not batch-invariant, so a row computed in another batch (the other route, or the
same route under other load) may differ in the last bits of its float32 log-probs. Stores must
hold the same samples, sequences and positions byte for byte, and the targets within
benchmarks/score_diff.py's bound (codes within one step, near-tie swaps only, |Δ tail| <= 1e-6);
test_batch_composition_moves_only_last_bits pins the engine-side bound itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gen_helpers import make_docs, read_records, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from score_diff import RAW_EPS, raw_diff, row_diff  # noqa: E402  (the benchmark's comparator)

from kdpipe.pipeline.generate.config import GenerateConfig
from kdpipe.pipeline.generate.run import generate_logits

pytestmark = pytest.mark.vllm

K, MAX_LEN, BLOCK = 8, 512, 32  # the shared engine's (tests/conftest.py)


def cfg_for(teacher, data, out, **kw) -> GenerateConfig:
    base = dict(teacher=str(teacher), data=str(data), out=str(out), top_k=K, max_model_len=MAX_LEN, dtype="float32",
                enforce_eager=True, id_field="id", progress=False, recipe="score", target_field="ref", draws=20)
    base.update(kw)
    return GenerateConfig(**base)


@pytest.fixture(scope="module")
def engine(shared_vllm_engine):
    eng = shared_vllm_engine  # conftest.py: 32-token blocks, a 48-block KV cache, K = 8
    assert eng.prefix_cache_ok and eng.block_size == BLOCK and eng.max_model_len == MAX_LEN and eng.max_logprobs == K
    return eng


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    rows = [{"id": f"p{i}", "text": t, "ref": r}
            for i, (t, r) in enumerate(zip(make_docs(24, seed=21, sentences=10), make_docs(24, seed=22, sentences=2)))]
    return write_jsonl(tmp_path_factory.mktemp("pcdata") / "docs.jsonl", rows)


def assert_same_store(a: dict, b: dict) -> None:
    """The same samples, sequences and positions byte for byte; every target row within the bound."""
    assert sorted(a) == sorted(b)
    for sid in a:
        ra, rb = a[sid], b[sid]
        for name in ("input_ids", "target_positions"):
            assert np.array_equal(getattr(ra, name), getattr(rb, name)), (sid, name)
        for j in range(len(ra.target_positions)):
            d = row_diff(ra.ids[j], ra.logprobs[j], ra.tail[j], rb.ids[j], rb.logprobs[j], rb.tail[j])
            assert d.get("max_code_step", 0) <= 1 and d.get("tie_gap_steps", 0) <= 1 and d["tail_delta"] <= 1e-6, \
                (sid, j, d)


def run(engine, teacher, data, out, mode, **kw):
    s = generate_logits(cfg_for(teacher, data, out, score_mode=mode, **kw), engine=engine)
    assert not s.interrupted and s.written > 0
    return s


@pytest.mark.parametrize("codec", ["topk", "sampled"])
def test_prefix_cache_equals_full_cold_warm_partial_evicted(engine, tiny_teacher, docs, tmp_path, codec):
    llm = engine.llm
    rows = [json.loads(x) for x in docs.read_text().splitlines()]
    first4 = write_jsonl(tmp_path / "first4.jsonl", rows[:4])
    run(engine, tiny_teacher, docs, tmp_path / "full", "full", codec=codec)
    ref = read_records(tmp_path / "full")  # full scoring: the reference

    # cold: only the blocks each request's own prefill left are read
    assert llm.reset_prefix_cache()
    before = dict(engine.stats)
    s = run(engine, tiny_teacher, docs, tmp_path / "cold", "prefix-cache", codec=codec)
    assert "score_fallbacks" not in s.stats
    n_rows = engine.stats["score_rows"] - before.get("score_rows", 0)
    computed = engine.stats["score_rows_computed"] - before.get("score_rows_computed", 0)
    assert computed < 0.7 * n_rows, (computed, n_rows)  # the prompt rows came from the cache
    assert_same_store(ref, read_records(tmp_path / "cold"))

    # warm: the whole sequences are cached (full scoring of the same 4 documents just before):
    # rows past t0 - 1 would come back uninitialised, so the check rescored them on the full
    # route, and the run counts it
    assert llm.reset_prefix_cache()
    run(engine, tiny_teacher, first4, tmp_path / "full4", "full", codec=codec)
    s = run(engine, tiny_teacher, first4, tmp_path / "warm", "prefix-cache", codec=codec)
    assert s.stats.get("score_fallbacks", 0) >= 2, s.stats
    assert f"score_fallbacks {s.stats['score_fallbacks']}" in s.line()
    warm = read_records(tmp_path / "warm")
    assert_same_store({k: ref[k] for k in warm}, warm)

    # partially warm: 4 documents cached whole, 20 cold
    assert llm.reset_prefix_cache()
    run(engine, tiny_teacher, first4, tmp_path / "full4b", "full", codec=codec)
    s = run(engine, tiny_teacher, docs, tmp_path / "partial", "prefix-cache", codec=codec)
    assert 0 < s.stats.get("score_fallbacks", 0) <= 4, s.stats
    assert_same_store(ref, read_records(tmp_path / "partial"))

    # evicted: admit every request at once on the small cache, so prefills run far ahead of
    # their scoring requests and their blocks are reused by later ones before they are read
    assert llm.reset_prefix_cache()
    kv_tokens, engine.kv_tokens = engine.kv_tokens, 10**9
    try:
        before = dict(engine.stats)
        run(engine, tiny_teacher, docs, tmp_path / "evicted", "prefix-cache", codec=codec)
        computed_ev = engine.stats["score_rows_computed"] - before.get("score_rows_computed", 0)
    finally:
        engine.kv_tokens = kv_tokens
    assert computed_ev > computed, "nothing was evicted: the test did not exercise eviction"
    assert_same_store(ref, read_records(tmp_path / "evicted"))


def test_basic_reading_scoring_pass_prefix_cache_equals_full(engine, tiny_teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(make_docs(4, seed=23, sentences=3))])
    kw = dict(recipe="basic-reading", target_field=None, max_new_tokens=8, reading_template="Sentence: {sentence}\nEntities:")
    run(engine, tiny_teacher, data, tmp_path / "full", "full", **kw)
    assert engine.llm.reset_prefix_cache()
    run(engine, tiny_teacher, data, tmp_path / "fast", "prefix-cache", **kw)
    assert_same_store(read_records(tmp_path / "full"), read_records(tmp_path / "fast"))


def test_both_routes_match_transformers(engine, tiny_teacher, docs, tmp_path):
    """The target rows kdpipe takes from vLLM's prompt log-prob tensors are the teacher's top-K."""
    from gen_helpers import Reference, check_against_reference

    from kdpipe.storage import CodecConfig

    lines = docs.read_text().splitlines()[:4]
    data = write_jsonl(tmp_path / "d.jsonl", [json.loads(x) for x in lines])
    ref = Reference(tiny_teacher)
    lp_tol = CodecConfig().logprob_step / 2 + 1e-4  # codec quantization + engine numerics (test_generate_vllm.py)
    for mode in ("full", "prefix-cache"):
        assert engine.llm.reset_prefix_cache()
        run(engine, tiny_teacher, data, tmp_path / mode, mode)
        for rec in read_records(tmp_path / mode).values():
            check_against_reference(rec, ref.logprobs(rec.input_ids, rec.target_positions), lp_tol)


def test_batch_composition_moves_only_last_bits(engine, tiny_teacher, docs):
    """The same score requests one at a time, all batched, batched in reverse order, and on the
    prefix-cache route: the engine's float32 top-K (before the codec) agree within RAW_EPS, with
    the same ids except where two values lie within RAW_EPS (near-ties). This is the guarantee
    docs/generate.md states; bitwise equality across batch compositions is not one on vLLM CPU."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rows = [json.loads(x) for x in docs.read_text().splitlines()]
    seqs = [tok(r["text"] + " " + r["ref"])["input_ids"][: MAX_LEN - 1] for r in rows]
    pos = [list(range(len(s) - 12, len(s))) for s in seqs]  # the last 12 rows of ~150-token sequences
    engine.top_k, engine.temperature = K, 0.0
    runs = {}
    try:
        for name, mode, order in (("batched", "full", None), ("reversed", "full", -1), ("prefix-cache", "prefix-cache", None)):
            assert engine.llm.reset_prefix_cache()
            engine.score_mode = mode
            got = engine.score(seqs[::order], pos[::order])
            runs[name] = got[::order]
        engine.score_mode = "full"
        runs["alone"] = [engine.score([s], [p])[0] for s, p in zip(seqs, pos)]
    finally:
        engine.score_mode = "prefix-cache"
    n_rows = sum(len(p) for p in pos)
    for name in ("reversed", "prefix-cache", "alone"):
        d = raw_diff(runs["batched"], runs[name])
        assert d["rows"] == n_rows, (name, d)
        assert d["within_bound"], (name, d, RAW_EPS)
