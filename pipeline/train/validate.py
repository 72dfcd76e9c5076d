"""Validation during train-student: the loss on held-out data every `eval_every` steps, and RUN/best.

The validation source is either
* `val_stores`: finalized stores read only for validation (same teacher tokenizer and codec as the
  training stores), or
* `val_fraction` F: the sample ids of the training stores with `in_validation(seed, id, F)` (a hash,
  see data.py); the training stream skips exactly those ids, so the two never overlap.

Every `eval_every` optimizer steps, and after the last step, `Validator.after_step` runs the student
(model.eval(), no_grad, the same autocast) through the same StudentLoss module and chunked loss as
training, over every validation record once. The figures use the training normalization: each
part summed over all validation target tokens of every rank, divided by their all-reduced count.
Each rank reads its own part of the validation set (StoreReader partitions by rank); under FSDP2
every forward is a collective, so a rank that ran out of batches runs a small dummy batch until
all ranks are done (its result is not counted).

One line per validation goes to RUN/metrics.jsonl:
    {"step": s, "split": "validation", "loss": …, "loss_ce": …, "loss_kd": …, "target_tokens": …, "sequences": …}
Training lines have no "split" key.

--save-best keeps RUN/best at the lowest validation `best_metric`: the RUN/final layout
(save_pretrained model + tokenizer + train_config.toml, a LoRA run saves its adapter) plus
best.json naming the step. It is written into RUN/best.tmp and swapped in (best -> best.old,
best.tmp -> best, best.old removed), so a crash leaves a whole RUN/best (or best.old, which the
next start puts back). The best-so-far (step, value) is saved in every checkpoint's
train_state.json, so a resumed run keeps comparing against the best of its own history.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kdpipe.pipeline.config import atomic_write_text, write_resolved
from kdpipe.pipeline.train.checkpoint import write_failed, write_failure, save_model
from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.pipeline.train.data import DataSpec, in_validation, store_max_sequence_length, truncate_record
from kdpipe.pipeline.train.distributed import Dist, autocast_context, unwrap
from kdpipe.pipeline.train.student import InputPlan
from kdpipe.pipeline.train.student_loss import batch_inputs
from kdpipe.storage.batch import Batch, collate
from kdpipe.storage.errors import ConfigError, DataError, StoreError
from kdpipe.storage.manifest import fsync_dir, open_store
from kdpipe.storage.reader import Record, StoreReader

def split_seed(cfg: TrainConfig) -> int:
    """The seed of the val_fraction split: val_split_seed, else the run's seed."""
    return cfg.seed if cfg.val_split_seed is None else cfg.val_split_seed


def check_val_stores(cfg: TrainConfig, plan: InputPlan) -> None:
    """Refuse validation stores that the training stores' loss cannot be computed on, naming the store."""
    train_meta = open_store(cfg.stores[0]).meta
    for d in cfg.val_stores:
        m = open_store(d)  # refuses a missing / unfinalized store, naming the file
        if m.meta.codec.name != plan.codec:
            raise StoreError(f"val_stores: {d} uses codec {m.meta.codec.name!r} but the training stores use "
                             f"{plan.codec!r}; validate on a store of the same codec")
        if m.meta.tokenizer_fingerprint != train_meta.tokenizer_fingerprint:
            raise StoreError(f"val_stores: {d} comes from another tokenizer than {cfg.stores[0]}; validate on a store "
                             "written by the same teacher tokenizer")
        if m.meta.vocab_size != train_meta.vocab_size:
            raise StoreError(f"val_stores: {d} has vocab_size {m.meta.vocab_size}, {cfg.stores[0]} has "
                             f"{train_meta.vocab_size}; validate on a store of the same teacher")
        longest, _ = store_max_sequence_length(d)
        if longest > plan.max_len and not cfg.truncate and not plan.sequence_level:
            raise ConfigError(f"val_stores: {d} holds a sequence of {longest} tokens, more than the student's context "
                              f"of {plan.max_len}; pass --truncate (validation cuts the same way), or use a shorter store")


class ValidationData:
    """This rank's validation records, once through in store order, as token-budget micro-batches."""

    def __init__(self, cfg: TrainConfig, spec: DataSpec, dist: Dist) -> None:
        self.stores = cfg.val_stores or cfg.stores
        self.fraction = cfg.val_fraction  # 0 with val_stores: every record counts
        self.seed = split_seed(cfg)
        self.spec = spec
        self.readers = [
            StoreReader(d, rank=dist.rank, world_size=dist.world_size, worker_id=0, num_workers=1, shuffle=False,
                        verify=True)
            for d in self.stores
        ]

    def _records(self) -> Iterator[Record]:
        for d, reader in zip(self.stores, self.readers):
            reader.set_epoch(0)
            for rec in reader:
                if self.fraction > 0 and not in_validation(self.seed, rec.sample_id, self.fraction):
                    continue  # a training sample
                if self.spec.transform is not None:
                    rec = self.spec.transform(rec)
                if len(rec.input_ids) > self.spec.max_len:
                    if not self.spec.truncate:
                        raise DataError(
                            f"{d}: validation sample {rec.sample_id!r} has {len(rec.input_ids)} tokens, more than the "
                            f"student's context of {self.spec.max_len}; pass --truncate to cut such sequences"
                        )
                    rec = truncate_record(rec, self.spec.max_len)
                yield rec

    def batches(self) -> Iterator[Batch]:
        """Rows × longest row <= tokens_per_batch, as in training (a longer row goes alone)."""
        budget = self.spec.tokens_per_batch
        # the training run's collate stage (cross-tokenizer KD aligns there, xtok/collate.py XCollate)
        batch_of = self.spec.collate or (lambda rs: collate(rs, pad_id=self.spec.pad_id))
        recs: list[Record] = []
        longest = 0
        for rec in self._records():
            n = len(rec.input_ids)
            if recs and (len(recs) + 1) * max(longest, n) > budget:
                yield batch_of(recs)
                recs, longest = [], 0
            recs.append(rec)
            longest = max(longest, n)
        if recs:
            yield batch_of(recs)


def _dummy_batch(pad_id: int) -> Batch:
    """One two-token sequence with one target: the forward a rank without batches left joins under FSDP."""
    rec = Record(sample_id="", input_ids=np.array([pad_id, pad_id], np.int32), target_positions=np.array([1], np.int32),
                 ids=np.zeros((1, 0), np.int32), logprobs=np.zeros((1, 0), np.float32), tail=np.zeros(1, np.float32),
                 text=None)
    return collate([rec], pad_id=pad_id)


class Validator:
    """Validation and RUN/best for one run; `after_step` is the trainer's one call (see module doc)."""

    def __init__(self, cfg: TrainConfig, plan: InputPlan, spec: DataSpec, dist: Dist, run: Path, model, tokenizer,
                 with_teacher: bool, train_state: dict[str, Any] | None = None) -> None:
        self.cfg, self.dist, self.run = cfg, dist, run
        self.model, self.tokenizer = model, tokenizer  # the HF model that RUN/best saves
        self.with_teacher = with_teacher
        self.enabled = bool(cfg.val_stores) or cfg.val_fraction > 0
        self.best: dict[str, Any] | None = (train_state or {}).get("best")
        if not self.enabled:
            return
        if cfg.val_stores:
            check_val_stores(cfg, plan)
        self.data = ValidationData(cfg, spec, dist)
        self.dummy = _dummy_batch(spec.pad_id)
        if cfg.save_best and dist.is_main:
            self._recover_best()

    # -- the trainer's call ----------------------------------------------------------------------

    def after_step(self, step: int, wrapped: torch.nn.Module, metrics) -> dict[str, Any] | None:
        """Validate when `step` is a multiple of eval_every or the last step; log it; keep RUN/best."""
        cfg = self.cfg
        if not self.enabled or not (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            return None
        record = {"step": step, "split": "validation", **self.evaluate(wrapped)}
        metrics.write(record)
        msg = f"step {step}: validation loss {record['loss']:.4f} (ce {record['loss_ce']:.4f}, kd {record['loss_kd']:.4f})"
        value = record[cfg.best_metric]
        if cfg.save_best and (self.best is None or value < self.best["value"]):
            self.best = {"step": step, "metric": cfg.best_metric, "value": value}
            self._save_best(record)
            msg += f"; the lowest {cfg.best_metric} so far: saved {self.run / 'best'}"
        self._echo(msg)
        return record

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's train_state keeps of validation: the best-so-far."""
        return {"best": self.best} if self.best is not None else {}

    # -- the validation loss ---------------------------------------------------------------------

    def evaluate(self, wrapped: torch.nn.Module) -> dict[str, Any]:
        """{loss, loss_ce, loss_kd} per validation target token (all ranks), target_tokens, sequences."""
        dist, cfg = self.dist, self.cfg
        module = unwrap(wrapped)  # DDP: the inner module, no gradient hooks; FSDP2: the sharded module itself
        collective = dist.backend is not None
        was_training = module.training
        module.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=dist.device)  # Σce, Σkd, Σloss, targets, sequences
        try:
            with torch.no_grad():
                batches = self.data.batches()
                while True:
                    mb = next(batches, None)
                    if collective:  # every rank runs the same number of forwards (FSDP2 all-gathers in each)
                        more = dist.all_reduce_sum(torch.tensor([float(mb is not None)], dtype=torch.float64,
                                                                device=dist.device))
                        if more.item() == 0:
                            break
                    elif mb is None:
                        break
                    real = mb is not None
                    with autocast_context(cfg, dist.device):
                        parts = module(**batch_inputs(mb if real else self.dummy, dist.device, self.with_teacher and real))
                    if real:
                        sums += torch.stack([parts["ce"], parts["kd"], parts["loss"],
                                             parts["ce"].new_tensor(float(mb.num_targets)),
                                             parts["ce"].new_tensor(float(len(mb.sample_ids)))]).double()
        finally:
            module.train(was_training)
        ce, kd, loss, n, seqs = dist.all_reduce_sum(sums).tolist()
        if n == 0:
            where = (f"val_stores {list(cfg.val_stores)}" if cfg.val_stores
                     else f"val_fraction = {cfg.val_fraction} of {list(cfg.stores)}")
            raise DataError(f"{where}: the validation set holds no target token; raise --val-fraction or give a "
                            "--val-store with target tokens")
        return {"loss": loss / n, "loss_ce": ce / n, "loss_kd": kd / n, "target_tokens": int(n), "sequences": int(seqs)}

    # -- RUN/best --------------------------------------------------------------------------------

    def _recover_best(self) -> None:
        best, old = self.run / "best", self.run / "best.old"
        if old.exists():
            if best.exists():
                shutil.rmtree(old, ignore_errors=True)  # the swap finished; only the cleanup was cut
            else:
                os.replace(old, best)  # cut between the two renames: the previous best is whole
        info = best / "best.json"
        if info.is_file() and self.best is not None and json.loads(info.read_text())["step"] > self.best["step"]:
            self._echo(f"note: {best} is from step {json.loads(info.read_text())['step']}, after the checkpoint this "
                       "run resumes from; it is replaced when the resumed run reaches a lower validation "
                       f"{self.cfg.best_metric} than {self.best['value']:.4f} (step {self.best['step']})")

    def _save_best(self, record: dict[str, Any]) -> None:
        run, dist, step = self.run, self.dist, record["step"]
        best, tmp, old = run / "best", run / "best.tmp", run / "best.old"
        try:
            if dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            dist.barrier()
            save_model(self.model, self.tokenizer, tmp, self.cfg.fsdp, dist)  # collective under FSDP
            if dist.is_main:
                write_resolved(self.cfg, tmp / "train_config.toml")
                info = {**record, "metric": self.cfg.best_metric, "value": record[self.cfg.best_metric],
                        "lora_adapter": bool(self.cfg.lora)}
                info.pop("split", None)
                atomic_write_text(tmp / "best.json", json.dumps(info, indent=1))
                if best.exists():
                    os.replace(best, old)
                os.replace(tmp, best)
                shutil.rmtree(old, ignore_errors=True)
                fsync_dir(run)
            dist.barrier()
        except Exception as e:
            if not write_failure(e):
                raise
            raise write_failed(e, tmp, run, f"best model of step {step}") from e

    def _echo(self, msg: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg)


def best_info(run: Path) -> dict[str, Any] | None:
    """RUN/best/best.json, or None when the run keeps no best model."""
    p = Path(run) / "best" / "best.json"
    return json.loads(p.read_text()) if p.is_file() else None
