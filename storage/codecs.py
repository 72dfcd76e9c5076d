"""Codecs: the teacher's per-position entries -> compact integer columns, and back, with numpy.

`topk` keeps up to k entries (optionally cut at cumulative mass top_p), sorted by log-prob
descending, their log-probs quantized (error bound below), plus the exact tail mass.
A log-prob of -inf means p = 0: the entry carries no mass and is not stored (like -1 padding), so
the tail is 1 - Σ p of the finite entries and a position may keep 0 entries (tail 1). Finite
log-probs below the table's last code (-1e30, say) are stored at that code: p̂ = p = 0 in float64.
`sampled` draws N times from the teacher's top-K plus its tail bucket and stores the unique ids
with their counts: an unbiased estimate of that distribution.

Encoding works on one sequence ([P, K] arrays); decoding works on one row of a record batch,
vectorized over its positions (no Python loop per position).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kdpipe.storage.errors import ConfigError

CODE_MAX = 65535  # quantized codes are uint16


class CorruptColumns(ValueError):
    """Decoded columns hold values no writer produces (the reader turns this into a StoreError)."""


@dataclass(frozen=True)
class CodecConfig:
    """How teacher targets are stored (recorded in the manifest; part of the cache key).

    name: "topk" keeps <= top_k entries per position + the exact tail mass; "sampled" stores
      `draws` draws with replacement from the teacher's top-`top_k` + tail bucket.
    top_k: topk: max entries kept; sampled: size of the teacher top-K drawn from.
    top_p: topk only: keep entries until their cumulative mass >= top_p (at most top_k).
    draws: sampled: N, the number of draws per position (<= 255, counts are one byte).
    seed: sampled: base seed; the RNG of a sequence derives from (seed, sample id), so reruns
      and resumed runs store identical draws.
    sqrt_step, log_step: topk log-prob quantization (codes -> log p̂ via codec_table()).
      sqrt(p) is quantized uniformly with step h = sqrt_step: code c = round((1 - sqrt p) / h),
      so for p >= p_switch = (2h / log_step)^2 (4.2e-7 at the defaults):
          |sqrt p̂ - sqrt p| <= h/2,  hence  |p̂ - p| <= h*sqrt(p) + h^2/4,
      and below p_switch the steps are uniform in log p: |log p̂ - log p| <= log_step/2.
      Steps grow as p shrinks because the error that matters is the error in p, not in log p;
      L1 error added to one position's distribution <= h * sum(sqrt p_i) + k h^2/4 <= h*sqrt(k) + k h^2/4
      (0.0013 at k=64 and the default h=1/6144; on average about a quarter of that).
      Per-entry bound on |log p̂ - log p|: logprob_error_bound(). The tail mass is computed from
      the unquantized log-probs and stored exactly (float32).
    """

    name: Literal["topk", "sampled"] = "topk"
    top_k: int = 64
    top_p: float | None = None
    draws: int = 50
    seed: int = 0
    sqrt_step: float = 1.0 / 6144
    log_step: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in ("topk", "sampled"):
            raise ConfigError(f"codec.name: {self.name!r} is not a codec; choose 'topk' or 'sampled'")
        if not 1 <= self.top_k <= 65535:
            raise ConfigError(f"codec.top_k: {self.top_k} must be between 1 and 65535")
        if self.top_p is not None:
            if self.name != "topk":
                raise ConfigError("codec.top_p applies to codec.name='topk' only; remove top_p or use topk")
            if not 0.0 < self.top_p <= 1.0:
                raise ConfigError(f"codec.top_p: {self.top_p} must be in (0, 1]")
        if not 1 <= self.draws <= 255:
            raise ConfigError(f"codec.draws: {self.draws} must be between 1 and 255 (counts are stored as one byte)")
        if not 1.0 / 32768 <= self.sqrt_step <= 1.0 / 16:
            raise ConfigError(f"codec.sqrt_step: {self.sqrt_step} must be in [1/32768, 1/16]")
        if not 0.0 < self.log_step <= 1.0:
            raise ConfigError(f"codec.log_step: {self.log_step} must be in (0, 1] nats")

    @property
    def max_entries(self) -> int:
        """Upper bound on entries stored per position."""
        return self.top_k if self.name == "topk" else min(self.top_k, self.draws)

    @property
    def logprob_step(self) -> float:
        """The coarsest log-domain step (twice the worst |log p̂ - log p|, reached only at p < p_switch).

        Use logprob_error_bound() for the much tighter per-entry bound.
        """
        return self.log_step

    def logprob_error_bound(self, logprobs: np.ndarray) -> np.ndarray:
        """Upper bound on |log p̂ - log p| of stored topk entries with true log-probs `logprobs`."""
        h, ls = self.sqrt_step, self.log_step
        s = np.exp(np.asarray(logprobs, dtype=np.float64) / 2)  # sqrt p
        with np.errstate(divide="ignore", invalid="ignore"):
            # |sqrt p̂ - sqrt p| <= h/2  ->  |log p̂ - log p| <= -2 log(1 - h / (2 sqrt p))
            sq = -2.0 * np.log1p(-np.minimum(h / (2 * s), 0.999999))
        # below p_switch: log steps (<= log_step/2), or the sqrt region's last code just above it
        return np.where(s * s >= switch_prob(self), sq, np.maximum(np.nan_to_num(sq, nan=0.0), ls / 2)) + 1e-6


def switch_code(cfg: CodecConfig) -> int:
    """Last code of the sqrt(p) region: local log step 2h / (1 - c h) <= log_step up to here."""
    h = cfg.sqrt_step
    return int(np.floor((1.0 - 2.0 * h / cfg.log_step) / h))


def switch_prob(cfg: CodecConfig) -> float:
    return float((1.0 - switch_code(cfg) * cfg.sqrt_step) ** 2)


_TABLES: dict[tuple[float, float], np.ndarray] = {}


def codec_table(cfg: CodecConfig) -> np.ndarray:
    """code -> log p̂ (float32 [65536]): the decoding table of topk's log-prob codes.

        c <= cA:  log p̂ = 2 log(1 - c h)
        c >  cA:  log p̂ = 2 log(1 - cA h) - (c - cA) log_step
    with h = sqrt_step and cA = switch_code(cfg) = floor((1 - 2h/log_step) / h).
    """
    key = (cfg.sqrt_step, cfg.log_step)
    t = _TABLES.get(key)
    if t is None:
        h, cA = cfg.sqrt_step, switch_code(cfg)
        c = np.arange(CODE_MAX + 1, dtype=np.float64)
        top = 2.0 * np.log1p(-np.minimum(c, cA) * h)
        t = (top - np.maximum(c - cA, 0) * cfg.log_step).astype(np.float32)
        t.setflags(write=False)
        _TABLES[key] = t
    return t


def quantize_logprobs(cfg: CodecConfig, lp: np.ndarray) -> np.ndarray:
    """log p (<= 0, float64) -> codes (int64), non-decreasing as log p decreases."""
    h, ls, cA = cfg.sqrt_step, cfg.log_step, switch_code(cfg)
    s = np.exp(lp / 2)
    c_sqrt = np.rint((1.0 - s) / h)
    lpA = 2.0 * np.log1p(-cA * h)
    with np.errstate(invalid="ignore"):
        c_log = cA + np.maximum(0.0, np.rint((lpA - lp) / ls))
    c = np.where(c_sqrt <= cA, c_sqrt, c_log)
    return np.clip(np.nan_to_num(c, nan=CODE_MAX, posinf=CODE_MAX), 0, CODE_MAX).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# encoding (writer side)


def _split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = ids.astype(np.int64, copy=False)
    return (ids & 0xFFFF).astype(np.uint16), (ids >> 16).astype(np.uint8)


def sort_entries(top_ids: np.ndarray, top_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort each position's entries by log-prob desc, padding last. -> ids (int64), logprobs (f64), valid.

    Engines hand over int32 ids (vLLM, transformers' topk gives int64, numpy users uint16): widen to
    int64 here, once, so every later sentinel (-1 padding, int64 max sort keys) fits the dtype.
    """
    top_ids = np.asarray(top_ids).astype(np.int64, copy=False)
    lp = top_logprobs.astype(np.float64)
    valid = (top_ids >= 0) & np.isfinite(lp)
    key = np.where(valid, -lp, np.inf)
    order = np.argsort(key, axis=1, kind="stable")  # [P, K]
    return (
        np.take_along_axis(top_ids, order, axis=1),
        np.take_along_axis(lp, order, axis=1),
        np.take_along_axis(valid, order, axis=1),
    )


def encode_topk(cfg: CodecConfig, top_ids: np.ndarray, top_logprobs: np.ndarray) -> dict[str, np.ndarray]:
    """[P, K] teacher entries -> flat columns of one row (see format.shard_schema)."""
    ids, lp, valid = sort_entries(top_ids, top_logprobs)  # [P, K]
    lp = np.minimum(lp, 0.0)  # rounding noise above log 1
    P, K = ids.shape
    keep = valid & (np.arange(K)[None, :] < cfg.top_k)
    p = np.where(keep, np.exp(lp), 0.0)
    if cfg.top_p is not None:
        mass_before = np.cumsum(p, axis=1) - p
        keep &= mass_before < cfg.top_p
        p = np.where(keep, p, 0.0)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0).astype(np.float32)  # [P]
    counts = keep.sum(axis=1)  # [P]; keep is a prefix of each (sorted) row
    codes = quantize_logprobs(cfg, np.where(keep, lp, 0.0))  # [P, K]
    delta = np.diff(codes, axis=1, prepend=0)
    delta[:, 0] = codes[:, 0]
    lo, hi = _split_ids(ids[keep])
    return {
        "num_entries": counts,
        "ids_lo": lo,
        "ids_hi": hi,
        "logprob_q_lo": (delta[keep] & 0xFF).astype(np.uint8),
        "logprob_q_hi": (delta[keep] >> 8).astype(np.uint8),
        "tail": tail,
    }


def sample_seed(base_seed: int, sample_id: str) -> np.random.Generator:
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return np.random.default_rng([base_seed, int.from_bytes(digest[:8], "little")])


def sampling_distribution(cfg: CodecConfig, top_ids: np.ndarray, top_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distribution `sampled` draws from: teacher top-K probabilities + tail bucket.

    -> ids [P, K'] (sorted by prob desc, -1 padding), probs [P, K' + 1] (last column = tail).
    """
    ids, lp, valid = sort_entries(top_ids, top_logprobs)
    K = min(cfg.top_k, ids.shape[1])
    ids, lp, valid = ids[:, :K], lp[:, :K], valid[:, :K]
    p = np.where(valid, np.exp(np.minimum(lp, 0.0)), 0.0)
    s = p.sum(axis=1, keepdims=True)
    # Teacher top-K mass can exceed 1 by rounding; renormalize then, else the rest is the tail.
    p = np.where(s > 1.0, p / np.maximum(s, 1e-300), p)
    tail = np.clip(1.0 - p.sum(axis=1, keepdims=True), 0.0, 1.0)
    probs = np.concatenate([p, tail], axis=1)
    probs /= probs.sum(axis=1, keepdims=True)
    return np.where(valid, ids, -1), probs


def encode_sampled(cfg: CodecConfig, top_ids: np.ndarray, top_logprobs: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids, probs = sampling_distribution(cfg, top_ids, top_logprobs)  # [P, K], [P, K+1]
    draws = rng.multinomial(cfg.draws, probs)  # [P, K+1]
    tail_count = draws[:, -1]
    draws = draws[:, :-1]
    # unique ids ascending within a position: sort each row by id, drop zero counts.
    key = np.where(draws > 0, ids, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    ids_sorted = np.take_along_axis(ids, order, axis=1)
    c_sorted = np.take_along_axis(draws, order, axis=1)
    keep = c_sorted > 0
    delta = np.diff(ids_sorted, axis=1, prepend=0)  # ascending ids -> gaps; first = the id itself
    delta[:, 0] = ids_sorted[:, 0]
    lo, hi = _split_ids(delta[keep])
    return {
        "num_entries": keep.sum(axis=1),
        "id_delta_lo": lo,
        "id_delta_hi": hi,
        "counts": c_sorted[keep].astype(np.uint8),
        "tail_count": tail_count.astype(np.uint8),
    }


# ----------------------------------------------------------------------------------------------
# decoding (reader side): one row's flat columns -> padded [P, K] arrays


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """-> position of each entry [E], column of each entry within its position [E], max count."""
    counts = counts.astype(np.int64)  # uint8 cumsums would wrap
    P = counts.shape[0]
    K = int(counts.max()) if P else 0
    pos = np.repeat(np.arange(P), counts)
    starts = np.cumsum(counts) - counts
    col = np.arange(pos.shape[0]) - starts[pos]
    return pos, col, K


def _pad(values: np.ndarray, counts: np.ndarray, fill, dtype) -> np.ndarray:
    """Flat position-major values [E] -> [P, K] padded with `fill` (K = max count)."""
    P = counts.shape[0]
    if P and (counts == counts[0]).all():
        return values.astype(dtype, copy=False).reshape(P, int(counts[0]))
    pos, col, K = _segments(counts)
    out = np.full((P, K), fill, dtype=dtype)
    out[pos, col] = values
    return out


def _segment_cumsum(counts: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Running sums of flat `delta` [E] restarting at every position -> [E] int64."""
    counts = counts.astype(np.int64)  # uint8 cumsums would wrap
    # (cast first: np.cumsum(int32, dtype=int64) takes a slow buffered-casting path)
    c = np.concatenate([[0], np.cumsum(delta.astype(np.int64, copy=False))])  # c[e] = sum of delta[:e]
    starts = np.cumsum(counts) - counts
    return c[1:] - np.repeat(c[starts], counts)


def decode_ids(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, vocab_size: int) -> np.ndarray:
    """topk: ids = hi << 16 | lo -> [P, K] int32, -1 padding."""
    ids = hi.view(np.uint8).astype(np.int32) if hi.dtype == np.bool_ else hi.astype(np.int32)
    ids <<= 16
    ids |= lo
    if ids.size and ids.max() >= vocab_size:
        raise CorruptColumns(f"a teacher id is >= vocab_size {vocab_size}")
    return _pad(ids, counts, -1, np.int32)


def decode_delta_ids(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, vocab_size: int) -> np.ndarray:
    """sampled: per-position cumsum of (hi << 16 | lo) -> [P, K] int32, -1 padding."""
    delta = (hi.astype(np.int64) << 16) | lo.astype(np.int64)
    first = np.zeros(delta.shape[0], dtype=bool)
    first[(np.cumsum(counts.astype(np.int64)) - counts)[counts > 0]] = True
    if (delta[~first] < 1).any():
        raise CorruptColumns("sampled ids are not strictly ascending within a position")
    ids = _segment_cumsum(counts, delta)
    if ids.size and ids.max() >= vocab_size:
        raise CorruptColumns(f"a token id is >= vocab_size {vocab_size}")
    return _pad(ids.astype(np.int32), counts, -1, np.int32)


def decode_topk(cfg: CodecConfig, counts: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> logprobs [P, K] float32 (-inf padding), tail [P] float32."""
    P, E = counts.shape[0], q_lo.shape[0]
    # A position's codes never exceed CODE_MAX, so the running sum over a row fits int32
    # unless the row is enormous; int32 halves the memory traffic of this hot loop.
    wide = np.int64 if P * (CODE_MAX + 1) >= 2**31 else np.int32
    delta = q_hi.astype(wide)
    delta <<= 8
    delta |= q_lo
    table = codec_table(cfg)
    if P and counts[0] and E == P * int(counts[0]) and (counts == counts[0]).all():
        # every position keeps K > 0 entries (K = 0, a row whose every entry was -inf, takes the general path): codes = row-wide running sum minus each position's base
        K = int(counts[0])
        c = np.cumsum(delta).reshape(P, K)
        c -= (c[:, 0] - delta[::K])[:, None]
        if K and c[:, -1].max() > CODE_MAX:  # codes rise within a position: the last is the largest
            raise CorruptColumns("a log-prob code exceeds 65535")
        return np.take(table, c), tail
    codes = _segment_cumsum(counts, delta)
    if codes.size and codes.max() > CODE_MAX:
        raise CorruptColumns("a log-prob code exceeds 65535")
    return _pad(np.take(table, codes), counts, -np.inf, np.float32), tail


def decode_sampled(cfg: CodecConfig, counts: np.ndarray, draw_counts: np.ndarray, tail_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if counts.size:
        c = np.concatenate([[0], np.cumsum(draw_counts, dtype=np.int64)])
        ends = np.cumsum(counts.astype(np.int64))
        per_pos = c[ends] - c[ends - counts.astype(np.int64)] + tail_count
        if (per_pos != cfg.draws).any() or (draw_counts == 0).any():
            raise CorruptColumns(f"draw counts of a position do not add up to draws={cfg.draws}")
    with np.errstate(divide="ignore"):
        lp = np.log(draw_counts.astype(np.float32) / np.float32(cfg.draws))
    return _pad(lp, counts, -np.inf, np.float32), tail_count.astype(np.float32) / np.float32(cfg.draws)
