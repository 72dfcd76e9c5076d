"""Batches for train-student: stores mixed by weight, token-budget micro-batches, a seekable cursor.

Data partitions. An optimizer step consumes `grad_accum` micro-batches on each of `world_size`
ranks. Micro-batch slot `s` of rank `r` reads partition `r * grad_accum + s` of
`world_size * grad_accum` (each a `StoreReader` part), so the records of a step are the same for
any split of the same global batch into ranks × accumulation slots: 1 process with grad_accum 2
sees exactly what 2 processes with grad_accum 1 see.

Within a partition, each store has its own reader; a counter-based RNG picks the store of the
next record by weight. A micro-batch is filled until one more record would push its padded
size (rows × longest row) past `tokens_per_batch`; that record is held as `pending` and opens
the next micro-batch. The cursor of a partition = each reader's cursor + the store-pick counter
+ the pending record, all JSON; `load_state_dict` seeks there without replaying.

Validation split. With `holdout_fraction` F > 0, a record is held out of training (and read by
validate.py instead) when `in_validation(holdout_seed, sample_id, F)`: a hash of (seed, id), so
the split needs no id list in memory, is the same on every rank and on resume, and does not
depend on the world size or the shard layout. The reader still counts skipped records in its
cursor, so resume seeks exactly as without a split.

A background thread prepares `prefetch` steps ahead, each tagged with the cursor *after* it, so
a checkpoint saves the position of the last step trained, not of the last step prefetched.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from kdpipe.storage.batch import Batch, collate
from kdpipe.storage.manifest import open_store
from kdpipe.storage.reader import Record, StoreReader
from kdpipe.storage.errors import DataError

CURSOR_VERSION = 1


def store_max_sequence_length(store_dir: str) -> tuple[int, int]:
    """(longest sequence, number of sequences) of a finalized store, reading only `input_ids` offsets."""
    m = open_store(store_dir)
    longest = 0
    for s in m.shards:
        with pa.OSFile(str(s.path), "rb") as f:
            idx = pa.ipc.open_file(f).schema.get_field_index("input_ids")
            # Only the input_ids column is read and decompressed.
            r = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=[idx]))
            for i in range(r.num_record_batches):
                off = r.get_batch(i).column(0).offsets.to_numpy()
                if len(off) > 1:
                    longest = max(longest, int(np.diff(off).max()))
    return longest, m.num_sequences


# ------------------------------------------------------------------------------- records


def in_validation(seed: int, sample_id: str, fraction: float) -> bool:
    """Whether `sample_id` belongs to the validation share `fraction` of a seeded split (see module doc)."""
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{seed}\x00{sample_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") < fraction * 2.0**64


def truncate_record(rec: Record, max_len: int) -> Record:
    """Cut a sequence to max_len tokens, dropping targets whose token falls past the cut."""
    n = int(np.searchsorted(rec.target_positions, max_len))  # targets t < max_len survive
    return Record(
        sample_id=rec.sample_id, input_ids=rec.input_ids[:max_len], target_positions=rec.target_positions[:n],
        ids=rec.ids[:n], logprobs=rec.logprobs[:n], tail=rec.tail[:n], text=rec.text,
    )


def record_to_json(rec: Record) -> dict[str, Any]:
    return {
        "sample_id": rec.sample_id, "text": rec.text, "input_ids": rec.input_ids.tolist(),
        "target_positions": rec.target_positions.tolist(), "ids": rec.ids.tolist(), "ids_shape": list(rec.ids.shape),
        # JSON has no -inf: padding is written as null.
        "logprobs": [[None if math.isinf(x) else x for x in row] for row in rec.logprobs.tolist()],
        "tail": rec.tail.tolist(),
    }


def record_from_json(d: dict[str, Any]) -> Record:
    shape = tuple(d["ids_shape"])
    lp = np.array([[(-np.inf if x is None else x) for x in row] for row in d["logprobs"]], dtype=np.float32).reshape(shape)
    return Record(
        sample_id=d["sample_id"], input_ids=np.asarray(d["input_ids"], np.int32),
        target_positions=np.asarray(d["target_positions"], np.int32),
        ids=np.asarray(d["ids"], np.int32).reshape(shape), logprobs=lp,
        tail=np.asarray(d["tail"], np.float32), text=d["text"],
    )


# ------------------------------------------------------------------------------- one partition


@dataclass
class DataSpec:
    """What the data layer needs from TrainConfig (plus the resolved length limit)."""

    stores: tuple[str, ...]
    weights: tuple[float, ...]
    tokens_per_batch: int
    max_len: int  # longest sequence the student takes
    truncate: bool
    pad_id: int
    shuffle: bool = True
    shuffle_buffer: int = 1024
    seed: int = 0
    # Sample ids held out for validation (in_validation(holdout_seed, id, holdout_fraction)) are skipped.
    holdout_fraction: float = 0.0
    holdout_seed: int = 0
    # Optional record rewrite (sequence-level distillation retokenizes the teacher's text).
    transform: Callable[[Record], Record] | None = field(default=None, repr=False)
    # Optional Records -> Batch (cross-tokenizer KD aligns in the collate stage, xtok/collate.py XCollate); None = storage collate.
    collate: Callable[[list[Record]], Batch] | None = field(default=None, repr=False)


class PartitionStream:
    """Records of one data partition, mixed over the stores by weight, epoch after epoch."""

    def __init__(self, spec: DataSpec, part: int, parts: int) -> None:
        self.spec, self.part, self.parts = spec, part, parts
        self.readers = [
            StoreReader(d, rank=part, world_size=parts, worker_id=0, num_workers=1, shuffle=spec.shuffle,
                        seed=spec.seed, shuffle_buffer=spec.shuffle_buffer, verify=True)
            for d in spec.stores
        ]
        for d, r in zip(spec.stores, self.readers):
            if len(r) == 0:
                raise DataError(
                    f"{d}: partition {part} of {parts} holds no sequence (the store has {r.num_sequences} for "
                    f"ranks × grad_accum = {parts} partitions); use fewer ranks or a smaller grad_accum, or a bigger store"
                )
        self._iters: list[Iterator[Record] | None] = [None] * len(self.readers)
        self.picks = 0  # records drawn so far: the counter of the store-pick RNG
        self.truncated = 0  # sequences cut to max_len
        self.cum_weights = np.cumsum(spec.weights)

    def _pick(self) -> int:
        if len(self.readers) == 1:
            return 0
        u = np.random.default_rng([self.spec.seed, self.part, self.picks, 11]).random() * self.cum_weights[-1]
        return int(min(np.searchsorted(self.cum_weights, u, side="right"), len(self.readers) - 1))

    def _draw(self, i: int) -> Record:
        for _ in range(2):
            if self._iters[i] is None:
                self._iters[i] = iter(self.readers[i])
            try:
                return next(self._iters[i])
            except StopIteration:  # the reader moved itself to the next epoch
                self._iters[i] = None
        raise DataError(f"{self.spec.stores[i]}: partition {self.part} of {self.parts} yielded no record in a whole epoch")

    def next(self) -> Record:
        i = self._pick()
        self.picks += 1
        rec = self._draw(i)
        skipped = 0
        while in_validation(self.spec.holdout_seed, rec.sample_id, self.spec.holdout_fraction):
            skipped += 1
            if skipped > len(self.readers[i]):  # a whole epoch of this partition is held out
                raise DataError(
                    f"{self.spec.stores[i]}: every sample of partition {self.part} of {self.parts} is held out for "
                    f"validation (val_fraction = {self.spec.holdout_fraction}); lower --val-fraction, use fewer ranks "
                    "or a smaller grad_accum, or give a separate --val-store"
                )
            rec = self._draw(i)
        if self.spec.transform is not None:
            rec = self.spec.transform(rec)
        if len(rec.input_ids) > self.spec.max_len:
            if not self.spec.truncate:
                raise DataError(
                    f"{self.spec.stores[i]}: sample {rec.sample_id!r} has {len(rec.input_ids)} tokens, more than the "
                    f"student's context of {self.spec.max_len}; pass --truncate to cut such sequences (counted), or a "
                    "student with a longer context"
                )
            rec = truncate_record(rec, self.spec.max_len)
            self.truncated += 1
        return rec

    def state_dict(self) -> dict[str, Any]:
        return {"readers": [r.state_dict() for r in self.readers], "picks": self.picks, "truncated": self.truncated}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        for r, s in zip(self.readers, st["readers"]):
            r.load_state_dict(s)
        self._iters = [None] * len(self.readers)
        self.picks = int(st["picks"])
        self.truncated = int(st["truncated"])

    @property
    def epochs(self) -> list[int]:
        return [r.epoch for r in self.readers]


class TokenBudgetBatcher:
    """Micro-batches of one partition: rows × longest row <= tokens_per_batch (a longer row goes alone)."""

    def __init__(self, stream: PartitionStream) -> None:
        self.stream = stream
        self.pending: Record | None = None

    def next_batch(self) -> Batch:
        budget = self.stream.spec.tokens_per_batch
        recs: list[Record] = []
        longest = 0
        while True:
            rec = self.pending if self.pending is not None else self.stream.next()
            self.pending = None
            L = len(rec.input_ids)
            if recs and (len(recs) + 1) * max(longest, L) > budget:
                self.pending = rec  # opens the next micro-batch
                break
            recs.append(rec)
            longest = max(longest, L)
            if (len(recs) + 1) * longest > budget:
                break  # even a shortest next row could not fit: close now, no pending needed
        if self.stream.spec.collate is not None:
            return self.stream.spec.collate(recs)
        return collate(recs, pad_id=self.stream.spec.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "pending": None if self.pending is None else record_to_json(self.pending)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.stream.load_state_dict(st["stream"])
        self.pending = None if st["pending"] is None else record_from_json(st["pending"])


# ------------------------------------------------------------------------------- a rank's steps


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step on this rank, and the data cursor after them."""

    micro_batches: list[Batch]
    cursor: dict[str, Any]
    truncated: int  # sequences cut so far on this rank


class StepData:
    """Iterator of StepBatches for one rank; a daemon thread prepares `prefetch` steps ahead."""

    def __init__(self, spec: DataSpec, rank: int, world_size: int, grad_accum: int, prefetch: int = 2,
                 cursor: dict[str, Any] | None = None) -> None:
        parts = world_size * grad_accum
        self.layout = {"version": CURSOR_VERSION, "world_size": world_size, "grad_accum": grad_accum,
                       "stores": list(spec.stores), "weights": list(spec.weights), "seed": spec.seed,
                       "tokens_per_batch": spec.tokens_per_batch}
        self.slots = [TokenBudgetBatcher(PartitionStream(spec, rank * grad_accum + s, parts)) for s in range(grad_accum)]
        if cursor is not None:
            self._load(cursor)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="kdpipe-data", daemon=True)
        self._thread.start()

    def _load(self, cursor: dict[str, Any]) -> None:
        if isinstance(cursor.get("stores"), list):  # older cursors hold the stores as given: relative to the run's cwd
            cursor = {**cursor, "stores": [os.path.abspath(os.path.expanduser(str(s))) for s in cursor["stores"]]}
        layout = {**self.layout, "stores": [os.path.abspath(os.path.expanduser(str(s))) for s in self.layout["stores"]]}
        diff = [k for k, v in layout.items() if cursor.get(k) != v]
        if diff:
            raise DataError(
                "data cursor does not match this run ("
                + ", ".join(f"{k}: saved {cursor.get(k)!r}, now {layout[k]!r}" for k in diff)
                + "); resume with the same stores, weights, seed, tokens_per_batch, ranks and grad_accum"
            )
        for slot, st in zip(self.slots, cursor["slots"]):
            slot.load_state_dict(st)

    def state_dict(self) -> dict[str, Any]:
        return {**self.layout, "slots": [s.state_dict() for s in self.slots]}

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                mbs = [slot.next_batch() for slot in self.slots]
                item = StepBatches(mbs, self.state_dict(), sum(s.stream.truncated for s in self.slots))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the training thread
            self._queue.put(e)

    def __iter__(self) -> "StepData":
        return self

    def __next__(self) -> StepBatches:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


def describe_stores(store_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """One line of facts per store, for the run log."""
    out = []
    for d in store_dirs:
        m = open_store(d)
        out.append({"store": str(d), "teacher": m.meta.teacher, "codec": m.meta.codec.name, "top_k": m.meta.codec.top_k,
                    "sequences": m.num_sequences, "target_tokens": m.num_target_tokens})
    return out
