"""train-student: the training loop, read top to bottom.

setup (ranks, student, inputs check, data, optimizer, resume) → for each optimizer step:
batch → student forward → loss parts by name → backward (per micro-batch) → clip → step → log
→ checkpoint → stop. One code path for 1 process, torchrun DDP and FSDP2, on CPU (gloo) or CUDA.

Per-token normalization. The loss of a step is Σ over every target token of the step, on every
rank and micro-batch, divided by that global count. The count is all-reduced *before* the
first backward, and each micro-batch's summed loss is scaled by world_size / global_count (DDP
and FSDP average gradients over ranks), so the gradient is the same for any split of the same
global batch into ranks × micro-batches — no mean-of-means.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdpipe.pipeline.config import config_to_dict, read_toml, write_resolved
from kdpipe.pipeline.train.checkpoint import latest_checkpoint, load_training_state, save_checkpoint, save_final
from kdpipe.pipeline.train.config import PATH_FIELDS, TrainConfig, absolute_path
from kdpipe.pipeline.train.data import DataSpec, StepData
from kdpipe.pipeline.metrics_log import METRICS_FILE, MetricsLog
from kdpipe.pipeline.train.distributed import autocast_context, no_sync, setup_distributed, wrap_distributed
from kdpipe.pipeline.train.student import (
    Retokenize, resolution_notes, check_inputs, load_student, load_tokenizer, param_groups, teacher_tokenizer,
)
from kdpipe.pipeline.train.student_loss import StudentLoss, batch_inputs, loss_spec
from kdpipe.pipeline.train.xtok.hooks import cross_tokenizer_collate
from kdpipe.pipeline.train.validate import Validator, split_seed
from kdpipe.pipeline.card import push_to_hub
from kdpipe.pipeline.trackers import check_trackers, train_trackers
from kdpipe.storage.errors import ConfigError

# Settings that may change between a run and its resumption (they do not change what is computed).
# loss_backward and loss_chunk_size change only how the same loss and gradients are computed (equal in
# float64, tests/train/test_fused.py), and their per-device defaults moved (config.loss_defaults): a run
# written with the old defaults (recompute, 1024) resumes on CUDA with the new ones.
RESUMABLE_CHANGES = {"steps", "save_every", "log_every", "keep_checkpoints", "resume", "prefetch", "eval_every",
                     "report_to", "push_to_hub", "loss_backward", "loss_chunk_size"}


@dataclass
class TrainResult:
    run: Path
    final: Path | None  # RUN/final, None when interrupted
    steps: int  # optimizer steps completed
    last: dict[str, Any] | None  # the last metrics line
    interrupted: bool
    best: dict[str, Any] | None = None  # --save-best: {"step", "metric", "value"} of RUN/best


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_steps, then cosine from 1 to min_lr_ratio at `steps` (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Sigterm:
    """SIGTERM (Slurm preemption, `kill`) sets a flag; the loop checkpoints and stops after the step."""

    def __init__(self) -> None:
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._old)


def _check_resume_out(run: Path) -> None:
    """--resume with an --out that does not exist is a typo, not a new run: refuse, naming the nearest folders."""
    import difflib

    parent = run.parent
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    close = difflib.get_close_matches(run.name, siblings, n=3, cutoff=0.6)
    if close:
        near = f"did you mean {' or '.join(str(parent / c) for c in close)}?"
    elif siblings:
        near = f"{parent} holds: {', '.join(siblings[:10])}{' ...' if len(siblings) > 10 else ''}"
    else:
        near = f"{parent} does not exist either" if not parent.is_dir() else f"{parent} holds no folder"
    raise ConfigError(f"--resume: out {run} does not exist, so there is no run to continue ({near}); "
                      "fix --out, or drop --resume to start a new run there")


def _paths_absolute(values: dict) -> dict:
    """A train config's paths made absolute. Older checkpoints wrote them as given, relative to the directory
    the run started in: resumed from that directory, they name the same folders. `student` is compared as a
    path only when it names a local folder (else it is a hub id)."""
    out = dict(values)
    for key in PATH_FIELDS + ("student",):
        v = out.get(key)
        if isinstance(v, list):
            out[key] = [absolute_path(p) for p in v]
        elif isinstance(v, str) and v and (key != "student" or os.path.exists(os.path.expanduser(v))):
            out[key] = absolute_path(v)
    return out


def _resume_point(cfg: TrainConfig, run: Path) -> Path | None:
    if cfg.resume and not run.exists():
        _check_resume_out(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None
    if not cfg.resume:
        raise ConfigError(f"out: {run} already holds {ckpt.name}; pass --resume to continue that run, or choose a new --out")
    saved = _paths_absolute(read_toml(ckpt / "train_config.toml"))
    now = _paths_absolute(config_to_dict(cfg))
    # A field added to TrainConfig after the checkpoint was written is absent from its file: the run
    # was computed with that field's default, so only a non-default value now is a real change.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    for k, v in now.items():
        if k not in saved and k in defaults and config_to_dict({k: defaults[k]}).get(k) == v:
            saved[k] = v
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(
            f"--resume: {ckpt} was written with other settings ("
            + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            + f"); resume with the saved settings (see {ckpt / 'train_config.toml'}) or start a new --out"
        )
    return ckpt


def resume_notice(cfg: TrainConfig, run: Path, ckpt: Path) -> list[str]:
    """What a resumed run prints: where it continues, and what a changed --steps does to the schedule.

    The schedule is a function of `steps` (cosine over steps - warmup_steps), so resuming with
    another --steps rebuilds it for the new length: the lr jumps to where the new schedule is at
    this step. That is allowed (to extend a run) but never silent.
    """
    step = int(ckpt.name.rsplit("-", 1)[-1])
    lines = [f"resuming {run} from {ckpt.name} (step {step} of {cfg.steps})"]
    saved = read_toml(ckpt / "train_config.toml").get("steps")
    if isinstance(saved, int) and saved != cfg.steps and cfg.schedule != "constant":
        old = lr_factor(dataclasses.replace(cfg, steps=saved), step) * cfg.lr
        new = lr_factor(cfg, step) * cfg.lr
        lines.append(
            f"warning: --steps changed {saved} -> {cfg.steps}: the {cfg.schedule} schedule is rebuilt for {cfg.steps} "
            f"steps, so the lr at step {step + 1} is {new:.3g} instead of {old:.3g}; pass --steps {saved} to keep "
            "the old schedule"
        )
    return lines


def forward_backward(wrapped, micro_batches, dist, cfg: TrainConfig, with_teacher: bool) -> tuple[torch.Tensor, float]:
    """Forward and backward over this rank's micro-batches of one step, gradients per global target token.

    -> (this rank's [Σce, Σkd, Σloss, input tokens] as float64, the global target-token count).
    """
    # The global number of target tokens of the step, before any backward (see module doc).
    n_local = sum(mb.num_targets for mb in micro_batches)
    n_global = dist.all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64, device=dist.device)).item()
    scale = dist.world_size / max(n_global, 1.0)

    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)
    for i, mb in enumerate(micro_batches):
        with no_sync(wrapped, last=i == len(micro_batches) - 1):
            with autocast_context(cfg, dist.device):
                parts = wrapped(**batch_inputs(mb, dist.device, with_teacher))  # summed "ce", "kd", "loss"
            (parts["loss"] * scale).backward()
        sums += torch.stack([parts["ce"].detach(), parts["kd"].detach(), parts["loss"].detach(),
                             mb.attention_mask.sum().to(dist.device)]).double()
    return sums, n_global


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module doc. Rank 0 writes RUN."""
    dist = setup_distributed(cfg)
    try:
        return _train(cfg, dist)
    finally:
        if dist.backend is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist) -> TrainResult:
    from tqdm.auto import tqdm

    cfg = cfg.with_loss_defaults(dist.device.type)  # loss_backward / loss_chunk_size "auto": this device's
    run = Path(cfg.out)
    resume_from = _resume_point(cfg, run)
    if dist.is_main and resume_from is not None:
        for line in resume_notice(cfg, run, resume_from):
            print(line, file=sys.stderr, flush=True)
    check_trackers(cfg.report_to, run / "trackers", resume_from is not None)  # missing library, another run's trackers

    # ---- the student, checked against the stores before anything trains
    torch.manual_seed(cfg.seed)  # same initialization (e.g. LoRA) on every rank
    tokenizer = load_tokenizer(cfg)
    model = load_student(cfg, weights_from=str(resume_from) if resume_from else None)
    plan = check_inputs(cfg, tokenizer, model)
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty --out behind
    transform = Retokenize(tokenizer, teacher_tokenizer(cfg)) if plan.sequence_level else None
    collate = cross_tokenizer_collate(cfg, plan, tokenizer) if plan.cross_tokenizer else None  # aligns groups (xtok/hooks.py)
    with_teacher = cfg.alpha < 1.0 and not plan.sequence_level
    module = StudentLoss(model.to(dist.device), plan.vocab_size, loss_spec(cfg, plan, model), plan.cross_tokenizer)
    wrapped = wrap_distributed(module, cfg, dist)
    optimizer = torch.optim.AdamW(param_groups(wrapped, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))

    step, cursor, state = 0, None, None
    if resume_from is not None:
        state, cursor = load_training_state(resume_from, wrapped, optimizer, scheduler, cfg, dist)
        step = int(state["step"])
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout etc. differ per rank
    spec = DataSpec(
        stores=cfg.stores, weights=cfg.weights, tokens_per_batch=cfg.tokens_per_batch, max_len=plan.max_len,
        truncate=cfg.truncate, pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, transform=transform,
        collate=collate,
        holdout_fraction=cfg.val_fraction, holdout_seed=split_seed(cfg),
    )
    data = StepData(spec, dist.rank, dist.world_size, cfg.grad_accum, cfg.prefetch, cursor)
    validator = Validator(cfg, plan, spec, dist, run, model, tokenizer, with_teacher, state)
    if dist.is_main:
        write_resolved(cfg, run / "train_config.toml", header=resolution_notes(cfg, plan, resume_from))
    trackers = train_trackers(cfg, run, step if resume_from else None, dist.is_main)  # RUN/trackers (--report-to)
    metrics = MetricsLog(run / METRICS_FILE, step if resume_from else None, dist.is_main, trackers)
    sigterm = _Sigterm()
    bar = tqdm(total=cfg.steps, initial=step, disable=not dist.is_main, desc="train-student", unit="step")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    last: dict[str, Any] | None = None
    interrupted = False
    saved_at = step

    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = next(data)  # this rank's micro-batches of the step, and the data cursor after them
            data_wait = time.perf_counter() - t0  # the prefetch thread was behind by this much (0 when ahead)

            sums, n_global = forward_backward(wrapped, batch.micro_batches, dist, cfg, with_teacher)

            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # ---- log: parts by name, per target token of the global batch
            stats = dist.all_reduce_sum(torch.cat([sums, sums.new_tensor([float(batch.truncated), float(sigterm.flag)])]))
            ce, kd, loss, tokens, truncated, stop = stats.tolist()  # .tolist() waits for the device: step_s is real
            n = max(n_global, 1.0)
            step_s = time.perf_counter() - t0
            last = {
                "step": step, "loss": loss / n, "loss_ce": ce / n, "loss_kd": kd / n,
                "tokens_per_s": tokens / step_s, "lr": lr, "grad_norm": float(grad_norm),
                "target_tokens": int(n_global), "truncated": int(truncated),
                # rank 0's wall time of the step (data, forward, backward, all-reduce, optimizer) and of it the
                # wait for the next batch; on CUDA the allocator's high-water mark since the process started
                "step_s": step_s, "data_wait_s": data_wait,
                **({"max_memory_gib": torch.cuda.max_memory_allocated(dist.device) / 2**30}
                   if dist.device.type == "cuda" else {}),
            }
            metrics.write(last)
            bar.update(1)
            if cfg.log_every and step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{last['loss']:.4f}", ce=f"{last['loss_ce']:.4f}", kd=f"{last['loss_kd']:.4f}")

            # ---- validate (every eval_every steps and after the last; keeps RUN/best), checkpoint, stop
            validator.after_step(step, wrapped, metrics)
            if stop > 0 or (cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps):
                save_checkpoint(run, step, wrapped, model, tokenizer, optimizer, scheduler, batch.cursor,
                                {"truncated": batch.truncated, **validator.state_dict()}, cfg, dist,
                                keep=cfg.keep_checkpoints)
                saved_at = step
            if stop > 0:
                interrupted = True
                break
    finally:
        bar.close()
        data.close()
        metrics.close()
        trackers.close()
        sigterm.restore()

    final = None
    if not interrupted:
        if cfg.save_every and saved_at != step:
            save_checkpoint(run, step, wrapped, model, tokenizer, optimizer, scheduler, batch.cursor,
                            {"truncated": batch.truncated, **validator.state_dict()}, cfg, dist,
                            keep=cfg.keep_checkpoints)
        final = save_final(run, model, tokenizer, cfg, dist)  # with its model card, RUN/final/README.md
        if cfg.push_to_hub and dist.is_main:
            push_to_hub(final, cfg.push_to_hub)
    return TrainResult(run=run, final=final, steps=step, last=last, interrupted=interrupted, best=validator.best)
