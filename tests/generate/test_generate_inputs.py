"""Phase one without vLLM: config, data checks, bad inputs (all refused before an engine starts),
truncation, padded vocabularies, recipes and the CLI on the transformers reference engine."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from gen_helpers import Reference, check_against_reference, make_docs, read_records, write_jsonl

from kdpipe.pipeline.generate import run as run_mod
from kdpipe.pipeline.generate.command import generate_logits as cli_command
from kdpipe.pipeline.generate.command import load_generate_config
from kdpipe.pipeline.generate.config import GenerateConfig
from kdpipe.pipeline.generate.data import load_task_data, task_bounds
from kdpipe.pipeline.generate.engines import drop_untokenizable, flat_to_arrays
from kdpipe.pipeline.generate.run import generate_logits
from kdpipe.storage import CodecConfig
from kdpipe.storage.errors import ConfigError, DataError, StoreError

# Stored log-probs are quantized to the codec's step (error <= step/2) on top of engine numerics.
LP_TOL = CodecConfig().logprob_step / 2 + 1e-4


@pytest.fixture
def no_engine(monkeypatch):
    """Any attempt to start an engine fails the test: bad input must be refused before that."""

    def boom(*a, **k):
        raise AssertionError("the engine was started; the error should have come before")

    monkeypatch.setattr(run_mod, "make_engine", boom)


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    return write_jsonl(d / "docs.jsonl", [{"id": f"d{i}", "text": t, "summary": "The council approved a budget."}
                                          for i, t in enumerate(make_docs(6))])


def cfg_for(teacher, data, out, **kw) -> GenerateConfig:
    base = dict(teacher=str(teacher), data=str(data), out=str(out), engine="hf", top_k=8, max_new_tokens=6,
                max_model_len=128, dtype="float32", progress=False, id_field="id")
    base.update(kw)
    return GenerateConfig(**base)


# ---------------------------------------------------------------------------------------------
# pure units


def test_flat_to_arrays_drops_the_sampled_entry_and_padded_ids():
    # Two positions, K=3: sampled token first, then the top-3 (the sampled one may repeat).
    fl = SimpleNamespace(
        start_indices=[0, 4], end_indices=[4, 8],
        token_ids=[7, 7, 600, 3, 9, 2, 9, 5],
        logprobs=[-0.5, -0.5, -1.0, -2.0, -3.0, -0.1, -3.0, -4.0],
    )
    ids, lps = flat_to_arrays(fl, None, 3, vocab_size=500)
    # id 600 is a padded model row (>= len(tokenizer)): dropped, the rest moves up, -1 padding last
    assert ids.tolist() == [[7, 3, -1], [2, 9, 5]]
    assert lps[0, 2] == -np.inf and np.allclose(lps[1], [-0.1, -3.0, -4.0])
    ids2, _ = flat_to_arrays(fl, [1], 3, vocab_size=500)
    assert ids2.tolist() == [[2, 9, 5]]


def test_drop_untokenizable_keeps_order():
    ids = np.array([[5, 900, 4, 901]])
    lps = np.array([[-1.0, -1.5, -2.0, -2.5]], dtype=np.float32)
    out_ids, out_lps = drop_untokenizable(ids, lps, 512)
    assert out_ids.tolist() == [[5, 4, -1, -1]] and out_lps[0, :2].tolist() == [-1.0, -2.0]


@pytest.mark.parametrize("n,t", [(1, 1), (7, 3), (10, 4), (3, 5), (100, 7)])
def test_task_slices_cover_every_row_once(n, t):
    rows = [r for i in range(t) for r in range(*task_bounds(n, i, t))]
    assert rows == list(range(n))


def test_slurm_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.delenv("SLURM_ARRAY_TASK_MIN", raising=False)
    c = GenerateConfig(teacher="t", data="d.jsonl", out=str(tmp_path))
    assert c.resolved_tasks() == (3, 4)
    assert dataclasses.replace(c, task_index=1, num_tasks=2).resolved_tasks() == (1, 2)
    # A resubmitted partial array (--array=1,3 of 4 tasks, with --num-tasks given) keeps the task ids.
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert dataclasses.replace(c, num_tasks=4).resolved_tasks() == (3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    with pytest.raises(ConfigError, match="not in"):
        c.resolved_tasks()


def test_toml_then_flags(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text('[generate]\nteacher = "T"\ndata = "d.jsonl"\nout = "s"\ntop_k = 16\nrecipe = "summarize"\n')
    c = load_generate_config(str(toml), {"top_k": 4, "seed": None})
    assert (c.teacher, c.top_k, c.seed) == ("T", 4, 0)
    toml.write_text('teacher = "T"\ndata = "d.jsonl"\nout = "s"\ntop_kk = 16\n')
    with pytest.raises(ConfigError, match="did you mean 'top_k'"):
        load_generate_config(str(toml), {})


# ---------------------------------------------------------------------------------------------
# bad input: each refused with a clear message, before the engine starts


def test_k_above_max_logprobs():
    with pytest.raises(ConfigError, match="top_k=32 is above max_logprobs=20"):
        GenerateConfig(teacher="t", data="d", out="o", top_k=32, max_logprobs=20)


def test_score_without_target_field():
    with pytest.raises(ConfigError, match="target_field is not set"):
        GenerateConfig(teacher="t", data="d", out="o", recipe="score")


def test_missing_text_column(tiny_teacher, tmp_path, no_engine):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "body": "x"}])
    with pytest.raises(DataError, match="no column 'text'.*columns are id, body"):
        generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s"))


@pytest.mark.parametrize("value,what", [("", "empty"), ("   ", "empty"), (None, "missing")])
def test_empty_or_missing_text_names_the_file_and_line(tiny_teacher, tmp_path, no_engine, value, what):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "ok"}, {"id": "b", "text": "ok"}, {"id": "c", "text": value}])
    with pytest.raises(DataError, match=f"d.jsonl: line 3: text field 'text' is {what}.*; fill it or drop the row"):
        generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s"))


def test_row_messages_give_jsonl_lines_and_other_rows_0_based(tmp_path):
    """A JSON-lines row is named by its 1-based line, blank lines counted as the editor counts them;
    a csv, parquet or .json array row (no line of its own) as "row N (0-based)"."""
    rows = [{"id": "a", "text": "ok"}, {"id": "b", "text": " "}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('\n{"id": "a", "text": "ok"}\n\n{"id": "b", "text": " "}\n', encoding="utf-8")
    want = f"^{re.escape(str(jsonl))}: line 4: text field 'text' is empty; fill it or drop the row$"
    with pytest.raises(DataError, match=want):
        load_task_data(str(jsonl), id_field="id")
    csv = tmp_path / "d.csv"
    csv.write_text("id,text\na,ok\nb, \n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(csv))}: row 1 \\(0-based\\): text field 'text' is empty"):
        load_task_data(str(csv), id_field="id")
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json: row 1 \(0-based\): text field 'text' is empty"):
        load_task_data(str(array), id_field="id")
    lines = write_jsonl(tmp_path / "r.json", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}])
    with pytest.raises(DataError, match=r"r.json: id 'a' repeats \(lines 1 and 3\)"):
        load_task_data(str(lines), id_field="id")


def test_repeated_ids(tiny_teacher, tmp_path, no_engine):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}])
    with pytest.raises(DataError, match=r"id 'a' repeats \(lines 1 and 3\)"):
        generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s"))


def test_non_utf8_file(tiny_teacher, tmp_path, no_engine):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"not valid UTF-8 at byte \d+ \(line 2\)"):
        generate_logits(cfg_for(tiny_teacher, p, tmp_path / "s"))


def test_score_needs_a_nonempty_target(tiny_teacher, tmp_path, no_engine):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x", "ref": "y"}, {"id": "b", "text": "x", "ref": ""}])
    with pytest.raises(DataError, match="d.jsonl: line 2: target field 'ref' is empty"):
        generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s", recipe="score", target_field="ref"))
    with pytest.raises(DataError, match="no column 'summary'"):
        generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s", recipe="score", target_field="summary"))


def test_score_target_ids_outside_the_vocabulary_name_the_line(tiny_teacher, tmp_path, no_engine):
    rows = [{"id": "a", "text": "x", "ref": [1, 2]}, {"id": "b", "text": "x", "ref": [3, 10**6]}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl: line 2 \(id 'b'\): target token id 1000000 is outside the teacher's"):
        generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s", recipe="score", target_field="ref"))


def test_missing_file_and_unknown_type(tiny_teacher, tmp_path, no_engine):
    with pytest.raises(DataError, match="file not found"):
        generate_logits(cfg_for(tiny_teacher, tmp_path / "nope.jsonl", tmp_path / "s"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        generate_logits(cfg_for(tiny_teacher, tmp_path / "d.txt", tmp_path / "s"))


@pytest.mark.parametrize("teacher", ["./models/teacher", "{tmp}/models/teacher", "models/kd/teacher"])
def test_missing_local_teacher_says_no_such_directory(docs_file, tmp_path, no_engine, teacher):
    """Not the hub loader's "Repo id must be in the form ...": the path does not exist, and nothing is written."""
    teacher = teacher.format(tmp=tmp_path)
    r = CliRunner().invoke(cli_command, ["--teacher", teacher, "--data", str(docs_file), "--out", str(tmp_path / "s")])
    assert r.exit_code != 0 and f"teacher: no such directory: {teacher};" in r.output and "Repo id" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_a_bare_name_that_is_neither_here_nor_reachable_fails_at_once(docs_file, tmp_path, monkeypatch):
    """`--teacher teacher` with no ./teacher and no hub in reach: one line naming the working directory, before
    huggingface_hub's retries (~25 s per file with the network down), for phase one's teacher and the student."""
    from huggingface_hub import constants

    from kdpipe.pipeline.train.command import train_student

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://kdpipe-no-such-host.invalid")  # never resolves (RFC 6761)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli_command, ["--teacher", "teacher", "--data", str(docs_file), "--out", "s"])
    assert r.exit_code != 0 and "teacher: 'teacher' is not a local directory" in r.output, r.output
    assert f"kdpipe-no-such-host.invalid cannot be reached" in r.output and str(tmp_path) in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
    r = CliRunner().invoke(train_student, ["--student", "student", "--store", str(tmp_path), "--out", "run"])
    assert r.exit_code != 0 and "student: 'student' is not a local directory" in r.output, r.output
    # A hub id that is cached is the loader's business even with the host unreachable.
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: str(tmp_path / "config.json"))
    from kdpipe.pipeline.config import check_model_dir

    check_model_dir("teacher", "teacher")


def test_max_model_len_above_teacher(tiny_teacher, docs_file, tmp_path, no_engine):
    with pytest.raises(ConfigError, match="above the teacher's context length 1024"):
        generate_logits(cfg_for(tiny_teacher, docs_file, tmp_path / "s", max_model_len=4096))


def test_store_of_another_codec_or_teacher_is_refused(tiny_teacher, docs_file, tmp_path, monkeypatch):
    out = tmp_path / "s"
    generate_logits(cfg_for(tiny_teacher, docs_file, out, limit=2))
    monkeypatch.setattr(run_mod, "make_engine", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(StoreError, match="written by another teacher/codec.*codec"):
        generate_logits(cfg_for(tiny_teacher, docs_file, out, limit=2, codec="sampled", draws=20))
    with pytest.raises(StoreError, match="written by another teacher/codec"):
        generate_logits(cfg_for(tiny_teacher, docs_file, out, limit=2, top_k=4))


# ---------------------------------------------------------------------------------------------
# behaviour on the transformers engine


def test_too_long_truncate_or_skip(tiny_teacher, tmp_path):
    long_doc = " ".join(make_docs(40, seed=3))
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "short", "text": "The fox."}, {"id": "long", "text": long_doc}])
    s = generate_logits(cfg_for(tiny_teacher, data, tmp_path / "t", too_long="truncate", max_model_len=64))
    assert s.written == 2 and s.stats.get("truncated") == 1
    recs = read_records(tmp_path / "t")
    assert len(recs["long"].input_ids) <= 64
    s = generate_logits(cfg_for(tiny_teacher, data, tmp_path / "k", too_long="skip", max_model_len=64))
    assert s.written == 1 and s.stats.get("skipped_too_long") == 1
    assert "skipped_too_long 1" in s.line()
    assert set(read_records(tmp_path / "k")) == {"short"}


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory, tiny_corpus):
    """The tiny tokenizer with a model vocabulary padded beyond it (as Qwen2.5: 152,064 vs 151,936)."""
    from kdpipe.pipeline.tiny import TinyModelConfig, build_tiny

    return build_tiny(tmp_path_factory.mktemp("padded"), tiny_corpus, TinyModelConfig(seed=0, model_vocab_size=520))


def test_padded_vocabulary_stores_tokenizer_ids_and_tail_holds_the_rest(padded_teacher, docs_file, tmp_path):
    from transformers import AutoTokenizer

    V = len(AutoTokenizer.from_pretrained(padded_teacher))
    assert V < 520
    cfg = cfg_for(padded_teacher, docs_file, tmp_path / "s", recipe="score", target_field="summary", top_k=16)
    generate_logits(cfg)
    ref = Reference(padded_teacher)
    saw_padded = False
    for rec in read_records(tmp_path / "s").values():
        lp = ref.logprobs(rec.input_ids, rec.target_positions)  # [P, 520]
        assert rec.ids.max() < V
        top = np.argsort(-lp, axis=1)[:, :16]
        saw_padded |= bool((top >= V).any())
        # kept = the top-16 minus padded rows; the tail is 1 - their mass, so it includes the padded rows' mass
        for p in range(len(rec.tail)):
            kept = [int(i) for i in top[p] if i < V]
            assert sorted(rec.ids[p][rec.ids[p] >= 0].tolist()) == sorted(kept)
            assert abs(float(rec.tail[p]) - (1 - np.exp(lp[p, kept]).sum())) < 1e-4
    assert saw_padded, "the test should exercise padded ids in the teacher's top-k"


def test_basic_reading_targets_are_the_reading_spans(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "Dr. Smith went to Paris. He saw the river. It was high."}])
    s = generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s", recipe="basic-reading", max_new_tokens=5, max_model_len=512))
    rec = read_records(tmp_path / "s")["a"]
    assert s.stats["readings"] == 3  # pysbd keeps "Dr. Smith" in one sentence
    ids = rec.input_ids.tolist()
    sep = tok.convert_tokens_to_ids("<sep>")
    seps = [i for i, t in enumerate(ids) if t == sep]
    assert len(seps) == 6  # s1 <sep> r1 <sep> s2 <sep> r2 <sep> s3 <sep> r3 <sep>
    expected = [t for a, b in zip(seps[0::2], seps[1::2]) for t in range(a + 1, b + 1)]  # each reading + its closing <sep>
    assert rec.target_positions.tolist() == expected
    assert "Dr. Smith went to Paris. <sep>" in rec.text
    check_against_reference(rec, Reference(tiny_teacher).logprobs(rec.input_ids, rec.target_positions), LP_TOL)


def test_cli_with_toml_and_override_writes_resolved_config(tiny_teacher, docs_file, tmp_path):
    import tomllib

    toml = tmp_path / "job.toml"
    toml.write_text(
        f'teacher = "{tiny_teacher}"\ndata = "{docs_file}"\nout = "{tmp_path / "s"}"\nengine = "hf"\n'
        f'top_k = 16\nmax_new_tokens = 4\nmax_model_len = 128\nlimit = 3\nid_field = "id"\nprogress = false\n'
    )
    r = CliRunner().invoke(cli_command, ["--config", str(toml), "--top-k", "8", "--codec", "sampled", "--draws", "10"])
    assert r.exit_code == 0, r.output
    assert "wrote 3 samples" in r.output
    resolved = tomllib.loads((tmp_path / "s" / "generate-config.toml").read_text())
    assert resolved["top_k"] == 8 and resolved["codec"] == "sampled" and resolved["limit"] == 3
    recs = read_records(tmp_path / "s")
    # sampled codec: counts / draws over the kept ids + tail bucket sum to one
    for rec in recs.values():
        mass = np.where(rec.ids >= 0, np.exp(rec.logprobs), 0).sum(1) + rec.tail
        assert np.allclose(mass, 1.0, atol=1e-5)
    # a bad flag is one clear line, no traceback
    r = CliRunner().invoke(cli_command, ["--config", str(toml), "--top-k", "8", "--max-logprobs", "4"])
    assert r.exit_code != 0 and "--top-k=8 is above --max-logprobs=4" in r.output and "Traceback" not in r.output


def test_sigterm_finishes_the_open_shard_and_rerun_completes(tiny_teacher, tmp_path):
    """SIGTERM mid-run: exit 143, finished work kept as shards, task incomplete; a rerun completes it."""
    n = 150
    rows = [{"id": f"d{i}", "text": t, "ref": "The council approved it."} for i, t in enumerate(make_docs(n, seed=5))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "s"
    opts = dict(recipe="score", target_field="ref", shard_mb=0.002)
    args = [sys.executable, "-m", "kdpipe.pipeline.cli", "generate-logits", "--teacher", str(tiny_teacher),
            "--data", str(data), "--out", str(out), "--engine", "hf", "--top-k", "8", "--recipe", "score",
            "--target-field", "ref", "--max-model-len", "128", "--max-new-tokens", "6", "--dtype", "float32",
            "--id-field", "id", "--no-progress", "--shard-mb", "0.002"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(out.glob("shard-*.arrow")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "INTERRUPTED" in output
    task = json.loads((out / "tasks" / "task-00000.json").read_text())
    assert task["complete"] is False
    kept = sum(s["rows"] for s in task["shards"])
    assert 0 < kept < n
    s = generate_logits(cfg_for(tiny_teacher, data, out, **opts))
    assert s.already_done == kept and s.written == n - kept
    assert sorted(read_records(out), key=lambda x: int(x[1:])) == [r["id"] for r in rows]


def test_local_teacher_revision_changes_when_weights_change(tmp_path):
    """A retrained local teacher at the same path must not reuse a store (its cache key differs)."""
    from kdpipe.pipeline.generate.teacher import local_model_revision

    (tmp_path / "config.json").write_text('{"a": 1}')
    w = tmp_path / "model.safetensors"
    w.write_bytes(bytes(3 << 20))
    r0 = local_model_revision(tmp_path)
    assert r0 == local_model_revision(tmp_path) and r0.startswith("local:")
    data = bytearray(w.read_bytes())
    data[(3 << 20) // 2] = 1  # a change in the middle of the weights
    w.write_bytes(bytes(data))
    assert local_model_revision(tmp_path) != r0


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_says_so(tiny_teacher, tmp_path, no_engine, content):
    """An empty JSONL used to end in a bare `StopIteration:` from `datasets` (issue 23)."""
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(data))} is empty"):
        generate_logits(cfg_for(tiny_teacher, data, tmp_path / "s"))
