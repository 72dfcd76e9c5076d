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
