"""ShardWriter: one task's rows -> rolling zstd Arrow IPC shards, crash-safe and resumable.

A shard becomes visible only complete: it is written to `<name>.tmp`, fsynced, then renamed.
Its name derives from (task index, sequence number), and the task manifest lists the finished
shards, so a rerun of the same task skips the sample ids already stored and continues numbering.
An exclusive lock per (store, task) stops two processes from writing the same task.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdpipe.storage import codecs
from kdpipe.storage.errors import DataError, StoreError
from kdpipe.storage.format import (
    BATCH_BYTES, FORMAT_VERSION, MD_CODEC, MD_FORMAT, META_FILE, SHARD_RE, TASKS_DIR, ZSTD_LEVEL,
    shard_name, shard_schema, task_manifest_name,
)
from kdpipe.storage.manifest import (
    StoreMeta, atomic_write_json, cache_key, check_format_version, file_checksum, fsync_dir, kdpipe_version,
    load_task_manifest, meta_differences, read_json, remove_orphan_tmps,
)


# Arrow value type -> numpy dtype of the flat column (pa's to_pandas_dtype would import pandas).
_NP_DTYPE = {pa.int32(): np.int32, pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.float32(): np.float32, pa.bool_(): np.bool_}


def _ensure_meta(store_dir: Path, meta: StoreMeta) -> str:
    """Write meta.json if absent (atomically, first writer wins); else refuse a different meta."""
    key = cache_key(meta)
    path = store_dir / META_FILE
    if not path.exists():
        tmp = path.with_name(f"{META_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format_version": FORMAT_VERSION, "cache_key": key, "meta": meta.to_dict()}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another task created it meanwhile: then compare below
        except FileExistsError:
            pass
        except FileNotFoundError:
            # our tmp was swept by a writer that found meta.json already in place: compare below
            if not path.exists():
                raise
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(store_dir)
    # meta.json exists now, so every meta.json.<pid>.tmp is useless: a killed writer's leftover,
    # or another writer's whose os.link fails anyway (it then compares, as above). Never read.
    remove_orphan_tmps(path)
    existing = read_json(path, "store metadata")
    check_format_version(existing, path)
    if existing.get("cache_key") != key:
        recorded = existing.get("meta") if isinstance(existing.get("meta"), dict) else {}
        diff = meta_differences(recorded, meta.to_dict())  # ["codec.top_k: 8 -> 4", ...]
        raise StoreError(
            f"{store_dir}: the store was written by another teacher/codec/dataset (cache key "
            f"{str(existing.get('cache_key'))[:12]}… != {key[:12]}…; store -> this run: {'; '.join(diff) or 'format'}); "
            "use a new store directory or delete this one"
        )
    return key


def _open_columns(f, names: list[str]) -> pa.ipc.RecordBatchFileReader:
    """An IPC file reader that decodes only `names` (the other columns' buffers are skipped)."""
    schema = pa.ipc.open_file(f).schema
    f.seek(0)
    fields = [schema.get_field_index(n) for n in names]
    return pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=fields))


def read_shard_stats(path: Path) -> dict[str, Any]:
    """Rows, target tokens and batch sizes of a finished shard (used to adopt shards on resume)."""
    with pa.OSFile(str(path), "rb") as f:
        reader = _open_columns(f, ["target_positions"])
        batch_rows, tokens = [], 0
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            batch_rows.append(b.num_rows)
            tokens += int(pc.sum(pc.list_value_length(b.column(0))).as_py() or 0)
    return {"rows": sum(batch_rows), "target_tokens": tokens, "batch_rows": batch_rows}


def shard_sample_ids(path: Path) -> list[str]:
    with pa.OSFile(str(path), "rb") as f:
        reader = _open_columns(f, ["sample_id"])
        out: list[str] = []
        for i in range(reader.num_record_batches):
            out.extend(reader.get_batch(i).column(0).to_pylist())
    return out


class ShardWriter:
    """Writes one task's sequences into a store directory (see module doc).

    Usage:
        with ShardWriter(store, meta, task_index=i, num_tasks=n) as w:
            done = w.done_ids()
            for sample in data:
                if sample.id not in done:
                    w.add(sample.id, input_ids, positions, top_ids, top_logprobs)
    """

    def __init__(self, store_dir: str | os.PathLike, meta: StoreMeta, task_index: int = 0, num_tasks: int = 1,
                 shard_bytes: int = 256 << 20, zstd_level: int = ZSTD_LEVEL) -> None:
        if not 0 <= task_index < num_tasks:
            raise StoreError(f"task_index {task_index} must be in [0, num_tasks={num_tasks})")
        if shard_bytes <= 0:
            raise StoreError(f"shard_bytes must be positive, got {shard_bytes}")
        self.store_dir = Path(store_dir)
        self.meta = meta
        self.codec = meta.codec
        self.task_index = task_index
        self.num_tasks = num_tasks
        self.shard_bytes = shard_bytes
        self.zstd_level = zstd_level
        self.schema = shard_schema(self.codec.name, self.codec.max_entries, meta.vocab_size).with_metadata(
            {MD_FORMAT: str(FORMAT_VERSION).encode(), MD_CODEC: json.dumps(meta.to_dict()["codec"], sort_keys=True).encode()}
        )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        tasks = self.store_dir / TASKS_DIR
        tasks.mkdir(exist_ok=True)
        self._lock_path = tasks / task_manifest_name(task_index).replace(".json", ".lock")
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreError(
                f"{self.store_dir}: task {task_index} is being written by another process (lock {self._lock_path}); "
                "wait for it or give this run another task index"
            ) from None
        self._manifest_path = tasks / task_manifest_name(task_index)
        self._cur = None
        try:
            self.cache_key = _ensure_meta(self.store_dir, meta)
            self._load_task_manifest()
        except OSError as e:
            self._release()
            raise StoreError(f"{self.store_dir}: cannot prepare task {task_index} ({e.filename or ''}: {e.strerror or e}); "
                             "check free space and permissions") from None
        except BaseException:
            self._release()
            raise
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._sink = None
        self._ipc = None
        self._cur: dict[str, Any] | None = None
        self._added: set[str] = set()
        self._closed = False

    # -- resume --------------------------------------------------------------------------------

    def _load_task_manifest(self) -> None:
        """Load this task's manifest, drop stale .tmp files, adopt finished shards not yet listed."""
        if self._manifest_path.exists():
            tm = load_task_manifest(self._manifest_path, self.store_dir, self.cache_key)
            if tm.task_index != self.task_index:
                raise StoreError(f"{self._manifest_path}: records task {tm.task_index}, not {self.task_index}")
            if tm.num_tasks != self.num_tasks:
                raise StoreError(
                    f"{self._manifest_path}: task {self.task_index} was started with num_tasks={tm.num_tasks}, "
                    f"now {self.num_tasks}; rerun with the same number of tasks or use a new store"
                )
            for info in tm.shards:
                if not info.path.is_file() or info.path.stat().st_size != info.bytes:
                    raise StoreError(f"{self._manifest_path}: lists shard {info.file}, which is missing or not "
                                     f"{info.bytes} bytes; delete that entry (or the task's shards and manifest) and rerun the task")
            self._shards = [info.to_dict() for info in tm.shards]
        else:
            self._shards = []
        prefix = f"shard-t{self.task_index:05d}-"
        for p in self.store_dir.glob(prefix + "*.tmp"):
            p.unlink()  # a writer of this task died mid-shard; we hold the lock, so it is stale
        remove_orphan_tmps(self._manifest_path)  # task-NNNNN.json.<pid>.tmp of a killed writer (same lock)
        listed = {s["file"] for s in self._shards}
        found = sorted(p.name for p in self.store_dir.glob(prefix + "*.arrow") if SHARD_RE.match(p.name))
        for name in found:
            if name not in listed:  # renamed into place, then killed before the manifest update
                path = self.store_dir / name
                self._shards.append({"file": name, "bytes": path.stat().st_size, "checksum": file_checksum(path),
                                     "task": self.task_index, **read_shard_stats(path)})
        self._shards.sort(key=lambda s: s["file"])
        self._next_seq = 1 + max((int(SHARD_RE.match(s["file"]).group(2)) for s in self._shards), default=-1)
        self._done: set[str] | None = None
        self._write_task_manifest(complete=False)

    def done_ids(self) -> set[str]:
        """Sample ids already in finished shards of this task (a resumed run skips them)."""
        if self._done is None:
            done: set[str] = set()
            for s in self._shards:
                done.update(shard_sample_ids(self.store_dir / s["file"]))
            self._done = done
        return set(self._done)

    # -- writing -------------------------------------------------------------------------------

    def add(self, sample_id: str, input_ids: Sequence[int], target_positions: Sequence[int], top_ids: np.ndarray,
            top_logprobs: np.ndarray, text: str | None = None) -> None:
        """Encode one sequence's teacher entries with the store's codec and queue it for writing.

        top_ids [P, K] int (sorted by log-prob desc, -1 padding), top_logprobs [P, K] float
        (full-vocabulary log-probs, -inf padding); entries j describe p(input_ids[t_j] | input_ids[:t_j]).
        """
        if self._closed:
            raise StoreError(f"{self.store_dir}: writer for task {self.task_index} is closed")
        sample_id = str(sample_id)
        if sample_id in self._added or (self._done is not None and sample_id in self._done):
            raise DataError(f"sample id {sample_id!r} was already written to task {self.task_index} of {self.store_dir}; sample ids must be unique")
        ids = np.asarray(input_ids, dtype=np.int64)
        pos = np.asarray(target_positions, dtype=np.int64)
        top_ids = np.asarray(top_ids)
        top_lp = np.asarray(top_logprobs, dtype=np.float32)
        L, P = ids.shape[0], pos.shape[0]
        where = f"sample {sample_id!r}"
        if ids.ndim != 1 or pos.ndim != 1:
            raise DataError(f"{where}: input_ids and target_positions must be 1-D")
        if top_ids.ndim != 2 or top_ids.shape != top_lp.shape or top_ids.shape[0] != P:
            raise DataError(f"{where}: top_ids {top_ids.shape} and top_logprobs {top_lp.shape} must both be [P={P}, K]")
        if P and (pos.min() < 1 or pos.max() >= L):
            raise DataError(f"{where}: target positions must be in [1, {L}) (position t predicts input_ids[t] from input_ids[:t])")
        if P > 1 and (np.diff(pos) <= 0).any():
            raise DataError(f"{where}: target positions must be strictly increasing")
        V = self.meta.vocab_size
        if L and (ids.min() < 0 or ids.max() >= V):
            raise DataError(f"{where}: input_ids must be in [0, vocab_size={V})")
        if top_ids.size and top_ids.max() >= V:
            raise DataError(f"{where}: teacher ids must be < vocab_size={V} (got {int(top_ids.max())})")
        if V > (1 << 24):
            raise DataError(f"vocab_size {V} exceeds the store's 24-bit token ids")
        if top_ids.shape[1] > 1:
            # a repeated id would count its mass twice (vLLM lists the sampled token first: dedupe it)
            K = top_ids.shape[1]
            s = np.sort(np.where(top_ids >= 0, top_ids, -1 - np.arange(K)[None, :]), axis=1)
            dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if dup.any():
                j = int(np.argmax(dup))
                raise DataError(f"{where}: target position {int(pos[j])} lists a token id twice; deduplicate the teacher entries")
        if self.codec.name == "topk":
            cols = codecs.encode_topk(self.codec, top_ids, top_lp)
        else:
            cols = codecs.encode_sampled(self.codec, top_ids, top_lp, codecs.sample_seed(self.codec.seed, sample_id))
        row = {"sample_id": sample_id, "text": text, "input_ids": ids.astype(np.int32), "target_positions": pos.astype(np.int32), **cols}
        self._pending.append(row)
        self._added.add(sample_id)
        self._pending_bytes += sum(v.nbytes for v in cols.values()) + 4 * (L + P) + len(sample_id) + len(text or "")
        if self._pending_bytes >= min(BATCH_BYTES, self.shard_bytes):
            try:
                self._flush_batch()
            except OSError as e:
                raise self._write_failed(e) from None

    def _flush_batch(self) -> None:
        if not self._pending:
            return
        rows = self._pending
        arrays = []
        for f in self.schema:
            if f.name in ("sample_id", "text"):
                arrays.append(pa.array([r[f.name] for r in rows], type=f.type))
            else:
                vt = f.type.value_type
                parts = [np.asarray(r[f.name]) for r in rows]
                lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                values = pa.array(np.concatenate(parts).astype(_NP_DTYPE[vt]) if parts else np.zeros(0), type=vt)
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        if self._ipc is None:
            self._open_shard()
        self._ipc.write_batch(batch)
        self._cur["batch_rows"].append(batch.num_rows)
        self._cur["rows"] += batch.num_rows
        self._cur["target_tokens"] += sum(len(r["target_positions"]) for r in rows)
        self._pending = []
        self._pending_bytes = 0
        if self._sink.tell() >= self.shard_bytes:
            self._finish_shard()

    def _open_shard(self) -> None:
        name = shard_name(self.task_index, self._next_seq)
        self._next_seq += 1
        tmp = self.store_dir / (name + ".tmp")
        self._sink = pa.OSFile(str(tmp), "wb")
        opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=self.zstd_level))
        self._ipc = pa.ipc.new_file(self._sink, self.schema, options=opts)
        self._cur = {"file": name, "tmp": tmp, "rows": 0, "target_tokens": 0, "batch_rows": []}

    def _finish_shard(self) -> None:
        self._ipc.close()
        self._sink.close()
        cur = self._cur
        tmp: Path = cur.pop("tmp")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.store_dir / cur["file"]
        cur.update(bytes=tmp.stat().st_size, checksum=file_checksum(tmp), task=self.task_index)
        os.replace(tmp, final)
        fsync_dir(self.store_dir)
        self._shards.append(cur)
        if self._done is not None:
            self._done.update(self._added)
        self._ipc = self._sink = self._cur = None
        self._write_task_manifest(complete=False)

    def _write_task_manifest(self, complete: bool) -> None:
        atomic_write_json(self._manifest_path, {
            "format_version": FORMAT_VERSION, "cache_key": self.cache_key, "task_index": self.task_index,
            "num_tasks": self.num_tasks, "complete": complete, "kdpipe_version": kdpipe_version(),
            "shards": self._shards,
        })

    def close(self) -> None:
        """Flush the last rows, finish the open shard and mark the task complete."""
        self._seal(complete=True)

    def checkpoint(self) -> None:
        """Finish the open shard (its rows become durable) without marking the task complete.

        For preemption: after SIGTERM a task keeps everything it has encoded, stays incomplete
        (finalize refuses it) and a rerun continues after the checkpointed samples.
        """
        self._seal(complete=False)

    def _seal(self, complete: bool) -> None:
        if self._closed:
            return
        try:
            self._flush_batch()
            if self._ipc is not None:
                self._finish_shard()
            if complete:
                self._write_task_manifest(complete=True)
        except OSError as e:
            raise self._write_failed(e) from None
        finally:
            if complete:
                self._closed = True
                self._release()

    def _write_failed(self, e: OSError) -> StoreError:
        """Disk full / file too large / I/O error: drop the open .tmp shard, keep finished ones."""
        where = e.filename or (self._cur or {}).get("tmp") or self._manifest_path
        self._drop_open_shard()
        self._closed = True
        self._release()
        return StoreError(
            f"{self.store_dir}: writing {where} failed ({e.strerror or e}); free disk space (or raise the file size "
            f"limit) and rerun task {self.task_index}: its finished shards are kept and skipped"
        )

    def _drop_open_shard(self) -> None:
        if self._cur is None:
            return
        for closer in (self._ipc, self._sink):
            try:
                if closer is not None:
                    closer.close()
            except (OSError, pa.ArrowException):
                pass  # the shard is discarded anyway
        Path(self._cur["tmp"]).unlink(missing_ok=True)
        self._ipc = self._sink = self._cur = None

    def abort(self) -> None:
        """Drop unfinished rows and the open .tmp shard; finished shards stay (a rerun resumes)."""
        if self._closed:
            return
        try:
            self._drop_open_shard()
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def shards(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self._shards]
