"""Metric functions against hand-computed values (no engine needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kdpipe.pipeline.evaluate import metrics as M
from kdpipe.storage.errors import ConfigError

from eval_helpers import build_nli


# ------------------------------------------------------------------ ROUGE
def test_rouge_identical_is_one():
    s = M.rouge_scores(["the cat sat on the mat."], ["the cat sat on the mat."])
    for k in M.ROUGE_KEYS:
        assert s[k][0] == pytest.approx(1.0)


def test_rouge_hand_computed():
    # ref: the cat was on the mat | pred: the cat sat on the mat
    # unigram overlap: the x2, cat, on, mat = 5 of 6 on each side -> F1 = 5/6
    # bigrams: {the cat, on the, the mat} shared = 3 of 5 -> 0.6; LCS "the cat on the mat" = 5 -> 5/6
    s = M.rouge_scores(["the cat sat on the mat"], ["the cat was on the mat"])
    assert s["rouge1"][0] == pytest.approx(5 / 6)
    assert s["rouge2"][0] == pytest.approx(0.6)
    assert s["rougeL"][0] == pytest.approx(5 / 6)


def test_rouge_uses_stemming():
    s = M.rouge_scores(["cats running"], ["cat runs"])
    assert s["rouge1"][0] == pytest.approx(1.0)


def test_rouge_lsum_is_sentence_level():
    # Sentences swapped: one LCS over the whole text keeps only half the tokens (a b | c d -> 2 of 4),
    # while Lsum takes the union LCS per reference sentence, which recovers every token.
    pred, ref = "Carol drove home. Alice ate bread.", "Alice ate bread. Carol drove home."
    s = M.rouge_scores([pred], [ref])
    assert s["rougeL"][0] == pytest.approx(0.5)
    assert s["rougeLsum"][0] == pytest.approx(1.0)


def test_rouge_empty_prediction_scores_zero():
    s = M.rouge_scores([""], ["a reference"])
    assert all(s[k][0] == 0.0 for k in M.ROUGE_KEYS)


def test_split_sentences_keeps_abbreviations():
    assert M.split_sentences("Mr. Lee paid 3.5 million. It rained.") == ["Mr. Lee paid 3.5 million.", "It rained."]


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_constant_values_have_zero_width():
    ci = M.bootstrap_ci([0.4] * 10, samples=200)
    assert ci["mean"] == pytest.approx(0.4) and ci["ci_low"] == pytest.approx(0.4) and ci["ci_high"] == pytest.approx(0.4)


def test_bootstrap_contains_mean_and_is_deterministic():
    x = np.random.default_rng(3).random(50)
    a, b = M.bootstrap_ci(x, samples=500, seed=1), M.bootstrap_ci(x, samples=500, seed=1)
    assert a == b
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    assert a["mean"] == pytest.approx(float(x.mean()))
    # ~ mean ± 1.96·sd/sqrt(n) for n = 50
    half = 1.96 * x.std(ddof=1) / math.sqrt(50)
    assert (a["ci_high"] - a["ci_low"]) / 2 == pytest.approx(half, rel=0.25)


def test_bootstrap_empty_is_nan():
    assert math.isnan(M.bootstrap_ci([])["mean"])


# ------------------------------------------------------------------ similarity (bundled all-MiniLM-L6-v2)
@pytest.fixture(scope="module")
def sim_model():
    return M.load_similarity_model("default")


def test_default_similarity_model_is_bundled():
    from pathlib import Path

    p = Path(M.default_similarity_model_path())
    assert (p / "model.safetensors").is_file() and (p / "modules.json").is_file()


def test_cosine_of_identical_texts_is_one(sim_model):
    t = ["The council approved the budget on Monday.", "Rain is expected."]
    assert M.cosine_similarity(sim_model, t, t) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_cosine_orders_related_above_unrelated(sim_model):
    a = ["The city council approved a budget for parks."] * 2
    b = ["The council passed a parks budget.", "Penguins swim in cold water."]
    s = M.cosine_similarity(sim_model, a, b)
    assert s[0] > s[1]


def test_bad_similarity_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="similarity_model"):
        M.load_similarity_model(str(tmp_path / "nope"))


# ------------------------------------------------------------------ NLI
def test_entailment_index_from_label_names():
    assert M.entailment_index({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}) == 2  # roberta-large-mnli
    assert M.entailment_index({"0": "entailment", "1": "neutral", "2": "contradiction"}) == 0
    assert M.entailment_index({0: "not_entailment", 1: "Entailment"}) == 1


@pytest.mark.parametrize("labels", [{0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, {}, {0: "entailment", 1: "ENTAILMENT"}])
def test_entailment_index_refuses_unnamed_or_ambiguous(labels):
    with pytest.raises(ConfigError, match="entailment"):
        M.entailment_index(labels)


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    return build_nli(tmp_path_factory.mktemp("nli"), {0: "contradiction", 1: "neutral", 2: "entailment"})


def test_nli_scorer_reads_entailment_index_from_config(tiny_nli):
    scorer = M.NLIScorer(str(tiny_nli))
    assert scorer.entail == 2
    s = scorer.score(["The council approved a budget. It rained on Monday."] * 2, ["The council approved a budget.", ""])
    assert 0.0 < s[0] < 1.0
    assert s[1] == 0.0  # an empty output entails nothing


def test_nli_scorer_matches_the_softmax_of_its_model(tiny_nli):
    import torch

    scorer = M.NLIScorer(str(tiny_nli))
    premise, hyp = "The council approved a budget.", "The council approved a budget."
    enc = scorer.tokenizer([premise], [hyp], return_tensors="pt")
    with torch.no_grad():
        want = torch.softmax(scorer.model(**enc).logits, -1)[0, 2].item()
    assert scorer.score([premise], [hyp])[0] == pytest.approx(want, abs=1e-5)


def test_nli_aggregation_max_over_chunks_mean_over_sentences(tiny_nli, monkeypatch):
    scorer = M.NLIScorer(str(tiny_nli), chunk_tokens=16)
    src = "Alpha one two three four five six. Beta one two three four five six. Gamma one two three four five six."
    chunks = scorer.chunks(src)
    assert len(chunks) >= 2  # the source does not fit one 16-token chunk
    table = {}  # hypothesis sentence -> p per chunk: max over chunks is what counts

    def fake(premises, hypotheses):
        return np.array([table[h][chunks.index(p)] for p, h in zip(premises, hypotheses)])

    table["First claim."] = [0.1 + 0.1 * i for i in range(len(chunks))][::-1]  # best in chunk 0
    table["Second claim."] = [0.2] * (len(chunks) - 1) + [0.7]  # best in the last chunk
    monkeypatch.setattr(scorer, "_entail_probs", fake)
    got = scorer.score([src], ["First claim. Second claim."])[0]
    assert got == pytest.approx((max(table["First claim."]) + 0.7) / 2)


def test_nli_model_without_entailment_label_is_refused(tmp_path):
    path = build_nli(tmp_path / "bad", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ConfigError, match="no entailment label"):
        M.NLIScorer(str(path))


# ------------------------------------------------------------------ speed and retention
def test_latency_summary_hand_computed():
    s = M.latency_summary([1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40])
    assert s["p50_s"] == pytest.approx(2.5)
    assert s["p95_s"] == pytest.approx(3.85)
    assert s["tokens_per_s"] == pytest.approx(100 / 10)
    assert s["requests"] == 4


def test_speedup_and_retention():
    t = {"p50_s": 2.0, "p95_s": 4.0, "tokens_per_s": 10.0}
    s = {"p50_s": 0.5, "p95_s": 1.0, "tokens_per_s": 40.0}
    assert M.speedup(t, s) == {"p50": 4.0, "p95": 4.0, "tokens_per_s": 4.0}
    r = M.retention({"rougeL": 0.45, "x": 0.0}, {"rougeL": 0.5, "x": 0.0})
    assert r["rougeL"] == pytest.approx(90.0) and math.isnan(r["x"])


# ------------------------------------------------------------------ config and data checks (before any engine)
def test_eval_config_refuses_bad_combinations(tmp_path):
    from kdpipe.pipeline.evaluate.config import EvalConfig

    with pytest.raises(ConfigError, match="names"):
        EvalConfig(models=("a", "b"), names=("x",), data="d", out="o")
    with pytest.raises(ConfigError, match="baseline"):
        EvalConfig(models=("a", "b"), data="d", out="o", baseline="c")
    with pytest.raises(ConfigError, match="unique"):
        EvalConfig(models=("x/final", "x"), data="d", out="o")
    cfg = EvalConfig(models=("runs/kd", "t/final"), data="d", out="o", teacher="t", baseline="kd")
    assert cfg.model_names() == ["kd", "t"] and cfg.teacher_index() == 1 and cfg.baseline_index() == 0


def test_dataset_without_reference_field_is_refused(tmp_path):
    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.evaluate.generate import load_examples
    from kdpipe.storage.errors import DataError

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "text", "split": "heldout"}) + "\n")
    with pytest.raises(DataError, match="line 1 has no field 'summary'"):
        load_examples(EvalConfig(models=("m",), data=str(p), out="o"))


def test_model_without_tokenizer_is_refused(tmp_path, tiny_teacher):
    import shutil

    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.evaluate.generate import load_tokenizers, resolve_model

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_teacher / "config.json", bare / "config.json")
    cfg = EvalConfig(models=(str(bare),), data="d", out="o")
    with pytest.raises(ConfigError, match="no usable tokenizer"):
        load_tokenizers([resolve_model(str(bare), "bare")], cfg)


def test_model_without_chat_template_is_refused_when_others_have_one(tmp_path, tiny_teacher):
    import shutil

    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.evaluate.generate import load_tokenizers, resolve_model

    plain = tmp_path / "plain"
    shutil.copytree(tiny_teacher, plain)
    tc = json.loads((plain / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tc))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    cfg = EvalConfig(models=(str(tiny_teacher), str(plain)), names=("t", "plain"), data="d", out="o")
    specs = [resolve_model(str(tiny_teacher), "t"), resolve_model(str(plain), "plain")]
    with pytest.raises(ConfigError, match="plain have no chat template"):
        load_tokenizers(specs, cfg)


def test_empty_file_says_so(tmp_path):
    """Not "no rows with split == 'heldout'": the file holds no rows at all (issue 23)."""
    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.evaluate.generate import load_examples
    from kdpipe.storage.errors import DataError

    p = tmp_path / "heldout.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match=f"^{p} is empty"):
        load_examples(EvalConfig(models=("m",), data=str(p), out="o"))


def test_context_length_defaults_to_the_models_own(tmp_path, tiny_teacher):
    """Unset: the smallest of the models' own lengths (the demo's 512, not a fixed 1024 vLLM refuses); an
    explicit length above a model's is a one-line error naming that model (issue 23)."""
    import shutil

    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.evaluate.generate import resolve_max_model_len, resolve_model

    short = tmp_path / "short"
    shutil.copytree(tiny_teacher, short)
    c = json.loads((short / "config.json").read_text())
    c["max_position_embeddings"] = 512
    (short / "config.json").write_text(json.dumps(c))
    specs = [resolve_model(str(tiny_teacher), "t"), resolve_model(str(short), "short")]
    assert resolve_max_model_len(specs, EvalConfig(models=("t", "short"), data="d", out="o")) == 512
    assert resolve_max_model_len(specs, EvalConfig(models=("t", "short"), data="d", out="o", max_model_len=256)) == 256
    with pytest.raises(ConfigError, match=r"^max_model_len=1024 is above model 'short' \(.*\)'s context length 512; "
                                          r"lower --max-model-len \(or leave it unset: 512\)$"):
        resolve_max_model_len(specs, EvalConfig(models=("t", "short"), data="d", out="o", max_model_len=1024))
