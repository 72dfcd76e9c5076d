"""Reference NLL and calibration (pipeline/evaluate/calibration.py) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdpipe.pipeline.evaluate.calibration import (
    ECE_BINS, TokenScores, expected_calibration_error, reference_scores, summarize_scores,
)


def test_ece_by_hand():
    # 15 bins of width 1/15, bin b = (b/15, (b+1)/15]:
    # 0.05 -> 0, 0.10 -> 1, 0.50 -> 7, 0.55 -> 8, 0.95 and 1.0 -> 14.
    conf = np.array([0.05, 0.10, 0.50, 0.55, 0.95, 1.00])
    corr = np.array([0, 0, 1, 0, 1, 1], bool)
    # per bin n_b/N·|acc−conf|: 1/6·.05 + 1/6·.10 + 1/6·.5 + 1/6·.55 + 2/6·|1 − .975|
    want = (0.05 + 0.10 + 0.50 + 0.55 + 2 * 0.025) / 6
    assert expected_calibration_error(conf, corr) == pytest.approx(want, abs=1e-12)
    assert ECE_BINS == 15
    # Perfect calibration inside one bin, and the empty case.
    assert expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0], bool)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(expected_calibration_error(np.zeros(0), np.zeros(0, bool)))
    # Two bins: a single bin with everything would hide the miscalibration of each half.
    assert expected_calibration_error(np.array([0.2, 0.9]), np.array([1, 0], bool), bins=2) == pytest.approx((0.8 + 0.9) / 2)


def test_summary_pools_tokens_and_bootstraps_by_example():
    ts = TokenScores(
        logprob=np.log(np.array([0.5, 0.25, 0.5, 0.125, 0.5])),
        confidence=np.array([0.5, 0.6, 0.5, 0.9, 0.7]),
        correct=np.array([1, 0, 1, 0, 1], bool),
        example=np.array([0, 0, 1, 1, 2]),
    )
    s = summarize_scores(ts, 3, samples=200)
    nll = -np.log([0.5, 0.25, 0.5, 0.125, 0.5]).mean()  # pooled over the 5 tokens, not a mean of example means
    assert s["nll_ref"]["mean"] == pytest.approx(nll)
    assert s["nll_ref"]["ci_low"] <= s["nll_ref"]["mean"] <= s["nll_ref"]["ci_high"]
    assert s["nll_ref"]["tokens"] == 5 and s["nll_ref"]["n"] == 3
    assert s["per_example_nll"] == pytest.approx([-np.log([0.5, 0.25]).mean(), -np.log([0.5, 0.125]).mean(), -np.log(0.5)])
    assert s["ece"]["mean"] == pytest.approx(expected_calibration_error(ts.confidence, ts.correct))
    assert s["ece"]["ci_low"] <= s["ece"]["mean"] + 1e-12 and s["ece"]["bins"] == 15
    assert s["top1_accuracy"] == pytest.approx(0.6)


def test_reference_scores_match_a_dense_forward(tmp_path):
    """A real tiny model: NLL and ECE equal a direct computation from its logits on prompt + reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE
    from kdpipe.pipeline.prompts import Prompter
    from kdpipe.pipeline.tiny import TinyModelConfig, build_tiny

    model_dir = build_tiny(tmp_path / "m", cfg=TinyModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, seed=3))
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = ["The city council approved a new budget.", "Researchers in Paris reported that the river rose, again and again."]
    refs = ["Council approves budget.", "The river reached its highest level in ten years."]
    got = reference_scores(str(model_dir), tok, docs, refs, DEFAULT_SUMMARIZE_TEMPLATE, samples=100)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pr = Prompter(tok, True, None)
    lps, confs, corrs = [], [], []
    for d, r in zip(docs, refs):
        user = DEFAULT_SUMMARIZE_TEMPLATE.replace("{text}", d)
        p, t = pr.ids(user), pr.target_ids(user, r)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), -1)  # [L, V]
        for j, y in enumerate(t):  # position len(p)+j-1 predicts target j
            row = logp[len(p) + j - 1]
            lps.append(row[y].item())
            confs.append(row.exp().max().item())
            corrs.append(int(row.argmax()) == y)
    assert got["nll_ref"]["mean"] == pytest.approx(-np.mean(lps), rel=1e-5)
    assert got["nll_ref"]["tokens"] == len(lps)
    assert got["ece"]["mean"] == pytest.approx(expected_calibration_error(np.array(confs), np.array(corrs)), abs=1e-5)


def test_evaluate_reports_reference_scores_and_quality_by_setting(tmp_path):
    """evaluate() (engine = "hf": no engine start) carries NLL/ECE per model; runs that differ in their
    settings get the quality-by-setting table and sweep.png."""
    import json

    from kdpipe.pipeline.config import write_resolved
    from kdpipe.pipeline.evaluate import EvalConfig, evaluate
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model, build_tiny
    from kdpipe.pipeline.train.config import TrainConfig

    teacher = build_tiny(tmp_path / "teacher", cfg=TinyModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, seed=0))
    runs = []
    for i, alpha in enumerate((0.2, 0.5)):  # two "sweep" runs: real weights and real resolved train configs
        run = tmp_path / f"kd-{alpha}"
        build_model(run / "final", teacher, TinyModelConfig(vocab_size=300, hidden_size=32, num_attention_heads=1,
                                                            num_key_value_heads=1, num_hidden_layers=1, seed=1 + i))
        write_resolved(TrainConfig(student="s", stores=("store",), out=str(run), alpha=alpha, temperature=2.0), run / "train_config.toml")
        runs.append(run)
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "document": d, "summary": s}) + "\n" for i, (d, s) in enumerate([
        ("The city council approved a new budget for parks.", "Council approves park budget."),
        ("Researchers in Paris reported that the river rose.", "Paris river rose."),
        ("Question: who approved the budget? Answer: the city council.", "The council approved it."),
    ])))
    fields = {f for f in EvalConfig.__dataclass_fields__}
    names = {"text_field": "document"} if "text_field" in fields else {"document_field": "document"}
    rep = evaluate(EvalConfig(models=(str(teacher), *map(str, runs)), data=str(data), out=str(tmp_path / "report"), split="",
                              engine="hf", similarity_model="none", max_new_tokens=4, max_model_len=256,
                              bootstrap_samples=100, warmup_requests=1, **names))
    for m in rep["models"]:
        r = m["reference"]
        assert r["nll_ref"]["ci_low"] <= r["nll_ref"]["mean"] <= r["nll_ref"]["ci_high"]
        assert r["nll_ref"]["n"] == 3 and r["ece"]["bins"] == 15 and 0.0 <= r["ece"]["mean"] <= 1.0
        assert len(m["latency"]["per_request_s"]) == 3
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Likelihood of the references and calibration" in md
    assert "## Quality by setting" in md and "NLL(ref)" in md
    assert (tmp_path / "report" / "sweep.png").is_file()
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["models"][1]["reference"]["nll_ref"]["mean"] == pytest.approx(rep["models"][1]["reference"]["nll_ref"]["mean"])
