"""benchmarks/score_diff.py classifies a differing target row by what changed (no engine needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from score_diff import row_diff  # noqa: E402

from kdpipe.storage import CodecConfig  # noqa: E402
from kdpipe.storage.codecs import codec_table  # noqa: E402

T = codec_table(CodecConfig())  # code -> log p̂
IDS = np.array([5, 9, 2, -1], dtype=np.int32)
LP = np.array([T[100], T[900], T[900], -np.inf], dtype=np.float32)  # ids 9 and 2 tie in store A


def diff(ids_b=IDS, lp_b=LP, tail_b=np.float32(0.25)):
    return row_diff(IDS, LP, np.float32(0.25), np.asarray(ids_b, np.int32), np.asarray(lp_b, np.float32), tail_b)


def test_each_kind_of_difference_gets_its_class_and_size():
    assert diff()["class"] == "identical"
    d = diff(tail_b=np.nextafter(np.float32(0.25), np.float32(1)))
    assert d["class"] == "tail" and 0 < d["tail_delta"] < 1e-7
    d = diff(lp_b=[T[101], T[900], T[900], -np.inf])
    assert d["class"] == "codes" and d["max_code_step"] == 1
    d = diff(ids_b=[5, 2, 9, -1])  # the tied pair swapped: 0 steps apart
    assert d["class"] == "rank_swap" and d["tie_gap_steps"] == 0
    d = diff(ids_b=[5, 9, 7, -1], lp_b=[T[100], T[900], T[901], -np.inf])  # id 2 out, id 7 in, one step lower
    assert d["class"] == "set" and d["tie_gap_steps"] == 1
    d = diff(ids_b=[9, 5, 2, -1], lp_b=[T[100], T[100], T[900], -np.inf])  # no near-tie: a real difference
    assert d["tie_gap_steps"] == 800
