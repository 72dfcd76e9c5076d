"""Cross-tokenizer KD end to end (issue 13): real vLLM phase one with tokenizer A (byte-level BPE) ->
finalize -> `kdpipe inspect --verify` -> train-student with tokenizer B (Unigram + byte fallback)
through the CLI -> the loss decreases -> the saved student loads in transformers.

The teacher pass is teacher-forced (`score` recipe, the reference text as targets), so the
targets are real text whatever the random tiny teacher would generate.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from kdtest import require

pytestmark = pytest.mark.vllm

REFS = [
    "The city council approved a new budget for parks and schools.",
    "Researchers in Paris reported that the river reached its highest level.",
    "Question: who approved the budget? Answer: the city council.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Entities: Paris (LOCATION), Monday (DATE), city council (ORGANIZATION).",
    "Summarize the following text in one sentence, please: café, naïve, 😀.",
]


@pytest.fixture(scope="module")
def student_b(tmp_path_factory):
    from kdpipe.pipeline.tiny import DEFAULT_CORPUS, TinyModelConfig, build_model, build_unigram_tokenizer

    out = tmp_path_factory.mktemp("xtok_student")
    build_unigram_tokenizer(out, [DEFAULT_CORPUS.lower()] * 3 + REFS, vocab_size=380)
    # head_dim 32: vLLM's CPU attention has no kernel for smaller heads
    build_model(out, out, TinyModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, seed=1))
    return out


def test_phase_one_with_tokenizer_a_trains_a_student_with_tokenizer_b(tiny_teacher, student_b, shared_vllm_engine, tmp_path):
    require("vllm", "phase one runs on vLLM")  # on the session's shared scoring engine (tests/conftest.py): no engine start here
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.pipeline.cli import main as cli
    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import generate_logits
    from kdpipe.storage import finalize_store, open_store

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"x{i}", "text": f"Document {i}: {r}", "ref": r}) + "\n"
                            for i, r in enumerate(REFS * 2)))
    store = tmp_path / "store"
    s = generate_logits(GenerateConfig(
        teacher=str(tiny_teacher), data=str(docs), out=str(store), codec="topk", recipe="score", engine="vllm",
        target_field="ref", id_field="id", top_k=8, max_model_len=shared_vllm_engine.max_model_len, dtype="float32",
        enforce_eager=True, progress=False), engine=shared_vllm_engine)
    assert s.written == 12, s.line()
    assert (store / "teacher_tokenizer" / "tokenizer.json").exists()  # phase one saved the teacher's tokenizer
    finalize_store(str(store))
    assert "teacher_tokenizer" in open_store(store).raw
    r = CliRunner().invoke(cli, ["inspect", str(store), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["ok"]

    # the student with another tokenizer, through the real CLI: --cross-tokenizer span
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-student", "--student", str(student_b), "--store", str(store), "--out", str(run),
                                 "--cross-tokenizer", "span", "--alpha", "0.5", "--steps", "10", "--lr", "3e-3",
                                 "--tokens-per-batch", "600", "--save-every", "0", "--seed", "0"])
    assert r.exit_code == 0, r.output
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 10 and all(x["loss_kd"] > 0 for x in m)
    assert sum(x["loss"] for x in m[-3:]) < sum(x["loss"] for x in m[:3])  # it learns
    cfg = (run / "train_config.toml").read_text()
    assert 'cross_tokenizer = "span"' in cfg

    # the saved student: its own tokenizer (B), loads in transformers and generates. (Loading RUN/final in
    # vLLM is tests/train/test_vllm_load.py's; a second engine start here would double this test's time.)
    final = run / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(student_b).get_vocab()
    prompt = tok("The city council", add_special_tokens=True).input_ids
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0, len(prompt):].tolist()
    assert len(out) == 5 and all(0 <= t < len(tok) for t in out)
