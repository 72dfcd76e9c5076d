"""TrainConfig: every setting of `kdpipe train-student`, with its only default.

Filled by `load_config(TrainConfig, --config TOML, CLI flags)`; the resolved config is written to
RUN/train_config.toml and into every checkpoint, so a run can be reproduced or resumed from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal

from kdpipe.pipeline.train.losses import DIVERGENCES, TARGET_ENTRY_DIVERGENCES
from kdpipe.pipeline.trackers import parse_report_to
from kdpipe.storage.errors import ConfigError


# The loss fields the trainer resolves on the device that trains (with_loss_defaults), with their "auto" values:
# a job's planned config keeps these, the finished run's train_config.toml holds what they resolved to.
LOSS_AUTO: dict[str, object] = {"loss_backward": "auto", "loss_chunk_size": 0}


def loss_defaults(device: str) -> dict[str, object]:
    """What loss_backward = "auto" and loss_chunk_size = 0 resolve to on `device` ("cuda" or "cpu"),
    applied by TrainConfig.with_loss_defaults in the trainer, so RUN/train_config.toml holds the values.

    CUDA, from bench_gpu on an H200 (docs/train.md, 8k tokens x 128k vocabulary x 4096 hidden):
    in_forward was faster than recompute at both chunk sizes (47.3 vs 57.5 ms at 4096, 50.8 vs
    63.3 ms at 1024): it skips the logits' recompute, one lm_head matmul of three. Chunk 4096 was
    the fastest; since the loss keeps one [chunk, V] buffer in the matmul dtype (fused.py), it holds
    ~2 GiB beyond its inputs there (bench_loss_memory.py; 7.9 GiB before; expected, not yet measured
    on a GPU). CPU, from benchmarks/bench_loss.py (docs/train.md, 1,022 tokens × 32k vocabulary):
    in_forward took 0.83× recompute's CPU time and 0.59× its step memory at chunk 1024, 0.67× and
    0.83× at chunk 256; the CPU chunk stays 1024.
    """
    if device == "cuda":
        return {"loss_backward": "in_forward", "loss_chunk_size": 4096}
    return {"loss_backward": "in_forward", "loss_chunk_size": 1024}


# Fields that always name local paths, made absolute in __post_init__ (`student` may be a hub id: left as given).
PATH_FIELDS = ("stores", "out", "val_stores", "teacher_tokenizer")
TUPLE_PATH_FIELDS = ("stores", "val_stores")  # one or more paths


def absolute_path(path: str) -> str:
    """`path` made absolute against the working directory, `~` expanded, `..` and `.` folded (no symlinks followed)."""
    return os.path.abspath(os.path.expanduser(str(path)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # ---- what to train on what
    student: str  # the student: AutoModelForCausalLM hub id or local path
    stores: tuple[str, ...]  # a finalized store directory; repeat --store to mix several
    out: str  # the run directory RUN: checkpoints, final/, metrics.jsonl, train_config.toml
    store_weights: tuple[float, ...] = ()  # mixing weight per store (empty = equal weights)

    # ---- the loss: α·CE + (1−α)·T²·D(teacher_T ‖ student_T), see losses.py
    alpha: float = 0.5  # weight of the CE on the target tokens; 1.0 = no logit distillation
    temperature: float = 1.0  # T, applied to the student's logits and to the stored teacher distribution
    divergence: Literal["auto", "forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "reverse_kl_sampled_token"] = "auto"  # D(teacher_T || student_T), see losses.py; auto = reverse_kl on on-policy stores, else forward_kl
    jsd_beta: float = 0.5  # β of generalized_jsd, 0 < β < 1
    tail_mode: Literal["bucket", "renormalize"] = "bucket"  # topk stores: the tail mass as one extra category (bucket) or the top-k renormalized
    # Chunk size: 0 = auto (loss_defaults): 4096 on CUDA, 1024 on CPU. On CUDA the loss writes one
    # [chunk, V] buffer in the matmul dtype (the logits, overwritten by their gradient) beside the [V, H]
    # lm_head gradient: at 128k vocabulary, chunk 4096 holds ~1 GiB of it (bf16), chunk 1024 ~0.25 GiB
    # but ran 7% slower on an H200 (docs/train.md); 4096 was the fastest, and is expected (not yet measured
    # on a GPU) to stay within ~2 GiB beyond its inputs at 8k tokens × 128k × 4096.
    loss_chunk_size: int = 0  # target tokens per chunk of [chunk, V] logits; 0 = auto: 4096 on CUDA, 1024 on CPU (docs/train.md; tune with benchmarks/bench_gpu.py)
    compile_loss: Literal["auto", "on", "off"] = "auto"  # torch.compile the per-chunk loss; auto = on CUDA with Triton, off on CPU
    loss_backward: Literal["auto", "recompute", "in_forward"] = "auto"  # recompute: checkpointed chunks, logits recomputed in backward; in_forward: gradients computed per chunk in the forward pass (one lm_head matmul fewer, a [V, H] gradient buffer); auto: in_forward (measured faster on CUDA and CPU, see loss_defaults)
    # ---- a student with another tokenizer than the teacher's (the package xtok/, docs/cross-tokenizer.md)
    cross_tokenizer: Literal["none", "span", "uld", "hybrid"] = "none"  # logit KD on byte-aligned token groups when the tokenizers differ; none = refuse (or --alpha 1, sequence-level)
    xtok_min_mapped_mass: float = 0.9  # hybrid: a 1:1 group takes the vocabulary-mapped KL when its mapped ids hold this share of the teacher's kept mass
    teacher_tokenizer: str | None = None  # the teacher tokenizer's folder (default: STORE/teacher_tokenizer); checked against the store's fingerprint

    # ---- optimization (AdamW, linear warmup then cosine decay to lr·min_lr_ratio)
    lr: float = 5e-5  # peak learning rate of AdamW
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine decay over `steps`, or constant lr
    weight_decay: float = 0.0  # AdamW weight decay (not on biases and norms)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    steps: int = 1000  # optimizer steps in total (the cosine schedule spans them)
    tokens_per_batch: int = 8192  # padded tokens (rows × longest row) per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step per rank

    # ---- data
    shuffle: bool = True  # shuffle rows (seeded, resumable) instead of reading the stores in order
    shuffle_buffer: int = 1024  # rows in the shuffle buffer
    max_seq_len: int | None = None  # None = the student's context (max_position_embeddings)
    truncate: bool = False  # longer sequences: cut (and count) instead of refusing the store
    prefetch: int = 2  # batches prepared ahead by a background thread

    # ---- model
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, slower)
    lora: bool = False  # train LoRA adapters (peft) instead of every weight
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling alpha
    lora_dropout: float = 0.0  # LoRA dropout
    lora_target_modules: tuple[str, ...] = ()  # empty = every linear layer ("all-linear")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    trust_remote_code: bool = False  # allow the student repo's own Python code (off unless you trust it)

    # ---- distributed (torchrun sets RANK/WORLD_SIZE; a plain run is world size 1)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    fsdp: bool = False  # FSDP2 (fully_shard per decoder layer + root) instead of DDP

    # ---- validation (validate.py): a second store, or a seeded split of the training stores by sample id
    val_stores: tuple[str, ...] = ()  # finalized stores read only for validation (--val-store, repeatable)
    val_fraction: float = 0.0  # or: this share of the training stores' sample ids, held out of training (0 = off)
    val_split_seed: int | None = None  # seed of the val_fraction split (None = seed, the run's seed)
    eval_every: int = 0  # optimizer steps between validations (0 = only after the last step)
    save_best: bool = False  # keep RUN/best at the lowest validation `best_metric`
    best_metric: Literal["loss", "loss_ce", "loss_kd"] = "loss"  # which validation figure --save-best minimizes

    # ---- run bookkeeping
    seed: int = 0  # model init (LoRA), data shuffle and dropout seed
    save_every: int = 500  # optimizer steps between checkpoints (0 = only RUN/final)
    keep_checkpoints: int = 0  # keep the newest N checkpoints (0 = keep all)
    log_every: int = 1  # steps between tqdm postfix updates (metrics.jsonl gets every step)
    resume: bool = False  # continue from the newest RUN/checkpoint-STEP

    # ---- ecosystem (pipeline/trackers.py, pipeline/card.py)
    report_to: tuple[str, ...] | None = None  # trackers, comma-separated: tensorboard,wandb,mlflow,trackio or none (unset: $KDPIPE_REPORT_TO, else none)
    push_to_hub: str | None = None  # Hub repo id: upload RUN/final (model card included) with huggingface_hub at the end

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{key}: {msg}")

        # A list (the natural library call) or one path given for a tuple of paths is that tuple: before, a list was
        # made into one path named after its repr ("/cwd/['store']") and a string was read letter by letter.
        for key in TUPLE_PATH_FIELDS:
            v = getattr(self, key)
            if isinstance(v, (str, os.PathLike)):
                v = os.fspath(v)
                object.__setattr__(self, key, (v,) if v else ())
            elif isinstance(v, list):
                object.__setattr__(self, key, tuple(os.fspath(p) for p in v))
        if not self.stores:
            raise bad("stores", "give at least one store directory (--store)")
        if self.store_weights:
            if len(self.store_weights) != len(self.stores):
                raise bad("store_weights", f"{len(self.store_weights)} weights for {len(self.stores)} stores; give one per store")
            if any(not (w > 0 and math.isfinite(w)) for w in self.store_weights):
                raise bad("store_weights", f"{list(self.store_weights)}: every weight must be > 0")
        if not (0.0 <= self.alpha <= 1.0):
            raise bad("alpha", f"{self.alpha} is outside [0, 1]; 1.0 = CE only, 0.0 = KD only")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise bad("temperature", f"{self.temperature} must be > 0")
        if self.divergence != "auto" and self.divergence not in DIVERGENCES + TARGET_ENTRY_DIVERGENCES:
            raise bad("divergence", f"{self.divergence!r} is not one of auto, {', '.join(DIVERGENCES + TARGET_ENTRY_DIVERGENCES)}")
        if not (0.0 < self.xtok_min_mapped_mass <= 1.0):
            raise bad("xtok_min_mapped_mass", f"{self.xtok_min_mapped_mass} must be in (0, 1]")
        if not (0.0 < self.jsd_beta < 1.0):
            raise bad("jsd_beta", f"{self.jsd_beta} must be strictly between 0 and 1")
        if self.loss_chunk_size < 0:
            raise bad("loss_chunk_size", f"{self.loss_chunk_size} must be >= 1 (or 0 = auto: per device)")
        for key in ("steps", "tokens_per_batch", "grad_accum", "shuffle_buffer", "lora_r", "prefetch"):
            if getattr(self, key) < 1:
                raise bad(key, f"{getattr(self, key)} must be >= 1")
        for key in ("warmup_steps", "save_every", "keep_checkpoints", "log_every"):
            if getattr(self, key) < 0:
                raise bad(key, f"{getattr(self, key)} must be >= 0")
        if self.warmup_steps > self.steps:
            raise bad("warmup_steps", f"{self.warmup_steps} is more than steps = {self.steps}: the learning rate would "
                      "never reach lr; lower --warmup-steps (or raise --steps)")
        if not (self.lr > 0):
            raise bad("lr", f"{self.lr} must be > 0")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise bad("min_lr_ratio", f"{self.min_lr_ratio} must be in [0, 1]")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", f"{self.max_grad_norm} must be >= 0 (0 = no clipping)")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise bad("max_seq_len", f"{self.max_seq_len} must be >= 2")
        validation = bool(self.val_stores) or self.val_fraction > 0
        if self.val_stores and self.val_fraction > 0:
            raise bad("val_fraction", f"{self.val_fraction} together with val_stores {list(self.val_stores)}; give one "
                      "validation source: --val-store DIR or --val-fraction F (a split of the training stores)")
        if not (0.0 <= self.val_fraction < 1.0) or not math.isfinite(self.val_fraction):
            raise bad("val_fraction", f"{self.val_fraction} must be in (0, 1): the share of sample ids held out for "
                      "validation (0 = no split)")
        if self.eval_every < 0:
            raise bad("eval_every", f"{self.eval_every} must be >= 0 (0 = validate only after the last step)")
        if self.eval_every and not validation:
            raise bad("eval_every", f"{self.eval_every} needs a validation source; add --val-store DIR or "
                      "--val-fraction F, or set eval_every = 0")
        if self.save_best and not validation:
            raise bad("save_best", "needs a validation source to pick the best step; add --val-store DIR or "
                      "--val-fraction F, or drop --save-best")
        if self.val_split_seed is not None and self.val_fraction == 0:
            raise bad("val_split_seed", "only applies to a --val-fraction split; set val_fraction or drop val_split_seed")
        if self.best_metric == "loss_kd" and self.alpha == 1.0:
            raise bad("best_metric", "'loss_kd' is always 0 with alpha = 1.0 (no logit distillation); use 'loss' or 'loss_ce'")
        if self.compile_loss not in ("auto", "on", "off"):
            raise bad("compile_loss", f"{self.compile_loss!r} is not one of auto (on CUDA with Triton), on, off")
        if self.loss_backward not in ("auto", "recompute", "in_forward"):
            raise bad("loss_backward", f"{self.loss_backward!r} is not one of auto, recompute, in_forward")
        if self.device == "cpu" and self.backend == "nccl":
            raise bad("backend", "'nccl' needs CUDA but device = 'cpu'; use backend = 'gloo' or 'auto'")
        # resolved here, once: the written train_config.toml records the trackers actually used
        object.__setattr__(self, "report_to", parse_report_to(self.report_to, "report_to"))
        # Absolute paths, so `--store store1` and `--store ./store1` (or a resume from another directory)
        # are the same run, and the train_config.toml written beside the run means the same from anywhere.
        for key in PATH_FIELDS:
            v = getattr(self, key)
            if isinstance(v, tuple):
                object.__setattr__(self, key, tuple(absolute_path(p) for p in v))
            elif v:
                object.__setattr__(self, key, absolute_path(v))

        # (the loss's per-device defaults are not: with_loss_defaults, on the device that trains)

    def with_loss_defaults(self, device: str) -> "TrainConfig":
        """This config with loss_backward = "auto" and loss_chunk_size = 0 resolved for `device` ("cuda"/"cpu").

        Called by the trainer on the device that trains, which then writes RUN/train_config.toml:
        the run records what ran, while a config built elsewhere (a job planned on a login node
        without a GPU, configs/*.toml) keeps "auto" and resolves on the compute node.
        """
        resolved = loss_defaults(device)
        return dataclasses.replace(self, **{k: resolved[k] for k, auto in LOSS_AUTO.items() if getattr(self, k) == auto})

    @property
    def weights(self) -> tuple[float, ...]:
        """Normalized mixing weights, one per store."""
        w = self.store_weights or (1.0,) * len(self.stores)
        return tuple(x / sum(w) for x in w)
