"""Cross-tokenizer KD, batch level: aligned records -> one padded student batch + the group tensors.

`XCollate` is the collate stage of train-student when the student's tokenizer differs from the
teacher's (DataSpec.collate): it aligns a micro-batch of records (`align.Aligner`), pads
the student sequences to [B, T], and precomputes in numpy, in the data thread, everything
`xtok/losses.py` needs per group (the mapped teacher rows of 1:1 groups, the teacher's chain-rule
log-probability of each group, the first teacher row of each unmapped group), so the training
loop only indexes tensors. `XBatch` lists those tensors and their shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from kdpipe.pipeline.train.xtok.align import Aligned, Aligner
from kdpipe.storage.batch import Batch
from kdpipe.storage.errors import ConfigError, DataError
from kdpipe.storage.reader import Record

CROSS_TOKENIZER_OPTIONS: tuple[str, ...] = ("span", "uld", "hybrid")


@dataclass
class XBatch(Batch):
    """A student Batch (target_ids etc. over the student's N target tokens) + the cross-tokenizer tensors.

    `xtok` holds (N = student target tokens, G = groups, M = 1:1 mapped groups, U = unmapped groups):
      s_group [N] long              group of each student target token
      kd_row [N] bool               the token is the whole student side of a mapped 1:1 group
      kd_ids [N, K] long            student ids of the teacher's kept ids (0 where unmapped / not a kd row)
      kd_logprobs [N, K] float32    the teacher's kept log-probs of that group (-inf padding)
      kd_mapped [N, K] bool         the kept id maps onto a student id
      kd_tail [N] float32           the teacher's stored tail
      g_other [G] bool              the group is scored by span / uld (not mapped; tokens on both sides)
      g_teacher_logp [G] float32    log P_T(group's bytes) by the teacher's chain rule at temperature T
      u_srow [U] long               first student target token of each unmapped group
      u_logprobs [U, K] float32     the teacher's kept log-probs at the group's first teacher token
      u_tail [U] float32
    `stats` (plain floats): groups, one_to_one, mapped_groups, teacher_rows, mapped_mass, unknown_actual.
    """

    xtok: dict = None  # type: ignore[assignment]
    stats: dict = None  # type: ignore[assignment]

    def to(self, device, non_blocking: bool = False) -> "XBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif f.name == "xtok":
                v = {k: t.to(device, non_blocking=non_blocking) for k, t in v.items()}
            out[f.name] = v
        return XBatch(**out)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


class XCollate:
    """Records -> XBatch: align each record (`Aligner`), pad the student side, build the group tensors.

    option: 'span' | 'uld' | 'hybrid'; a 1:1 group is scored by the vocabulary-mapped KL when every
    kept teacher id maps (span, uld) or when the mapped ids hold >= min_mapped_mass of the kept mass
    (hybrid). temperature: for the teacher's chain-rule log-probabilities.
    """

    def __init__(self, aligner: Aligner, option: str, temperature: float, min_mapped_mass: float, pad_id: int,
                 max_len: int | None = None, truncate: bool = False) -> None:
        if option not in CROSS_TOKENIZER_OPTIONS:
            raise ConfigError(f"cross_tokenizer: {option!r} is not one of {', '.join(CROSS_TOKENIZER_OPTIONS)}")
        self.aligner, self.option, self.T = aligner, option, float(temperature)
        self.min_mass = 1.0 if option != "hybrid" else float(min_mapped_mass)
        self.pad_id, self.max_len, self.truncate = pad_id, max_len, truncate
        self.truncated = 0

    def __call__(self, records: Sequence[Record]) -> XBatch:
        al = [self._fit(a) for a in self.aligner.batch(records)]
        return self.collate(al)

    def _fit(self, a: Aligned) -> Aligned:
        """Refuse or cut a student sequence longer than max_len (whole groups only)."""
        if self.max_len is None or len(a.input_ids) <= self.max_len:
            return a
        if not self.truncate:
            raise DataError(
                f"{self.aligner.store}: sample {a.sample_id!r} has {len(a.input_ids)} student tokens, more than the "
                f"student's context of {self.max_len}; pass --truncate to cut such sequences, or a longer context"
            )
        self.truncated += 1
        keep_s = a.target_positions < self.max_len
        last = int(a.student_group[keep_s].max()) if keep_s.any() else -1
        # keep only groups whose student tokens all fit
        if keep_s.any() and not keep_s[a.student_group == last].all():
            last -= 1
        ks = a.student_group <= last
        kt = a.teacher_group <= last
        L = int(a.target_positions[ks][-1]) + 1 if ks.any() else int(a.target_positions[0])
        return Aligned(a.sample_id, a.input_ids[:L], a.target_positions[ks], a.teacher_ids[kt], a.teacher_logprobs[kt],
                       a.teacher_tail[kt], a.teacher_actual[kt], a.teacher_group[kt], a.student_group[ks], last + 1)

    def collate(self, al: Sequence[Aligned]) -> XBatch:
        B = len(al)
        T = max(len(a.input_ids) for a in al) if al else 0
        K = max((a.teacher_ids.shape[1] for a in al), default=0)
        lens = np.fromiter((len(a.input_ids) for a in al), np.int64, B)
        N = sum(len(a.target_positions) for a in al)
        Nt = sum(len(a.teacher_actual) for a in al)
        input_ids = np.full((B, T), self.pad_id, np.int64)
        mask = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)  # [B, T]
        # One preallocated array per field, filled record by record (no per-record temporaries).
        pred_index, sg = np.empty(N, np.int64), np.empty(N, np.int64)
        ids, lp = np.full((Nt, K), -1, np.int64), np.full((Nt, K), -np.inf, np.float32)
        tail, act, tg = np.empty(Nt, np.float32), np.empty(Nt, np.int64), np.empty(Nt, np.int64)
        s0 = n0 = goff = 0
        for b, a in enumerate(al):
            input_ids[b, : lens[b]] = a.input_ids
            s1, n1 = s0 + len(a.target_positions), n0 + len(a.teacher_actual)
            pred_index[s0:s1] = a.target_positions
            pred_index[s0:s1] += b * T - 1
            sg[s0:s1] = a.student_group
            sg[s0:s1] += goff
            tg[n0:n1] = a.teacher_group
            tg[n0:n1] += goff
            k = a.teacher_ids.shape[1]
            ids[n0:n1, :k] = a.teacher_ids
            lp[n0:n1, :k] = a.teacher_logprobs
            tail[n0:n1] = a.teacher_tail
            act[n0:n1] = a.teacher_actual
            goff += a.num_groups
            s0, n0 = s1, n1
        G = goff
        target_ids = input_ids.reshape(-1)[pred_index + 1] if N else np.zeros(0, np.int64)

        # ---- group shapes: sizes, and the single row of each side of a 1:1 group
        n_t = np.bincount(tg, minlength=G)
        n_s = np.bincount(sg, minlength=G)
        first_t = np.full(G, -1, np.int64)
        first_s = np.full(G, -1, np.int64)
        first_t[tg[::-1]] = np.arange(Nt - 1, -1, -1)  # the smallest row index wins
        first_s[sg[::-1]] = np.arange(N - 1, -1, -1)
        one = (n_t == 1) & (n_s == 1)

        # ---- vocabulary map on 1:1 groups
        valid = lp > -np.inf  # [Nt, K]
        m_ids = np.where(ids >= 0, self.aligner.map[np.maximum(ids, 0)], -1)  # [Nt, K] student ids
        mapped = valid & (m_ids >= 0)
        p = np.where(valid, np.exp(lp.astype(np.float64)), 0.0)  # [Nt, K]
        kept = p.sum(1)
        share = np.where(kept > 0, (p * mapped).sum(1) / np.where(kept > 0, kept, 1.0), 0.0)  # [Nt]
        full = (mapped == valid).all(1)
        ok_row = full if self.min_mass >= 1.0 else share >= self.min_mass  # [Nt]
        g_mapped = one.copy()
        g_mapped[one] = ok_row[first_t[one]]
        m_groups = np.flatnonzero(g_mapped)
        tr, sr = first_t[m_groups], first_s[m_groups]
        kd_row = np.zeros(N, bool)
        kd_row[sr] = True
        kd_ids = np.zeros((N, K), np.int64)
        kd_lp = np.full((N, K), -np.inf, np.float32)
        kd_mapped = np.zeros((N, K), bool)
        kd_tail = np.zeros(N, np.float32)
        kd_ids[sr] = np.where(mapped[tr], m_ids[tr], 0)
        kd_lp[sr] = lp[tr]
        kd_mapped[sr] = mapped[tr]
        kd_tail[sr] = tail[tr]

        # ---- the teacher's chain rule: log p_T(actual) per teacher row, summed per group
        eq = ids == act[:, None]
        found = eq.any(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            la = np.where(eq, lp, -np.inf).max(1).astype(np.float64) if K else np.full(Nt, -np.inf)
            p_min = np.where(valid, lp, np.inf).min(1) if K else np.full(Nt, np.inf)
            log_tail = np.log(np.maximum(tail.astype(np.float64), 0.0))
            # an actual token outside the kept ids: at most min(tail, smallest kept p) — its upper bound
            la = np.where(found, la, np.minimum(log_tail, p_min))
            lpT = np.concatenate([np.where(valid, lp / self.T, -np.inf), (log_tail / self.T)[:, None]], 1)
            logZ = _logsumexp(lpT, 1)
            laT = la / self.T - logZ
        g_logp = np.bincount(tg, weights=laT, minlength=G) if G else np.zeros(0)

        # ---- unmapped groups: ULD at the groups' first tokens
        g_other = ~g_mapped & (n_t > 0) & (n_s > 0)  # (a group without tokens on one side has nothing to score)
        u = np.flatnonzero(g_other)
        x = {
            "s_group": torch.from_numpy(sg), "kd_row": torch.from_numpy(kd_row), "kd_ids": torch.from_numpy(kd_ids),
            "kd_logprobs": torch.from_numpy(kd_lp), "kd_mapped": torch.from_numpy(kd_mapped),
            "kd_tail": torch.from_numpy(kd_tail), "g_other": torch.from_numpy(g_other),
            "g_teacher_logp": torch.from_numpy(g_logp.astype(np.float32)),
            "u_srow": torch.from_numpy(first_s[u]), "u_logprobs": torch.from_numpy(lp[first_t[u]]),
            "u_tail": torch.from_numpy(tail[first_t[u]]),
        }
        r1 = first_t[one]  # the teacher rows of 1:1 groups: the share of the teacher's mass the map covers there
        mass_mapped = float((p[r1] * mapped[r1]).sum())
        stats = {"groups": float(G), "one_to_one": float(one.sum()), "mapped_groups": float(len(m_groups)),
                 "teacher_rows": float(Nt), "teacher_mass": float(kept.sum() + tail.astype(np.float64).sum()),
                 "mapped_mass": mass_mapped, "unknown_actual": float((~found).sum())}
        input_t = torch.from_numpy(input_ids)
        return XBatch(
            input_ids=input_t, attention_mask=torch.from_numpy(mask), pred_index=torch.from_numpy(pred_index),
            target_ids=torch.from_numpy(np.asarray(target_ids, np.int64)),
            teacher_ids=torch.zeros((N, 0), dtype=torch.long), teacher_logprobs=torch.zeros((N, 0)),
            teacher_tail=torch.zeros(N), num_targets=N, sample_ids=[a.sample_id for a in al], xtok=x, stats=stats,
        )


def alignment_summary(batches_stats: Sequence[dict]) -> dict[str, float]:
    """Shares over collated batches: 1:1 groups of all groups, mapped groups, mapped teacher mass."""
    tot = {k: sum(s[k] for s in batches_stats) for k in (batches_stats[0] if batches_stats else {})}
    g = max(tot.get("groups", 0.0), 1.0)
    return {
        "groups": int(tot.get("groups", 0)), "teacher_rows": int(tot.get("teacher_rows", 0)),
        "one_to_one_share": tot.get("one_to_one", 0.0) / g, "mapped_group_share": tot.get("mapped_groups", 0.0) / g,
        "mapped_mass": tot.get("mapped_mass", 0.0) / max(tot.get("teacher_mass", 0.0), 1e-12),
        "unknown_actual": int(tot.get("unknown_actual", 0)),
    }


def check_min_mapped_mass(v: float) -> None:
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise ConfigError(f"xtok_min_mapped_mass: {v} must be in (0, 1]")
