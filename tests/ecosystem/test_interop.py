"""kdpipe export / import: Parquet through `datasets`, axolotl's KD layout both ways (round trip within
the codec's bound), vLLM server log-prob JSON, a real phase-one store through export -> import ->
inspect --verify -> train-student, renormalized sources, and every bad input naming file and row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdpipe.pipeline.cli import main as kdpipe
from kdpipe.storage.errors import ConfigError, DataError, StoreError

from eco_helpers import build_store, topk_store  # noqa: F401
from kdtest import require


def records(store) -> dict:
    from kdpipe.storage import StoreReader

    return {r.sample_id: r for r in StoreReader(str(store), shuffle=False)}


def cli(*args: str) -> str:
    r = CliRunner().invoke(kdpipe, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def assert_same_targets(a, b, codec) -> None:
    """b's targets equal a's within the codec's bound (b was re-encoded from a's decoded values)."""
    from kdpipe.storage.codecs import switch_prob

    assert set(a) == set(b)
    h, k = codec.sqrt_step, codec.top_k
    for sid, ra in a.items():
        rb = b[sid]
        np.testing.assert_array_equal(ra.input_ids, rb.input_ids)
        np.testing.assert_array_equal(ra.target_positions, rb.target_positions)
        np.testing.assert_array_equal(ra.ids, rb.ids)
        v = ra.ids >= 0
        bound = codec.logprob_error_bound(ra.logprobs[v])
        assert (np.abs(rb.logprobs[v] - ra.logprobs[v]) <= bound).all()
        # the tail is recomputed from the decoded log-probs: within the codec's L1 bound of the exact one
        assert np.abs(rb.tail - ra.tail).max() <= h * np.sqrt(k) + k * h * h / 4 + switch_prob(codec) * k + 1e-6


# ------------------------------------------------------------------------------------ export


def test_parquet_export_loads_through_datasets(topk_store, tmp_path):
    import datasets
    import pandas as pd
    import pyarrow.parquet as pq

    out = tmp_path / "pq"
    assert "format parquet" in cli("export", topk_store, out, "--format", "parquet", "--rows-per-file", "10")
    files = sorted(str(p) for p in out.glob("data-*.parquet"))
    assert len(files) == 3 and sorted(p.name for p in out.iterdir()) == [Path(f).name for f in files]  # 24 rows, 10 per file
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    side = json.loads(pq.read_schema(files[0]).metadata[b"kdpipe_meta"])  # the meta rides in the schema metadata
    recs = records(topk_store)
    assert len(ds) == len(recs) and side["cache_key"] == json.loads((topk_store / "manifest.json").read_text())["cache_key"]
    df = pd.read_parquet(out)  # the folder as it is (no side file in it); no column shadows a DataFrame method
    assert len(df) == len(recs) and callable(df.tail) and "tail_mass" in df.columns
    for row in ds:
        r = recs[row["sample_id"]]
        assert row["input_ids"] == r.input_ids.tolist() and row["target_positions"] == r.target_positions.tolist()
        assert row["target_token_ids"] == [ids[ids >= 0].tolist() for ids in r.ids]
        np.testing.assert_allclose(row["target_logprobs"][0], r.logprobs[0][r.ids[0] >= 0], rtol=1e-6)
        np.testing.assert_allclose(row["tail_mass"], r.tail, rtol=1e-6)
        assert row["text"] == r.text


def test_axolotl_round_trip_within_codec_bound(topk_store, tiny_teacher, tmp_path):
    import datasets

    from kdpipe.storage import open_store

    out = tmp_path / "axo"
    cli("export", topk_store, out, "--format", "axolotl")
    ds = datasets.load_dataset("parquet", data_files=str(out / "data-00000.parquet"), split="train")
    recs = records(topk_store)
    row = ds[0]
    r = recs[row["sample_id"]]
    L, p = len(row["input_ids"]), int(r.target_positions[0])
    assert len(row["target_token_ids"]) == len(row["target_logprobs"]) == len(row["target_mask"]) == len(row["labels"]) == L
    # axolotl pairs row t with the next token: kdpipe's target position p is row p-1
    assert row["target_token_ids"][p - 1] == r.ids[0].tolist() and all(row["target_mask"][p - 1])
    assert not any(row["target_mask"][p - 2]) and row["labels"][p] == row["input_ids"][p] and row["labels"][p - 1] == -100

    imported = tmp_path / "store-back"
    cli("import", out, imported, "--format", "axolotl", "--tokenizer", tiny_teacher)
    a, b = open_store(topk_store), open_store(imported)
    assert_same_targets(recs, records(imported), a.meta.codec)
    assert {s: r.text for s, r in records(imported).items()} == {s: r.text for s, r in recs.items()}  # text kept
    assert (imported / "teacher_tokenizer" / "tokenizer.json").is_file() and "teacher_tokenizer" in b.raw
    for key in ("teacher", "teacher_revision", "tokenizer_fingerprint", "vocab_size", "recipe", "recipe_params",
                "dataset_fingerprint"):
        assert getattr(b.meta, key) == getattr(a.meta, key), key
    assert b.meta.codec == a.meta.codec
    assert b.meta.generation_params == {**a.meta.generation_params, "imported_from": "axolotl", "tail": "exact"}
    # a rerun of the import skips what is stored (same writer: resume), the store stays valid
    cli("import", out, imported, "--format", "axolotl", "--tokenizer", tiny_teacher)
    assert len(records(imported)) == len(recs)


# ------------------------------------------------------------------- a real phase-one store


@pytest.fixture(scope="module")
def phase_one(tiny_teacher, shared_vllm_engine, tmp_path_factory):
    """A store written by phase one on vLLM (score recipe, int32 ids), and the same engine's
    prompt_logprobs serialized as vLLM's OpenAI-compatible server returns them (the session's engine,
    tests/conftest.py: one engine start fewer)."""
    require("vllm", "a real phase-one store")
    from vllm import SamplingParams
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.serve.engine.protocol import UsageInfo
    from vllm.inputs import TokensPrompt

    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import generate_logits

    root = tmp_path_factory.mktemp("phase1")
    words = "the city council approved a new budget for parks and schools on monday".split()
    rng = np.random.default_rng(0)
    rows = [{"id": f"d{i}", "text": " ".join(rng.choice(words, 8)), "ref": " ".join(rng.choice(words, 6))} for i in range(8)]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eng = shared_vllm_engine
    cfg = GenerateConfig(teacher=str(tiny_teacher), data=str(data), out=str(root / "store"), recipe="score",
                         target_field="ref", id_field="id", top_k=8, max_model_len=eng.max_model_len, dtype="float32",
                         enforce_eager=True, progress=False)
    generate_logits(cfg, engine=eng)
    if not (root / "store" / "manifest.json").exists():
        cli("finalize", root / "store")
    recs = records(root / "store")
    params = SamplingParams(max_tokens=1, prompt_logprobs=8, detokenize=False)
    outs = eng.llm.generate([TokensPrompt(prompt_token_ids=r.input_ids.tolist()) for r in recs.values()], params,
                            use_tqdm=False)
    lines = []
    for sid, o in zip(recs, outs):
        choice = CompletionResponseChoice(index=0, text="", prompt_token_ids=list(o.prompt_token_ids),
                                          prompt_logprobs=[None if p is None else dict(p) for p in o.prompt_logprobs])
        resp = CompletionResponse(id=f"cmpl-{sid}", model=str(tiny_teacher), choices=[choice],
                                  usage=UsageInfo(prompt_tokens=len(o.prompt_token_ids), total_tokens=len(o.prompt_token_ids)))
        lines.append(resp.model_dump_json())
    (root / "vllm.jsonl").write_text("\n".join(lines) + "\n")
    # generated tokens with logprobs=K, as the server writes them with return_tokens_as_token_ids
    from vllm.entrypoints.openai.completion.protocol import CompletionLogProbs

    first = next(iter(recs.values()))
    prompt = first.input_ids[:5].tolist()
    o = eng.llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                         SamplingParams(max_tokens=4, logprobs=8, temperature=0.0, detokenize=False), use_tqdm=False)[0]
    gen = o.outputs[0]
    lp = CompletionLogProbs(tokens=[f"token_id:{t}" for t in gen.token_ids],
                            token_logprobs=[d[t].logprob for t, d in zip(gen.token_ids, gen.logprobs)],
                            top_logprobs=[{f"token_id:{k}": v.logprob for k, v in d.items()} for d in gen.logprobs])
    choice = CompletionResponseChoice(index=0, text="", logprobs=lp, token_ids=list(gen.token_ids), prompt_token_ids=prompt)
    resp = CompletionResponse(id="cmpl-gen", model=str(tiny_teacher), choices=[choice],
                              usage=UsageInfo(prompt_tokens=5, total_tokens=9, completion_tokens=4))
    (root / "vllm-gen.json").write_text(resp.model_dump_json())
    gen_ref = (prompt, list(gen.token_ids), [{k: v.logprob for k, v in d.items()} for d in gen.logprobs])
    return root / "store", root / "vllm.jsonl", root / "vllm-gen.json", gen_ref


@pytest.mark.vllm
def test_phase_one_store_export_import_verify_train(phase_one, tiny_teacher, tiny_student, tmp_path):
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train

    store = phase_one[0]
    cli("export", store, tmp_path / "axo", "--format", "axolotl")
    back = tmp_path / "back"
    cli("import", tmp_path / "axo", back, "--format", "axolotl", "--tokenizer", tiny_teacher)
    from kdpipe.storage import open_store

    assert_same_targets(records(store), records(back), open_store(store).meta.codec)
    assert "ok" in cli("inspect", back, "--verify").lower()
    result = train(TrainConfig(student=str(tiny_student), stores=(str(back),), out=str(tmp_path / "run"), steps=2,
                               tokens_per_batch=256, save_every=0, alpha=0.5, tail_mode="bucket"))
    assert result.steps == 2 and (result.final / "model.safetensors").is_file()


@pytest.mark.vllm
def test_vllm_server_logprobs_import_matches_phase_one(phase_one, tiny_teacher, tmp_path):
    """The same engine's prompt_logprobs in the server's JSON: the import keeps exactly the top-K (vLLM
    adds the actual token when it ranks lower) and computes the tail as phase one does."""
    store, jsonl = phase_one[:2]
    out = tmp_path / "imported"
    assert "top-8, tail exact" in cli("import", jsonl, out, "--format", "vllm-logprobs", "--tokenizer", tiny_teacher)
    p1, imp = records(store), records(out)
    assert set(imp) == {f"cmpl-{sid}-0" for sid in p1}
    for sid, r in p1.items():
        q = imp[f"cmpl-{sid}-0"]
        np.testing.assert_array_equal(q.input_ids, r.input_ids)
        at = np.searchsorted(q.target_positions, r.target_positions)  # every position vs the scored ones
        assert (q.target_positions[at] == r.target_positions).all()
        same = (q.ids[at] == r.ids).all(axis=1)
        assert same.mean() >= 0.9  # ids can swap where two log-probs tie
        np.testing.assert_allclose(q.tail[at], r.tail, atol=1e-4)
        np.testing.assert_allclose(q.logprobs[at][same], r.logprobs[same], atol=1e-3)
    from kdpipe.storage import open_store

    meta = open_store(out).meta
    assert meta.teacher == str(tiny_teacher) and meta.generation_params["tail"] == "exact" and meta.codec.top_k == 8


@pytest.mark.vllm
def test_vllm_completion_logprobs_import(phase_one, tiny_teacher, tmp_path):
    """The completion's logprobs (top_logprobs keyed "token_id:N", token_ids): one target per generated token."""
    _, _, gen_json, (prompt, gen_ids, gen_lps) = phase_one
    out = tmp_path / "gen"
    cli("import", gen_json, out, "--format", "vllm-logprobs", "--tokenizer", tiny_teacher, "--top-k", "8")
    (rec,) = records(out).values()
    assert rec.sample_id == "cmpl-gen-0" and rec.input_ids.tolist() == prompt + gen_ids
    assert rec.target_positions.tolist() == [len(prompt) + i for i in range(len(gen_ids))]
    for j, want in enumerate(gen_lps):
        top = sorted(want.items(), key=lambda kv: -kv[1])[:8]
        assert rec.ids[j].tolist() == [k for k, _ in top]
        np.testing.assert_allclose(rec.tail[j], 1 - np.exp([v for _, v in top]).sum(), atol=1e-5)


# -------------------------------------------------------------- renormalized sources, bad input


def _axolotl_row(ids, lps, mask=None, input_ids=(1, 2, 3), **extra) -> dict:
    L = len(input_ids)
    K = len(ids[0])
    return {"input_ids": list(input_ids), "target_token_ids": ids + [list(range(K))] * (L - len(ids)),
            "target_logprobs": lps + [[-1e9] * K] * (L - len(lps)),
            "target_mask": (mask or [[1] * K] * len(ids)) + [[0] * K] * (L - len(ids)), **extra}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_renormalized_source_refuses_tail_bucket(tmp_path, tiny_teacher, tiny_student):
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train
    from kdpipe.storage import open_store

    lp = np.log([0.5, 0.3, 0.2]).tolist()
    src = _write(tmp_path / "renorm.jsonl", [_axolotl_row([[5, 6, 7], [8, 9, 10]], [lp, lp], input_ids=(1, 2, 3, 4), sample_id=f"r{i}")
                                            for i in range(4)])
    assert "tail unknown" in cli("import", src, tmp_path / "s", "--format", "axolotl", "--tokenizer", tiny_teacher)
    assert open_store(tmp_path / "s").meta.generation_params["tail"] == "unknown"
    assert "(imported from axolotl, tail unknown)" in cli("inspect", tmp_path / "s", "--verify")
    with pytest.raises(ConfigError, match=r"tail_mode: 'bucket' needs the teacher's tail mass, but .*/s was imported "
                                          r"from axolotl with renormalized top-k lists.*--tail-mode renormalize"):
        train(TrainConfig(student=str(tiny_student), stores=(str(tmp_path / "s"),), out=str(tmp_path / "run"), steps=1,
                          tail_mode="bucket", alpha=0.5))


@pytest.mark.parametrize("case, row, message", [
    ("inconsistent", _axolotl_row([[5, 6]], [[-1.0, -2.0, -3.0]]),
     r"row 1: position 0: target_token_ids has 2 entries, target_logprobs 3, target_mask 2; the per-position lists are inconsistent"),
    ("lengths", {"input_ids": [1, 2, 3], "target_token_ids": [[5]], "target_logprobs": [[-1.0]], "target_mask": [[1]]},
     r"row 1: the per-position lists are inconsistent \(lengths"),
    ("duplicate", _axolotl_row([[5, 5]], [[-1.0, -2.0]]), r"row 1: position 0: token id 5 is listed twice"),
    ("positive", _axolotl_row([[5, 6]], [[0.5, -2.0]]), r"row 1: position 0: log-prob 0.5 > 0 is not a log-probability"),
    ("vocab", _axolotl_row([[5, 99999]], [[-1.0, -2.0]]), r"row 1: position 0: token id 99999 is outside the tokenizer's vocabulary"),
    ("last", _axolotl_row([[5, 6]] * 3, [[-1.0, -2.0]] * 3),
     r"row 1: position 2: row 2 holds the next token's distribution, but the sequence ends at 2; mask that row "
     r"\(target_mask 0 at row 2\)"),
])
def test_bad_axolotl_rows_name_file_and_row(tmp_path, tiny_teacher, case, row, message):
    from kdpipe.storage.interop import import_source

    good = _axolotl_row([[5, 6]], [[-1.0, -2.0]], sample_id="ok")
    src = _write(tmp_path / f"{case}.jsonl", [good, row])
    with pytest.raises(DataError, match=f"{case}.jsonl: " + message):
        import_source(src, tmp_path / "store", "axolotl", str(tiny_teacher))
    assert not (tmp_path / "store").exists()  # validated first: nothing written


def test_bad_vllm_logprobs_name_file_and_row(tmp_path, tiny_teacher):
    from kdpipe.storage.interop import import_source

    def resp(plp, ids=(1, 2, 3)):
        return {"id": "c", "model": "t", "choices": [{"index": 0, "text": "", "prompt_token_ids": list(ids), "prompt_logprobs": plp}]}

    ok = [None, {"5": {"logprob": -0.1, "rank": 1}}, {"6": {"logprob": -0.2, "rank": 1}}]
    cases = {
        "inconsistent": (json.dumps(resp(ok[:2])), r"row 1: prompt_logprobs has 2 positions but prompt_token_ids 3"),
        "duplicate": ('{"id": "c", "choices": [{"index": 0, "prompt_token_ids": [1, 2], "prompt_logprobs": '
                      '[null, {"5": {"logprob": -0.1, "rank": 1}, "5": {"logprob": -0.2, "rank": 2}}]}]}',
                      r"line 2: token id 5 is listed twice at one position"),
        "positive": (json.dumps(resp([None, {"5": {"logprob": 0.3, "rank": 1}}, ok[2]])), r"row 1: position 1: log-prob 0.3 > 0"),
        "vocab": (json.dumps(resp([None, {"70000": {"logprob": -0.1, "rank": 1}}, ok[2]])),
                  r"row 1: position 1: token id 70000 is outside the tokenizer's vocabulary"),
        "text-token": (json.dumps({"id": "g", "choices": [{"index": 0, "prompt_token_ids": [1, 2], "token_ids": [5],
                                                           "logprobs": {"tokens": ["hi"], "top_logprobs": [{"hi": -0.1}]}}]}),
                       r"row 1: generated token 0: token 'hi' is text, not a token id; request the log-probs with "
                       r"return_tokens_as_token_ids=true"),
        "gen-inconsistent": (json.dumps({"id": "g", "choices": [{"index": 0, "prompt_token_ids": [1, 2], "token_ids": [5, 6],
                                                                 "logprobs": {"top_logprobs": [{"token_id:5": -0.1}]}}]}),
                             r"row 1: the completion has 1 log-prob positions but 2 token ids"),
    }
    for case, (line, message) in cases.items():
        src = tmp_path / f"{case}.jsonl"
        src.write_text(json.dumps(resp(ok)) + "\n" + line + "\n")
        with pytest.raises(DataError, match=f"{case}.jsonl: " + message):
            import_source(src, tmp_path / "store", "vllm-logprobs", str(tiny_teacher))
        assert not (tmp_path / "store").exists()


def test_export_of_unfinalized_store_is_refused(tmp_path, tiny_teacher):
    build_store(tiny_teacher, tmp_path / "raw", n_seqs=2, finalize=False)
    r = CliRunner().invoke(kdpipe, ["export", str(tmp_path / "raw"), str(tmp_path / "o"), "--format", "parquet"])
    assert r.exit_code != 0 and "export: " in r.output and "raw/manifest.json: manifest not found; the store is not finalized" in r.output
    assert not (tmp_path / "o").exists()


def test_import_of_p0_logprobs_verifies(tmp_path, tiny_teacher):
    """-inf (p = 0), subnormal and -1e30 log-probs, one position all -inf and one row with no other
    target: the import finishes, and the store it wrote passes finalize + inspect --verify; -inf
    entries are dropped (no mass), the tail is 1 - Σ p of the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ninf = float("-inf")
    rows = [
        _axolotl_row([[5, 6, 7], [8, 9, 10], [11, 12, 13]], [[-30.0, -1e-45, ninf], [ninf] * 3, [-740.0, -1e30, -2.0]],
                     input_ids=(1, 2, 3, 4), sample_id="mixed"),
        _axolotl_row([[5, 6, 7]], [[ninf] * 3], input_ids=(1, 2, 3, 4), sample_id="all-inf"),
    ]
    i32, f32 = pa.int32(), pa.float32()
    schema = pa.schema([("sample_id", pa.string()), ("input_ids", pa.list_(i32)), ("target_token_ids", pa.list_(pa.list_(i32))),
                        ("target_logprobs", pa.list_(pa.list_(f32))), ("target_mask", pa.list_(pa.list_(pa.int8())))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "p0.parquet")
    store = tmp_path / "s"
    assert "imported 2 sequences" in cli("import", tmp_path / "p0.parquet", store, "--format", "axolotl", "--tokenizer", tiny_teacher)
    cli("finalize", store)
    r = CliRunner().invoke(kdpipe, ["inspect", str(store), "--verify"])
    assert r.exit_code == 0 and "BAD SHARD" not in r.output, r.output
    got = records(store)
    m = got["mixed"]
    assert m.target_positions.tolist() == [1, 2, 3]
    assert m.ids[0][m.ids[0] >= 0].tolist() == [6, 5] and (m.ids[1] == -1).all() and m.ids[2][m.ids[2] >= 0].tolist() == [13, 11, 12]
    np.testing.assert_allclose(m.tail, [0.0, 1.0, 1 - np.exp(-2.0) - np.exp(-740.0)], atol=1e-6)  # p = 1 - 1e-45 fills 0
    assert m.tail[1] == 1.0 and np.exp(m.logprobs[2, 2].astype(np.float64)) == 0.0
    a = got["all-inf"]
    assert a.ids.shape == (1, 0) and a.tail.tolist() == [1.0]


def test_parquet_export_imports_back(topk_store, tiny_teacher, tmp_path):
    """README: "as Parquet ... and back": export --format parquet -> import --format parquet -> finalize ->
    inspect --verify -> the same targets, text and cache-relevant meta; an old export (kdpipe_meta.json beside
    the files, column `tail`) imports too; axolotl's format on it says which format to use."""
    import pyarrow.parquet as pq

    from kdpipe.storage import open_store

    out = tmp_path / "pq"
    cli("export", topk_store, out, "--format", "parquet", "--rows-per-file", "10")
    r = CliRunner().invoke(kdpipe, ["import", str(out), str(tmp_path / "x"), "--format", "axolotl", "--tokenizer", str(tiny_teacher)])
    assert r.exit_code != 0 and "kdpipe's Parquet export columns (target_positions), not axolotl's; import them with " \
        "--format parquet" in r.output
    back = tmp_path / "back"
    assert "imported 24 sequences" in cli("import", out, back, "--format", "parquet", "--tokenizer", tiny_teacher)
    cli("finalize", back)
    assert "BAD SHARD" not in cli("inspect", back, "--verify")
    a, b = open_store(topk_store), open_store(back)
    recs = records(topk_store)
    assert_same_targets(recs, records(back), a.meta.codec)
    assert {s: r.text for s, r in records(back).items()} == {s: r.text for s, r in recs.items()}
    assert (b.meta.teacher, b.meta.dataset_fingerprint, b.meta.codec) == (a.meta.teacher, a.meta.dataset_fingerprint, a.meta.codec)

    old = tmp_path / "old"
    old.mkdir()
    for f in sorted(out.glob("*.parquet")):
        t = pq.read_table(f)
        side = t.schema.metadata[b"kdpipe_meta"]
        pq.write_table(t.rename_columns(["tail" if c == "tail_mass" else c for c in t.column_names]).replace_schema_metadata(None),
                       old / f.name)
    (old / "kdpipe_meta.json").write_bytes(side)
    cli("import", old, tmp_path / "back-old", "--format", "parquet", "--tokenizer", tiny_teacher)
    assert_same_targets(recs, records(tmp_path / "back-old"), a.meta.codec)
    assert open_store(tmp_path / "back-old").meta.teacher == a.meta.teacher


@pytest.mark.parametrize("fmt", ["axolotl", "parquet"])
def test_unreadable_parquet_is_one_line_naming_the_file(topk_store, tiny_teacher, tmp_path, fmt):
    cli("export", topk_store, tmp_path / "pq", "--format", "parquet")
    good = (tmp_path / "pq" / "data-00000.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.parquet").write_text("sample_id,input_ids\na,1 2 3\n")
    for bad in ("cut.parquet", "text.parquet"):
        r = CliRunner().invoke(kdpipe, ["import", str(tmp_path / bad), str(tmp_path / "s"), "--format", fmt,
                                        "--tokenizer", str(tiny_teacher)])
        assert r.exit_code != 0 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert f"{tmp_path / bad}: not a readable Parquet file (" in r.output, r.output
        assert not (tmp_path / "s").exists()


def test_imported_store_without_tokenizer_files_says_so(tmp_path, tiny_teacher, tiny_student):
    """An imported store whose teacher_tokenizer/ is missing (imports before it was saved): the error says
    it was imported and to pass the import's tokenizer, not that an old phase one wrote it."""
    import shutil

    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.xtok.hooks import load_teacher_tokenizer
    from kdpipe.storage import open_store

    src = _write(tmp_path / "a.jsonl", [_axolotl_row([[5, 6]], [[-1.0, -2.0]], sample_id="a")])
    cli("import", src, tmp_path / "s", "--format", "axolotl", "--tokenizer", tiny_teacher)
    cfg = TrainConfig(student=str(tiny_student), stores=(str(tmp_path / "s"),), out=str(tmp_path / "run"), steps=1)
    assert load_teacher_tokenizer(cfg, open_store(tmp_path / "s")) is not None  # saved by the import
    shutil.rmtree(tmp_path / "s" / "teacher_tokenizer")
    with pytest.raises(ConfigError, match=r"carries no teacher_tokenizer/ \(it was imported from axolotl \(`kdpipe "
                                          r"import`\) by a kdpipe that did not save the --tokenizer it was given\).*"
                                          r"\(the import's --tokenizer\)"):
        load_teacher_tokenizer(cfg, open_store(tmp_path / "s"))
