"""The student: loading it and its tokenizer, and the inputs check (InputPlan); the loss module is
student_loss.py, the DDP / FSDP2 wrapping distributed.py.

`check_inputs` runs every refusal of bad input before any training step: stores finalized and
non-empty, one codec, tokenizer fingerprints, the divergence the codec can support, sequence
lengths against the student's context, the student's vocabulary against the store's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdpipe.pipeline.config import check_model_dir
from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.data import store_max_sequence_length
from kdpipe.pipeline.divergence import default_divergence
from kdpipe.pipeline.train.losses import TARGET_ENTRY_DIVERGENCES, check_supported
from kdpipe.storage.manifest import open_store, tokenizer_fingerprint
from kdpipe.storage.reader import Record
from kdpipe.storage.errors import ConfigError, StoreError


# ------------------------------------------------------------------------------- loading


def load_tokenizer(cfg: TrainConfig, path: str | None = None):
    from transformers import AutoTokenizer

    check_model_dir(path or cfg.student, "student")
    try:
        return AutoTokenizer.from_pretrained(path or cfg.student, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"student: cannot load a tokenizer from {path or cfg.student!r} ({e})") from None


def load_student(cfg: TrainConfig, weights_from: str | None = None) -> nn.Module:
    """The student in fp32 (master weights; autocast gives bf16 compute), LoRA-wrapped if asked.

    weights_from: a checkpoint directory to resume from (full weights, or a LoRA adapter).
    """
    from transformers import AutoModelForCausalLM

    lora_ckpt = weights_from is not None and os.path.exists(os.path.join(weights_from, "adapter_config.json"))
    src = cfg.student if (weights_from is None or lora_ckpt) else weights_from
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"student: cannot load {src!r} as AutoModelForCausalLM ({e})") from None
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if "lm_head" in cfg.lora_target_modules:
            raise ConfigError("lora_target_modules: 'lm_head' is not supported (the chunked loss reads the lm_head weight directly)")
        if lora_ckpt:
            model = PeftModel.from_pretrained(model, weights_from, is_trainable=True)
        else:
            lcfg = LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                target_modules=list(cfg.lora_target_modules) or "all-linear",
            )
            model = get_peft_model(model, lcfg)
        if cfg.grad_checkpointing:
            model.enable_input_require_grads()
    return model


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers CausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def student_context(model: nn.Module) -> int | None:
    c = hf_model(model).config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ------------------------------------------------------------------------------- inputs check


@dataclass(frozen=True)
class InputPlan:
    """What check_inputs resolved: the loss to compute and how to read the stores."""

    codec: str
    vocab_size: int  # the store's (= the tokenizer's) vocabulary; the student's logits are sliced to it
    max_len: int
    sequence_level: bool  # tokenizers differ: CE on the teacher text retokenized (alpha must be 1)
    longest: int  # longest stored sequence
    num_sequences: int
    divergence: str = "forward_kl"  # the resolved divergence (cfg.divergence, or what "auto" means for these stores)
    cross_tokenizer: str | None = None  # tokenizers differ and cfg.cross_tokenizer is on: 'span' | 'uld' | 'hybrid'


def _check_tail_known(manifests, tail_mode: str) -> None:
    """tail_mode = bucket needs the tail mass, which a renormalized import lacks (StoreMeta.tail_known)."""
    if tail_mode != "bucket":
        return
    for m in manifests:
        if not m.meta.tail_known:
            raise ConfigError(
                f"tail_mode: 'bucket' needs the teacher's tail mass, but {m.store_dir} was imported from "
                f"{m.meta.generation_params.get('imported_from', 'a source')} with renormalized top-k lists (meta "
                "generation_params.tail = 'unknown'); pass --tail-mode renormalize, or import log-probs that "
                "are not renormalized"
            )


def check_inputs(cfg: TrainConfig, tokenizer, model: nn.Module) -> InputPlan:
    """Every refusal of bad input, before training starts (see module doc)."""
    metas = []
    longest, total = 0, 0
    for d in cfg.stores:
        m = open_store(d)  # refuses a missing / unfinalized / empty store, naming the file
        metas.append(m)
        n_long, n_seq = store_max_sequence_length(d)
        longest, total = max(longest, n_long), total + n_seq
    codecs = {m.meta.codec.name for m in metas}
    if len(codecs) > 1:
        raise StoreError(
            "stores: " + ", ".join(f"{m.store_dir} ({m.meta.codec.name})" for m in metas)
            + " use different codecs; mix only stores of one codec"
        )
    fps = {m.meta.tokenizer_fingerprint for m in metas}
    if len(fps) > 1:
        raise StoreError("stores: " + ", ".join(str(m.store_dir) for m in metas) + " come from different tokenizers; mix only stores of one teacher tokenizer")
    codec = codecs.pop()
    if codec == "topk" and cfg.alpha < 1.0:
        _check_tail_known(metas, cfg.tail_mode)  # a renormalized import has no tail for tail_mode = bucket
    store_vocab = metas[0].meta.vocab_size
    student_fp = tokenizer_fingerprint(tokenizer)
    differ = student_fp != metas[0].meta.tokenizer_fingerprint
    # tokenizers differ: logit KD on byte-aligned groups (cross_tokenizer), else only sequence-level KD (alpha 1)
    xtok = cfg.cross_tokenizer if differ and cfg.cross_tokenizer != "none" and cfg.alpha < 1.0 else None
    sequence_level = differ and xtok is None
    if sequence_level and cfg.alpha < 1.0:
        raise ConfigError(
            f"student {cfg.student!r}: its tokenizer differs from the teacher's that wrote {metas[0].store_dir} "
            f"(fingerprint {student_fp[:12]}… vs {metas[0].meta.tokenizer_fingerprint[:12]}…), so the stored "
            "token-level teacher distributions do not apply to it as they are. Pass --cross-tokenizer span, uld or "
            "hybrid for logit distillation on byte-aligned token groups (docs/cross-tokenizer.md), or --alpha 1.0 "
            "for sequence-level distillation on the stored teacher text, retokenized for the student"
        )
    if xtok is not None:
        from kdpipe.pipeline.train.xtok.hooks import check_cross_tokenizer

        check_cross_tokenizer(cfg, metas, tokenizer)  # teacher tokenizer files, byte offsets, the stores' recipes
    # divergence "auto": reverse KL when every store is on-policy (the student's own text), else forward KL.
    on_policy = all(m.meta.recipe == "on-policy" for m in metas)
    divergence = default_divergence(codec, on_policy) if cfg.divergence == "auto" else cfg.divergence
    if cfg.alpha < 1.0:
        check_supported(codec, divergence, cfg.temperature)
        if divergence in TARGET_ENTRY_DIVERGENCES and not all(m.meta.recipe_params.get("target_entry") for m in metas):
            raise ConfigError(
                f"divergence: {divergence!r} needs the teacher's log-prob at each target token as a stored entry, which "
                "only on-policy stores keep (recipe 'on-policy'); "
                + ", ".join(f"{m.store_dir} is recipe {m.meta.recipe!r}" for m in metas if not m.meta.recipe_params.get("target_entry"))
            )
    n_model_vocab = hf_model(model).get_output_embeddings().weight.shape[0]
    vocab = len(tokenizer) if (sequence_level or xtok) else store_vocab
    if n_model_vocab < vocab:
        raise ConfigError(
            f"student {cfg.student!r}: its lm_head has {n_model_vocab} rows but the vocabulary has {vocab} tokens; "
            "the student cannot predict every token id"
        )
    ctx = student_context(model)
    max_len = cfg.max_seq_len or ctx or longest
    if ctx is not None and max_len > ctx:
        raise ConfigError(f"max_seq_len: {max_len} exceeds the student's context of {ctx}")
    if longest > max_len and not cfg.truncate and not sequence_level and not xtok:
        raise ConfigError(
            f"stores: the longest stored sequence has {longest} tokens, more than the student's context of "
            f"{max_len}; pass --truncate to cut longer sequences (the number cut is logged), or use a student "
            "with a longer context / a larger max_seq_len"
        )
    if cfg.tokens_per_batch < 2:
        raise ConfigError("tokens_per_batch: must hold at least one sequence of two tokens")
    return InputPlan(codec, vocab, max_len, sequence_level, longest, total, divergence, cross_tokenizer=xtok)


def resolution_notes(cfg: TrainConfig, plan: InputPlan, resume_from) -> str:
    """What the resolved config cannot say in its values: written as comments atop RUN/train_config.toml."""
    lines = []
    if cfg.divergence == "auto":
        why = "every store is on-policy (the student's own text)" if plan.divergence == "reverse_kl" else "off-policy stores"
        lines.append(f"divergence = \"auto\" resolved to \"{plan.divergence}\": {why}")
    if resume_from is None:
        lines.append(f"start: the weights of student = {cfg.student}; a fresh AdamW state and learning-rate schedule from step 0")
    else:
        lines.append(f"resumed from {resume_from}: weights, AdamW state, schedule and data cursor restored")
    return "\n".join(lines)


class Retokenize:
    """Sequence-level distillation across tokenizers: the teacher's text, retokenized for the student.

    The prompt (tokens before the first target) is decoded with the teacher's tokenizer; the
    completion is Record.text when stored, else the decoded target tokens. The student's CE runs
    on the completion tokens only.
    """

    def __init__(self, student_tok, teacher_tok) -> None:
        self.student, self.teacher = student_tok, teacher_tok

    def __call__(self, rec: Record) -> Record:
        ids = rec.input_ids
        t0 = int(rec.target_positions[0]) if len(rec.target_positions) else len(ids)
        prompt = self.teacher.decode(ids[:t0].tolist(), skip_special_tokens=True)
        completion = rec.text if rec.text is not None else self.teacher.decode(ids[t0:].tolist(), skip_special_tokens=True)
        p = self.student(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        c = self.student(completion, add_special_tokens=False)["input_ids"]
        if self.teacher.eos_token_id is not None and len(ids) and int(ids[-1]) == self.teacher.eos_token_id and self.student.eos_token_id is not None:
            c = c + [self.student.eos_token_id]
        if not p and self.student.bos_token_id is not None:
            p = [self.student.bos_token_id]
        if not p:
            p, c = c[:1], c[1:]
        new = np.asarray(p + c, dtype=np.int32)
        pos = np.arange(len(p), len(new), dtype=np.int32)
        P = len(pos)
        return Record(sample_id=rec.sample_id, input_ids=new, target_positions=pos,
                      ids=np.zeros((P, 0), np.int32), logprobs=np.zeros((P, 0), np.float32),
                      tail=np.zeros(P, np.float32), text=rec.text)


def teacher_tokenizer(cfg: TrainConfig):
    m = open_store(cfg.stores[0])
    from kdpipe.pipeline.train.xtok.hooks import load_teacher_tokenizer
    from kdpipe.storage.tokenizer_files import teacher_tokenizer_dir

    if cfg.teacher_tokenizer or teacher_tokenizer_dir(m.store_dir):  # the store's own files (checked), or the flag
        return load_teacher_tokenizer(cfg, m)
    try:  # stores written before phase one saved the tokenizer: the teacher by name
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(m.meta.teacher, revision=m.meta.teacher_revision,
                                             trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"sequence-level distillation decodes the stored prompts with the teacher's tokenizer, but "
            f"{m.meta.teacher!r} (from {m.store_dir}) cannot be loaded ({e}); make it available locally"
        ) from None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norms (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

