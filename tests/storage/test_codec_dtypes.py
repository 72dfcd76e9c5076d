"""Both codecs on the id dtypes real producers emit: vLLM and numpy int32, torch.topk int64, uint16.

The `sampled` defect (issue 10) hid because these tests only ever used int64: with int32 ids the
"undrawn" sort sentinel wrapped to -1, undrawn ids sorted first and the deltas went negative.
"""

from __future__ import annotations

import numpy as np
import pytest

from kdpipe.storage import CodecConfig
from kdpipe.storage import codecs

VOCAB = 30_000


def _teacher(dtype, P=24, K=17, seed=0, tail_heavy=True):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(VOCAB if dtype != np.uint16 else 60_000, K, replace=False) for _ in range(P)]).astype(dtype)
    logits = rng.normal(size=(P, K))
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    if tail_heavy:  # most of the mass in the tail: the case that broke
        lp = lp + np.log(0.05)
    return ids, lp.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_sampled_round_trip_every_id_dtype(dtype):
    cfg = CodecConfig(name="sampled", top_k=16, draws=50)
    ids, lp = _teacher(dtype)
    enc = codecs.encode_sampled(cfg, ids, lp, codecs.sample_seed(0, "doc-1"))
    vocab = 60_000
    got = codecs.decode_delta_ids(enc["num_entries"], enc["id_delta_lo"], enc["id_delta_hi"], vocab)  # [P, K']
    kept, _ = codecs.sampling_distribution(cfg, ids, lp)  # [P, 16] the ids drawn from
    counts = enc["counts"].astype(int)
    pos = np.repeat(np.arange(ids.shape[0]), enc["num_entries"])
    flat = got[got >= 0]
    assert len(flat) == len(counts) == len(pos)
    for p, i in zip(pos, flat):
        assert i in kept[p], "a decoded id was not among the teacher's top-16 at its position"
    for row in got:  # strictly ascending within a position
        r = row[row >= 0]
        assert (np.diff(r) > 0).all()
    assert counts.min() >= 1
    per_pos = np.zeros(ids.shape[0], int)
    np.add.at(per_pos, pos, counts)
    assert (per_pos + enc["tail_count"].astype(int) == cfg.draws).all()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_topk_round_trip_every_id_dtype(dtype):
    cfg = CodecConfig(name="topk", top_k=16)
    ids, lp = _teacher(dtype, tail_heavy=False)
    enc = codecs.encode_topk(cfg, ids, lp)
    got = codecs.decode_ids(enc["num_entries"], enc["ids_lo"], enc["ids_hi"], 60_000)
    order = np.argsort(-lp, axis=1, kind="stable")[:, :16]
    want = np.take_along_axis(ids.astype(np.int64), order, axis=1)
    assert (got == want).all()


# -inf (p = 0, e.g. underflow in a capture), a subnormal log-prob (p = 1 - 1e-45), a subnormal p
# (log p = -740) and -1e30 (p = 0 in float64, finite): what engines and imports can hand over.
EDGE_LOGPROBS = [-np.inf, -1e-45, -740.0, -1e30]


def _edge_teacher():
    """int32 ids [P, 4] as vLLM emits them; position 0 ordinary, 1 every edge value, 2 all -inf."""
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]], dtype=np.int32)
    lp = np.array([[-0.5, -1.5, -3.0, -np.inf], [-1e-45, -740.0, -1e30, -np.inf], [-np.inf] * 4], dtype=np.float64)
    return ids, lp


def _decode(cfg, enc, vocab=VOCAB):
    got_ids = codecs.decode_ids(enc["num_entries"], enc["ids_lo"], enc["ids_hi"], vocab)
    got_lp, tail = codecs.decode_topk(cfg, enc["num_entries"], enc["logprob_q_lo"], enc["logprob_q_hi"], enc["tail"])
    return got_ids, got_lp, tail


@pytest.mark.parametrize("lp_dtype", [np.float32, np.float64])
def test_topk_round_trip_edge_logprobs(lp_dtype):
    """-inf entries are dropped (p = 0, no mass): tail = 1 - Σ p of the finite ones; a position whose
    entries are all -inf keeps 0 entries and tail 1; finite log-probs of p = 0 keep their id with p̂ = 0."""
    cfg = CodecConfig(name="topk", top_k=4)
    ids, lp = _edge_teacher()
    enc = codecs.encode_topk(cfg, ids, lp.astype(lp_dtype))
    got_ids, got_lp, tail = _decode(cfg, enc)
    assert enc["num_entries"].tolist() == [3, 3, 0]
    assert got_ids[0, :3].tolist() == [5, 6, 7] and got_ids[1, :3].tolist() == [9, 10, 11]
    assert (got_ids[2] == -1).all() and np.isneginf(got_lp[2]).all()
    assert np.isfinite(got_lp[:2, :3]).all()
    ok = lp[:2, :3] >= codecs.codec_table(cfg)[-1]  # representable: within the codec's bound
    assert (np.abs(got_lp[:2, :3] - lp[:2, :3])[ok] <= cfg.logprob_error_bound(lp[:2, :3][ok])).all()
    assert np.exp(got_lp[1, 2].astype(np.float64)) == 0.0  # -1e30: p = p̂ = 0
    p = np.where(np.isfinite(lp), np.exp(lp.astype(lp_dtype).astype(np.float64)), 0.0)
    np.testing.assert_array_equal(tail, np.clip(1.0 - p.sum(axis=1), 0, 1).astype(np.float32))
    assert tail[2] == 1.0


def test_topk_row_with_only_neg_inf_entries_decodes():
    """A row whose every position listed only -inf: 0 entries everywhere (this crashed the decoder)."""
    cfg = CodecConfig(name="topk", top_k=3)
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    enc = codecs.encode_topk(cfg, ids, np.full((2, 3), -np.inf, dtype=np.float32))
    got_ids, got_lp, tail = _decode(cfg, enc)
    assert got_ids.shape == got_lp.shape == (2, 0) and tail.tolist() == [1.0, 1.0]


def test_sampled_edge_logprobs_draw_no_p0_id():
    cfg = CodecConfig(name="sampled", top_k=4, draws=50)
    ids, lp = _edge_teacher()
    enc = codecs.encode_sampled(cfg, ids, lp.astype(np.float32), codecs.sample_seed(0, "edge"))
    got = codecs.decode_delta_ids(enc["num_entries"], enc["id_delta_lo"], enc["id_delta_hi"], VOCAB)
    got_lp, tail = codecs.decode_sampled(cfg, enc["num_entries"], enc["counts"], enc["tail_count"])
    drawn = set(got[got >= 0].tolist())
    assert drawn.isdisjoint({8, 11, 12, 13, 14, 15, 16})  # p = 0 ids are never drawn
    assert tail[2] == 1.0 and enc["num_entries"][2] == 0
