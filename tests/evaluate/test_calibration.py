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

    from kdpipe.pipeline.generate.config import DEFAULT_SUMMARIZE_TEMPLATE
    from kdpipe.pipeline.generate.recipes import Prompter
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
