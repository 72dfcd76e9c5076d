"""Compare two stores of the same samples target row by target row, and say how they differ.

    python benchmarks/score_diff.py STORE_A STORE_B [--show 10]

Written for the score path (issue 23): a prefix-cache store against the full-scoring store of
the same input, or two full-scoring runs under different batch compositions. Every target row
(one position of one sequence) falls in exactly one class:
  identical     ids, log-prob codes and tail mass byte for byte equal
  tail          ids and codes equal; the float32 tail mass differs (it is computed from the
                unquantized log-probs, so any last-bit change of the engine's numbers shows here)
  codes         same ids in the same order; some quantized log-probs differ (a value that sat on
                a rounding edge of the codec fell on the other side)
  rank_swap     the same ids in another order (a near-tie among the top-K changed sides)
  set           a different id set (a near-tie at the K-th place: one id in, the other out)
  structure     different sequences, target positions or a missing sample (a real bug)
For every row that is not identical: max |Δ log p̂| over the ids both stores kept, the largest
code step between them, the tie gap of each swap (how many codec steps apart the swapped pair
sits in store A; 0 = the same stored value), and |Δ tail|. The last stdout line is one JSON
object (`diff_stores`' result).

The bound (docs/generate.md, "Scoring routes"): vLLM's CPU kernels are not batch-invariant, so
two runs of the same sequences in different batches (the two score routes, or one route under
another load) differ in the last bits of float32 log-probs (measured: |Δ log p| <= 1e-6). In a
store that shows as: the same samples, sequences and positions; every id kept by both within
CODE_STEPS codec steps; a different order or membership only between entries within CODE_STEPS
steps of each other (near-ties); |Δ tail| <= TAIL_EPS. `within_bound` says whether that held.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

CLASSES = ("identical", "tail", "codes", "rank_swap", "set", "structure")
CODE_STEPS = 1  # a value on a rounding edge of the codec may fall on either side
TAIL_EPS = 1e-6  # float32 tail mass 1 - sum(p): last-bit changes of the K terms (measured <= 1.2e-7)


def load(store: str | Path) -> dict:
    """sample id -> Record, finalizing a store a run left unfinalized."""
    from kdpipe.storage import StoreReader, finalize_store

    store = Path(store)
    if not (store / "manifest.json").exists():
        finalize_store(str(store))
    return {r.sample_id: r for r in StoreReader(str(store), shuffle=False)}


def _codes(lp: np.ndarray, codec) -> np.ndarray:
    """Decoded log p̂ -> its code in the codec's table (so two values' distance is in steps)."""
    from kdpipe.storage.codecs import codec_table

    table = codec_table(codec)  # [65536], decreasing in the code
    return np.searchsorted(-table, -np.asarray(lp, dtype=np.float32), side="left")


def row_diff(ids_a, lp_a, tail_a, ids_b, lp_b, tail_b, codec=None) -> dict:
    """One target row of each store ([K] ids, [K] log p̂, tail) -> its class and sizes.

    `codec`: the stores' CodecConfig (default: the default codec), to count steps between values.
    """
    from kdpipe.storage import CodecConfig

    codec = codec or CodecConfig()
    ka, kb = ids_a >= 0, ids_b >= 0
    ia, ib, la, lb = ids_a[ka], ids_b[kb], lp_a[ka], lp_b[kb]
    same_ids = np.array_equal(ia, ib)
    same_lp = same_ids and np.array_equal(la, lb)
    d = {"tail_delta": float(abs(np.float64(tail_a) - np.float64(tail_b)))}
    if same_lp:
        d["class"] = "identical" if tail_a == tail_b else "tail"
        return d
    common, pa, pb = np.intersect1d(ia, ib, return_indices=True)
    d["max_abs_dlogprob"] = float(np.max(np.abs(la[pa] - lb[pb]))) if len(common) else float("inf")
    d["max_code_step"] = int(np.max(np.abs(_codes(la[pa], codec) - _codes(lb[pb], codec)))) if len(common) else -1
    if same_ids:
        d["class"] = "codes"
        return d
    gaps = []
    if set(ia.tolist()) == set(ib.tolist()):
        d["class"] = "rank_swap"
        # pairs ordered differently: (i before j in A, j before i in B); their gap in A's values
        rank_b = {int(t): r for r, t in enumerate(ib)}
        ca = _codes(la, codec)
        for x in range(len(ia)):
            for y in range(x + 1, len(ia)):
                if rank_b[int(ia[x])] > rank_b[int(ia[y])]:
                    gaps.append(int(abs(ca[x] - ca[y])))
    else:
        d["class"] = "set"
        # an id kept by one store only: how many steps from the other store's last kept value
        for ids, lps, other_ids, other_lps in ((ia, la, ib, lb), (ib, lb, ia, la)):
            for i in np.flatnonzero(~np.isin(ids, other_ids)):
                last = _codes(other_lps[-1:], codec)[0] if len(other_lps) else -10**6
                gaps.append(int(abs(_codes(lps[i : i + 1], codec)[0] - last)))
    d["tie_gap_steps"] = max(gaps) if gaps else 0
    return d


def diff_stores(a: str | Path, b: str | Path, show: int = 10) -> dict:
    """Row-by-row comparison of two stores (module doc); JSON-ready."""
    from kdpipe.storage import open_store

    ra, rb = load(a), load(b)
    codec = open_store(str(a)).meta.codec
    counts: Counter = Counter()
    worst = {"max_abs_dlogprob": 0.0, "max_code_step": 0, "max_tie_gap_steps": 0, "max_tail_delta": 0.0}
    examples: list[dict] = []
    rel_pos: list[float] = []  # where in its sequence a differing row sits (0 = first target row)
    for sid in sorted(set(ra) | set(rb)):
        x, y = ra.get(sid), rb.get(sid)
        if x is None or y is None or not np.array_equal(x.input_ids, y.input_ids) \
                or not np.array_equal(x.target_positions, y.target_positions):
            counts["structure"] += len((x or y).target_positions)
            examples.append({"sample": sid, "class": "structure"})
            continue
        P = len(x.target_positions)
        for j in range(P):
            d = row_diff(x.ids[j], x.logprobs[j], x.tail[j], y.ids[j], y.logprobs[j], y.tail[j], codec)
            counts[d["class"]] += 1
            if d["class"] == "identical":
                continue
            worst["max_tail_delta"] = max(worst["max_tail_delta"], d["tail_delta"])
            worst["max_abs_dlogprob"] = max(worst["max_abs_dlogprob"], d.get("max_abs_dlogprob", 0.0))
            worst["max_code_step"] = max(worst["max_code_step"], d.get("max_code_step", 0))
            worst["max_tie_gap_steps"] = max(worst["max_tie_gap_steps"], d.get("tie_gap_steps", 0))
            rel_pos.append(j / max(P - 1, 1))
            if len(examples) < show:
                examples.append({"sample": sid, "row": j, "position": int(x.target_positions[j]), **d})
    total = sum(counts.values())
    within = (counts["structure"] == 0 and worst["max_code_step"] <= CODE_STEPS
              and worst["max_tie_gap_steps"] <= CODE_STEPS and worst["max_tail_delta"] <= TAIL_EPS)
    return {
        "rows": total,
        "exact_match_rate": round(counts["identical"] / max(total, 1), 6),
        "within_bound": bool(within),
        "classes": {c: counts[c] for c in CLASSES},
        **{k: (round(v, 9) if isinstance(v, float) else v) for k, v in worst.items()},
        "differing_rows_mean_relative_position": round(float(np.mean(rel_pos)), 3) if rel_pos else None,
        "examples": examples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store_a")
    ap.add_argument("store_b")
    ap.add_argument("--show", type=int, default=10, help="differing rows to list")
    args = ap.parse_args()
    print(json.dumps(diff_stores(args.store_a, args.store_b, args.show)))


if __name__ == "__main__":
    main()


RAW_EPS = 1e-5  # float32 log-probs of one row computed in two batches (measured <= 1e-6 on vLLM CPU)


def raw_diff(a: list, b: list) -> dict:
    """Two engines' TeacherOutputs of the same score requests, before the codec: max |Δ log p| over
    the ids both top-Ks hold, and whether the top-K lists differ only at near-ties (<= RAW_EPS)."""
    worst, rows, differ, ties_ok = 0.0, 0, 0, True
    for x, y in zip(a, b):
        for j in range(len(x.top_ids)):  # [P, K] each
            rows += 1
            ia, ib, la, lb = x.top_ids[j], y.top_ids[j], x.top_logprobs[j], y.top_logprobs[j]
            if np.array_equal(ia, ib) and np.array_equal(la, lb):
                continue
            differ += 1
            common, pa, pb = np.intersect1d(ia[ia >= 0], ib[ib >= 0], return_indices=True)
            worst = max(worst, float(np.max(np.abs(la[pa].astype(np.float64) - lb[pb]))))
            if not np.array_equal(ia, ib):
                # a reordered or swapped-in id: its value within RAW_EPS of the one it traded places with
                moved = ia != ib
                ties_ok &= bool(np.all(np.abs(la[moved].astype(np.float64) - lb[moved]) <= RAW_EPS))
    return {"rows": rows, "rows_differing": differ, "max_abs_dlogprob": worst,
            "within_bound": bool(worst <= RAW_EPS and ties_ok)}
