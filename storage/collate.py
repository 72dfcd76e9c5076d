"""collate: Records -> one padded batch of torch tensors with flat sparse teacher targets."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from kdpipe.storage.reader import Record


@dataclass
class Batch:
    """A batch of B sequences padded to T tokens, with its N target tokens flattened.

    The student's hidden states h [B, T, D] viewed as [B*T, D] and indexed by pred_index give the
    states that predict each target: logits_t = lm_head(h.view(-1, D)[pred_index])  # [N, V]
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    pred_index: torch.Tensor  # [N] long: b * T + (t - 1) for target token t of sequence b
    target_ids: torch.Tensor  # [N] long: input_ids[b, t]
    teacher_ids: torch.Tensor  # [N, K] long, padding 0
    teacher_logprobs: torch.Tensor  # [N, K] float32 log p̂, padding -inf
    teacher_tail: torch.Tensor  # [N] float32 teacher mass outside teacher_ids
    num_targets: int  # N
    sample_ids: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**out)


def collate(records: Sequence[Record], pad_id: int, max_len: int | None = None) -> Batch:
    """Pad sequences to the longest (or max_len, truncating); targets past the cut are dropped.

    teacher_* are padded to the largest K in the batch.
    """
    B = len(records)
    lens = [len(r.input_ids) if max_len is None else min(len(r.input_ids), max_len) for r in records]
    T = max(lens) if lens else 0
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    pred, ids_l, lp_l, tail_l = [], [], [], []
    K = max((r.ids.shape[1] for r in records if r.ids.ndim == 2), default=0)
    for b, (r, L) in enumerate(zip(records, lens)):
        input_ids[b, :L] = r.input_ids[:L]
        mask[b, :L] = 1
        t = r.target_positions
        keep = slice(None)
        if L < len(r.input_ids):
            n = int(np.searchsorted(t, L))  # targets t < L keep both their token and predictor
            keep = slice(0, n)
            t = t[:n]
        pred.append(b * T + t.astype(np.int64) - 1)
        ids, lp = r.ids[keep], r.logprobs[keep]
        if ids.shape[1] < K:
            pad = K - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            lp = np.pad(lp, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids_l.append(ids)
        lp_l.append(lp)
        tail_l.append(r.tail[keep])
    pred_index = np.concatenate(pred) if pred else np.zeros(0, np.int64)
    teacher_ids = np.concatenate(ids_l) if ids_l else np.zeros((0, K), np.int32)
    teacher_lp = np.concatenate(lp_l) if lp_l else np.zeros((0, K), np.float32)
    tail = np.concatenate(tail_l) if tail_l else np.zeros(0, np.float32)
    input_t = torch.from_numpy(input_ids)
    pred_t = torch.from_numpy(pred_index)
    tid = torch.from_numpy(teacher_ids).long()
    tid.clamp_(min=0)  # padding -1 -> 0 (its log-prob is -inf, so it carries no mass)
    return Batch(
        input_ids=input_t,
        attention_mask=torch.from_numpy(mask),
        pred_index=pred_t,
        target_ids=input_t.view(-1)[pred_t + 1] if len(pred_index) else torch.zeros(0, dtype=torch.long),
        teacher_ids=tid,
        teacher_logprobs=torch.from_numpy(np.ascontiguousarray(teacher_lp, dtype=np.float32)),
        teacher_tail=torch.from_numpy(np.ascontiguousarray(tail, dtype=np.float32)),
        num_targets=int(pred_index.shape[0]),
        sample_ids=[r.sample_id for r in records],
    )
