"""Shared helpers for the phase-one tests: tiny datasets, reading stores, the transformers reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = (
    "the city council approved a new budget for parks and schools on monday researchers in paris reported "
    "that river reached its highest level ten years quick brown fox jumps over lazy dog question who answer"
).split()


def make_docs(n: int, seed: int = 0, sentences: int = 2) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(sentences):
            words = rng.choice(WORDS, size=int(rng.integers(5, 12)))
            sents.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sents))
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_records(store: Path) -> dict:
    """id -> Record of a store (finalized here if needed), read in order."""
    from kdpipe.storage import StoreReader, finalize_store

    if not (Path(store) / "manifest.json").exists():
        finalize_store(store)
    recs = {}
    for r in StoreReader(str(store), shuffle=False):
        assert r.sample_id not in recs, f"sample {r.sample_id} stored twice"
        recs[r.sample_id] = r
    return recs


class Reference:
    """The same teacher under plain transformers (fp32): full-vocabulary log-probs by forward pass."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(self, input_ids, positions) -> np.ndarray:
        """[P, V] log p(. | input_ids[:t]) at each target position t."""
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([list(map(int, input_ids))])).logits[0]  # [L, V]
            pos = torch.tensor(np.asarray(positions, dtype=np.int64))
            return torch.log_softmax(logits[pos - 1].double(), dim=-1).numpy()


def check_against_reference(rec, ref_lp: np.ndarray, lp_tol: float, tie_gap: float = 1e-4) -> dict:
    """Stored ids equal the reference top-K where not tied; stored log-probs and tail within tolerance.

    ref_lp [P, V] float64. Returns counts for the caller's sanity checks.
    """
    P, K = rec.ids.shape
    order = np.argsort(-ref_lp, axis=1, kind="stable")[:, : K + 1]  # [P, K+1]
    ref_top = np.take_along_axis(ref_lp, order, axis=1)  # [P, K+1]
    compared = 0
    for p in range(P):
        valid = rec.ids[p] >= 0
        assert valid.sum() == K, f"position {p}: {valid.sum()} entries kept, expected {K}"
        for j in range(K):
            gap_prev = np.inf if j == 0 else ref_top[p, j - 1] - ref_top[p, j]
            gap_next = ref_top[p, j] - ref_top[p, j + 1]
            if min(gap_prev, gap_next) > tie_gap:
                assert rec.ids[p, j] == order[p, j], f"position {p} rank {j}: id {rec.ids[p, j]} != reference {order[p, j]}"
                compared += 1
        # every stored log-prob is the reference log-prob of that id, within tolerance
        err = np.abs(rec.logprobs[p].astype(np.float64) - ref_lp[p, rec.ids[p]])
        assert err.max() <= lp_tol, f"position {p}: log-prob error {err.max():.2e} > {lp_tol:.2e}"
        # tail: the teacher's mass outside the kept ids (exact, from the unquantized log-probs)
        true_tail = 1.0 - np.exp(ref_lp[p, rec.ids[p]]).sum()
        assert abs(float(rec.tail[p]) - true_tail) <= 1e-4, f"position {p}: tail {rec.tail[p]} != {true_tail}"
    return {"positions": P, "ids_compared": compared}


def compare_stores(a: dict, b: dict, lp_tol: float, tie: float = 1e-4) -> None:
    """Two stores hold the same samples, sequences and targets; teacher entries agree within lp_tol.

    An id may differ between the two only at a rank boundary tie (its log-prob within `tie` of
    the smallest kept log-prob), where numerics decide which of the tied ids is kept.
    """
    assert set(a) == set(b)
    for sid in a:
        ra, rb = a[sid], b[sid]
        assert ra.input_ids.tolist() == rb.input_ids.tolist(), sid
        assert ra.target_positions.tolist() == rb.target_positions.tolist(), sid
        for p in range(len(ra.target_positions)):
            da = {int(i): float(v) for i, v in zip(ra.ids[p], ra.logprobs[p]) if i >= 0}
            db = {int(i): float(v) for i, v in zip(rb.ids[p], rb.logprobs[p]) if i >= 0}
            for i in da.keys() & db.keys():
                assert abs(da[i] - db[i]) <= lp_tol, (sid, p, i, da[i], db[i])
            for d, other in ((da, db), (db, da)):
                for i in d.keys() - other.keys():
                    assert d[i] <= min(other.values()) + lp_tol + tie, (sid, p, i, "differs beyond a boundary tie")
            assert abs(float(ra.tail[p]) - float(rb.tail[p])) <= 1e-4 + tie, (sid, p)
