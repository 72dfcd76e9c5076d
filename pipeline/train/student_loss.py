"""The loss module: StudentLoss wraps the student and computes the KD + CE loss on a batch (the chunked
loss, or the cross-tokenizer one on aligned groups); loss_spec builds its LossSpec, batch_inputs its inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdpipe.pipeline.train.chunked import LossSpec, chunked_loss_parts, logit_transform_of
from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.student import InputPlan, hf_model


class StudentLoss(nn.Module):
    """forward(batch tensors) -> summed loss parts; the module DDP / FSDP wrap.

    Runs the decoder (not the CausalLM head), gathers the hidden states that predict targets,
    and hands them with the lm_head weight to the chunked loss: no [B, T, V] logits exist.
    """

    def __init__(self, model: nn.Module, vocab_size: int, spec: LossSpec, cross_tokenizer: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size
        self.spec = spec
        self.cross_tokenizer = cross_tokenizer  # None, or the xtok/losses.py option on aligned groups

    def forward(self, input_ids, attention_mask, pred_index, target_ids, teacher_ids=None, teacher_logprobs=None,
                teacher_tail=None, xtok=None) -> dict[str, torch.Tensor]:
        hf = hf_model(self.model)
        out = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0]  # [B, T, H]
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_index)  # [N, H]
        head = hf.get_output_embeddings()
        if xtok is not None:  # another tokenizer than the teacher's: the loss on aligned groups
            from kdpipe.pipeline.train.xtok.losses import xtok_chunked_loss_parts

            return xtok_chunked_loss_parts(h, head.weight, self.vocab_size, target_ids, xtok, self.spec,
                                           self.cross_tokenizer, bias=getattr(head, "bias", None))
        return chunked_loss_parts(
            h, head.weight, self.vocab_size, target_ids, teacher_ids, teacher_logprobs, teacher_tail,
            self.spec, bias=getattr(head, "bias", None),
        )



def loss_spec(cfg: TrainConfig, plan: InputPlan, model: nn.Module) -> LossSpec:
    return LossSpec(
        alpha=cfg.alpha, temperature=cfg.temperature, divergence=plan.divergence, tail_mode=cfg.tail_mode,
        jsd_beta=cfg.jsd_beta, codec=plan.codec, chunk_size=cfg.loss_chunk_size, compile=cfg.compile_loss,
        backward=cfg.loss_backward,
        **logit_transform_of(hf_model(model).config),
    )



def batch_inputs(batch, device: torch.device, with_teacher: bool) -> dict[str, Any]:
    b = batch.to(device, non_blocking=True)
    out = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "pred_index": b.pred_index,
           "target_ids": b.target_ids}
    if with_teacher and getattr(b, "xtok", None) is not None:  # xtok/collate.py XBatch: aligned groups, not teacher rows
        out["xtok"] = b.xtok
    elif with_teacher:
        out.update(teacher_ids=b.teacher_ids, teacher_logprobs=b.teacher_logprobs, teacher_tail=b.teacher_tail)
    return out
