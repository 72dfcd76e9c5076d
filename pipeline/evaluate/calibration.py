"""Teacher-forced scores on the human references: mean NLL per target token and calibration (ECE).

Generation metrics (ROUGE on greedy decodes) are noisy at small scale; the likelihood a model
gives the human reference is not. For each example the model reads the summarize prompt (built
exactly as phase one builds it) followed by the reference as the answer (`Prompter.target_ids`:
the reference plus its end-of-turn marker, the targets of phase one's `score` recipe), and at
every target position t we keep

    log p(y_t | y_<t)            -> NLL = −Σ_t log p(y_t) / (number of target tokens), pooled over examples
    c_t = max_v p(v | y_<t)      top-1 confidence of the next-token distribution
    a_t = [argmax_v p(v) == y_t] whether that top-1 token is the reference token

Expected calibration error (Guo et al., 2017), with B = 15 equal-width bins over the top-1
confidence, bin b = (b/B, (b+1)/B] (confidence 0 goes to bin 0):

    ECE = Σ_b (n_b / N) · |mean(a in b) − mean(c in b)|

A perfectly calibrated model's top-1 confidence equals its top-1 accuracy in every bin.
CIs come from a bootstrap over examples (the tokens of one example move together).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width confidence bins (b/B, (b+1)/B]; see the module doc."""
    c = np.asarray(confidence, dtype=np.float64)  # [N]
    a = np.asarray(correct, dtype=np.float64)  # [N]
    if c.shape != a.shape:
        raise ValueError(f"{c.shape} confidences for {a.shape} correctness flags")
    if c.size == 0:
        return math.nan
    b = np.clip(np.ceil(c * bins).astype(np.int64) - 1, 0, bins - 1)  # [N]; (b/B, (b+1)/B] -> b
    n = np.bincount(b, minlength=bins).astype(np.float64)  # [B]
    conf = np.bincount(b, weights=c, minlength=bins)  # [B] sums
    acc = np.bincount(b, weights=a, minlength=bins)  # [B] sums
    # Σ_b n_b/N · |acc_b/n_b − conf_b/n_b| = Σ_b |acc_sum_b − conf_sum_b| / N
    return float(np.abs(acc - conf).sum() / c.size)


@dataclasses.dataclass
class TokenScores:
    """Per target token of every example, in order; `example` says which example a token belongs to."""

    logprob: np.ndarray  # [N] log p(reference token)
    confidence: np.ndarray  # [N] top-1 probability
    correct: np.ndarray  # [N] bool: top-1 token == reference token
    example: np.ndarray  # [N] example index

    def nll(self) -> float:
        return float(-self.logprob.mean()) if self.logprob.size else math.nan

    def ece(self, bins: int = ECE_BINS) -> float:
        return expected_calibration_error(self.confidence, self.correct, bins)


def summarize_scores(ts: TokenScores, num_examples: int, samples: int = 1000, confidence: float = 0.95,
                     seed: int = 0, bins: int = ECE_BINS) -> dict:
    """{"nll_ref": {mean, ci_low, ci_high, n, tokens}, "ece": {...}, "per_example_nll": [...]}, CIs by examples."""
    ex = ts.example.astype(np.int64)
    cnt = np.bincount(ex, minlength=num_examples).astype(np.float64)  # [E] target tokens per example
    nll_sum = np.bincount(ex, weights=-ts.logprob, minlength=num_examples)  # [E]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num_examples, size=(samples, num_examples))  # [S, E]
    w = np.stack([np.bincount(r, minlength=num_examples) for r in idx]).astype(np.float64)  # [S, E] resample counts
    boot_nll = (w @ nll_sum) / np.maximum(w @ cnt, 1.0)  # [S] pooled per-token NLL of each resample
    # ECE of a resample: per example, its tokens' bin counts, confidence sums and accuracy sums.
    b = np.clip(np.ceil(ts.confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    cell = ex * bins + b
    n_eb = np.bincount(cell, minlength=num_examples * bins).reshape(num_examples, bins)  # [E, B]
    c_eb = np.bincount(cell, weights=ts.confidence, minlength=num_examples * bins).reshape(num_examples, bins)
    a_eb = np.bincount(cell, weights=ts.correct.astype(np.float64), minlength=num_examples * bins).reshape(num_examples, bins)
    boot_ece = np.abs(w @ a_eb - w @ c_eb).sum(axis=1) / np.maximum((w @ n_eb).sum(axis=1), 1.0)  # [S]
    q = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]

    def ci(point: float, boot: np.ndarray) -> dict:
        lo, hi = np.quantile(boot, q)
        return {"mean": point, "ci_low": float(lo), "ci_high": float(hi), "n": int(num_examples), "tokens": int(cnt.sum())}

    return {
        "nll_ref": ci(ts.nll(), boot_nll),
        "ece": {**ci(ts.ece(bins), boot_ece), "bins": bins},
        "top1_accuracy": float(ts.correct.mean()) if ts.correct.size else math.nan,
        "per_example_nll": (nll_sum / np.maximum(cnt, 1.0)).tolist(),
    }


def score_references(model_path: str, tokenizer, prompts: Sequence[list[int]], targets: Sequence[list[int]],
                     device: str = "cpu", tokens_per_batch: int = 8192) -> TokenScores:
    """Teacher-forced pass of the model over prompt + target; token scores at the target positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    i = 0
    with torch.no_grad():
        while i < len(order):
            longest = len(prompts[order[i]]) + len(targets[order[i]])
            j = i
            while j < len(order) and (j - i + 1) * max(longest, len(prompts[order[j]]) + len(targets[order[j]])) <= tokens_per_batch:
                longest = max(longest, len(prompts[order[j]]) + len(targets[order[j]]))
                j += 1
            j = max(j, i + 1)
            batch = order[i:j]
            T = max(len(prompts[k]) + len(targets[k]) for k in batch)
            ids = torch.full((len(batch), T), pad, dtype=torch.long)  # [B, T]
            mask = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
            for r, k in enumerate(batch):
                seq = list(prompts[k]) + list(targets[k])
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, T, V]
            for r, k in enumerate(batch):
                p, t = len(prompts[k]), len(targets[k])
                lp = torch.log_softmax(logits[r, p - 1 : p - 1 + t], dim=-1)  # [t, V]: position s predicts token s+1
                tgt = torch.tensor(targets[k], device=lp.device)  # [t]
                conf, top = lp.max(dim=-1)  # [t]
                out[k] = (lp.gather(1, tgt[:, None])[:, 0].cpu().numpy(), conf.exp().cpu().numpy(), (top == tgt).cpu().numpy())
            i = j
    del model
    parts = [out[k] for k in range(len(prompts))]
    return TokenScores(
        logprob=np.concatenate([p[0] for p in parts]).astype(np.float64) if parts else np.zeros(0),
        confidence=np.concatenate([p[1] for p in parts]).astype(np.float64) if parts else np.zeros(0),
        correct=np.concatenate([p[2] for p in parts]).astype(bool) if parts else np.zeros(0, bool),
        example=np.concatenate([np.full(len(targets[k]), k) for k in range(len(prompts))]) if parts else np.zeros(0, np.int64),
    )


def reference_scores(model_path: str, tokenizer, documents: Sequence[str], references: Sequence[str], template: str,
                     use_chat_template: bool = True, system_prompt: str | None = None, device: str = "cpu",
                     samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """NLL per reference token and ECE of one model on (document, reference) pairs; see the module doc."""
    from kdpipe.pipeline.prompts import Prompter

    pr = Prompter(tokenizer, use_chat_template, system_prompt)
    users = [template.replace("{text}", d) for d in documents]
    prompts = [pr.ids(u) for u in users]
    targets = [pr.target_ids(u, r) for u, r in zip(users, references)]
    ts = score_references(model_path, tokenizer, prompts, targets, device)
    return summarize_scores(ts, len(documents), samples, confidence, seed)
