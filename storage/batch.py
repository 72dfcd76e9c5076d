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
    # targets t < L keep both their token and the hidden state t-1 that predicts it
    n_keep = [len(r.target_positions) if L == len(r.input_ids) else int(np.searchsorted(r.target_positions, L))
              for r, L in zip(records, lens)]
    N = sum(n_keep)
    K = max((r.ids.shape[1] for r in records if r.ids.ndim == 2), default=0)
    pred_index = np.empty(N, dtype=np.int64)
    # Filled record by record: one converting copy per array instead of concatenate + cast.
    teacher_ids = torch.empty((N, K), dtype=torch.long)
    teacher_lp = torch.empty((N, K), dtype=torch.float32)
    tail = torch.empty(N, dtype=torch.float32)
    n0, padded = 0, False
    for b, (r, L, n) in enumerate(zip(records, lens, n_keep)):
        input_ids[b, :L] = r.input_ids[:L]
        mask[b, :L] = 1
        n1 = n0 + n
        pred_index[n0:n1] = r.target_positions[:n]
        pred_index[n0:n1] += b * T - 1
        k = r.ids.shape[1] if r.ids.ndim == 2 else 0
        if k < K:
            teacher_ids[n0:n1, k:] = 0
            teacher_lp[n0:n1, k:] = -torch.inf
        if n and k:
            ids = torch.from_numpy(r.ids[:n])
            teacher_ids[n0:n1, :k].copy_(ids)
            teacher_lp[n0:n1, :k].copy_(torch.from_numpy(r.logprobs[:n]))
            padded = padded or k != r.ids.shape[1] or bool(np.isneginf(r.logprobs[:n, -1]).any())
        tail[n0:n1].copy_(torch.from_numpy(np.ascontiguousarray(r.tail[:n], dtype=np.float32)))
        n0 = n1
    if padded:
        teacher_ids.clamp_(min=0)  # padding -1 -> 0 (its log-prob is -inf, so it carries no mass)
    input_t = torch.from_numpy(input_ids)
    pred_t = torch.from_numpy(pred_index)
    return Batch(
        input_ids=input_t,
        attention_mask=torch.from_numpy(mask),
        pred_index=pred_t,
        target_ids=input_t.view(-1)[pred_t + 1] if N else torch.zeros(0, dtype=torch.long),
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_lp,
        teacher_tail=tail,
        num_targets=N,
        sample_ids=[r.sample_id for r in records],
    )
