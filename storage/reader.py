"""StoreReader: stream a store's sequences as Records, partitioned over rank x dataloader worker.

Each epoch: the shard order is shuffled with (seed, epoch) — identical on every rank — the rows
of the shards in that order are concatenated, and part `rank * num_workers + worker_id` of
`world_size * num_workers` gets one contiguous block of that sequence (block sizes differ by at
most one row), so every row is read exactly once per epoch. Within a part a bounded shuffle
buffer reorders rows. Memory is one decoded record batch + the shuffle buffer, whatever the
store's size.

The cursor (state_dict) names the epoch, the rows consumed from the part, the row references in
the shuffle buffer and the RNG state; load_state_dict seeks to it (it re-reads only the buffered
rows, by random access) instead of replaying the epoch.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from kdpipe.storage import codecs
from kdpipe.storage.errors import StoreError
from kdpipe.storage.format import FORMAT_VERSION, MD_FORMAT, shard_schema
from kdpipe.storage.manifest import ShardInfo, StoreManifest, StoreMeta, checksum_matches, open_store

CURSOR_VERSION = 1

# What decoding damaged bytes can raise besides Arrow's own exceptions: all become StoreError.
_DECODE_ERRORS = (ValueError, IndexError, TypeError, OverflowError, KeyError, UnicodeDecodeError, struct.error)


@dataclass
class Record:
    """One sequence with its teacher targets (see the store API in docs/store-format.md).

    ids/logprobs are [P, K] with K = the most entries any position of this record kept.
    """

    sample_id: str
    input_ids: np.ndarray  # [L] int32
    target_positions: np.ndarray  # [P] int32; entries of row j describe p(input_ids[t_j] | input_ids[:t_j])
    ids: np.ndarray  # [P, K] int32, -1 padding
    logprobs: np.ndarray  # [P, K] float32 log p̂, -inf padding
    tail: np.ndarray  # [P] float32 teacher mass outside ids
    text: str | None = None


def partition(shard_rows: Sequence[int], order: Sequence[int], parts: int, part: int) -> list[tuple[int, int, int]]:
    """Rows of shards concatenated in `order`, cut into `parts` contiguous blocks.

    -> spans (shard index, first row, end row) of block `part`. Every row lands in exactly one
    block; block sizes differ by at most one.
    """
    if not 0 <= part < parts:
        raise StoreError(f"partition {part} is outside [0, {parts}); check rank/world_size/worker_id/num_workers")
    total = int(sum(shard_rows))
    lo, hi = total * part // parts, total * (part + 1) // parts
    spans, start = [], 0
    for g in order:
        n = int(shard_rows[g])
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            spans.append((int(g), a - start, b - start))
        start += n
        if start >= hi:
            break
    return spans


class _OpenShard:
    """A shard file opened for reading (no mmap: pages of a finished shard must not linger in RSS)."""

    def __init__(self, info: ShardInfo, meta: StoreMeta, verify: bool) -> None:
        self.info = info
        self.meta = meta
        self.codec = codec = meta.codec
        path = info.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"{path}: shard listed in the manifest is missing") from None
        if size != info.bytes:
            raise StoreError(f"{path}: shard is {size} bytes but the manifest says {info.bytes} (truncated or replaced)")
        if verify:
            ok, got = checksum_matches(path, info.checksum)
            if not ok:
                raise StoreError(f"{path}: checksum mismatch (file {got} != manifest {info.checksum}); the shard is corrupted, regenerate its task")
        try:
            self.file = pa.OSFile(str(path), "rb")
            # ArrowException: damaged IPC metadata also gives ArrowNotImplementedError/ArrowTypeError
            self.reader = pa.ipc.open_file(self.file)
            check_schema(self.reader.schema, codec, meta.vocab_size, path)
        except (StoreError, pa.ArrowException, OSError, *_DECODE_ERRORS) as e:
            if hasattr(self, "file"):
                self.file.close()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{path}: not a readable Arrow IPC file ({type(e).__name__}: {e})") from None
        if self.reader.num_record_batches != len(info.batch_rows):
            raise StoreError(f"{path}: {self.reader.num_record_batches} record batches, the manifest says {len(info.batch_rows)}")
        self.starts = np.concatenate([[0], np.cumsum(info.batch_rows)])
        self._cached: tuple[int, DecodedBatch] | None = None

    def batch(self, i: int) -> "DecodedBatch":
        if self._cached is None or self._cached[0] != i:
            where = f"{self.info.path}: record batch {i}"
            try:
                b = self.reader.get_batch(i)
                # Full validation (offsets in bounds and monotone, lengths, UTF-8) before any buffer
                # is touched: Arrow trusts offsets, and a damaged string offset otherwise aborts the
                # interpreter in as_py() (finding 8). Cheap next to zstd decompression (see
                # docs/RELIABILITY.md), and a checksum does not help against a hostile producer.
                b.validate(full=True)
            except (pa.ArrowException, OSError, *_DECODE_ERRORS) as e:
                raise StoreError(f"{where} is unreadable ({type(e).__name__}: {e}); the shard is corrupted, regenerate its task") from None
            if b.num_rows != self.info.batch_rows[i]:
                raise StoreError(f"{where} has {b.num_rows} rows, the manifest says {self.info.batch_rows[i]}")
            try:
                decoded = DecodedBatch(b, self.meta, where)
            except (pa.ArrowException, *_DECODE_ERRORS) as e:
                raise StoreError(f"{where}: undecodable ({type(e).__name__}: {e}); the shard was not written by "
                                 "kdpipe's writer or is corrupted") from None
            self._cached = (i, decoded)
        return self._cached[1]

    def rows(self, start: int, end: int) -> Iterator[Record]:
        i = int(np.searchsorted(self.starts, start, side="right") - 1)
        r = start
        while r < end:
            b = self.batch(i)
            stop = min(end, int(self.starts[i + 1]))
            for j in range(r - int(self.starts[i]), stop - int(self.starts[i])):
                yield b.record(j)
            r = stop
            i += 1

    def close(self) -> None:
        self._cached = None
        self.file.close()


def check_schema(schema: pa.Schema, codec: codecs.CodecConfig, vocab_size: int, path: Path) -> None:
    expected = shard_schema(codec.name, codec.max_entries, vocab_size)
    md = schema.metadata or {}
    if md.get(MD_FORMAT) != str(FORMAT_VERSION).encode():
        raise StoreError(f"{path}: shard format version {md.get(MD_FORMAT)!r}, this kdpipe reads {FORMAT_VERSION}")
    if not schema.remove_metadata().equals(expected):
        got = {f.name: str(f.type) for f in schema}
        want = {f.name: str(f.type) for f in expected}
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise StoreError(f"{path}: wrong schema for codec {codec.name!r} (columns differing: {', '.join(diff)})")


_NP = {pa.int32(): np.int32, pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.float32(): np.float32}


def _np_view(arr: pa.Array) -> np.ndarray:
    """numpy view of a primitive Arrow array without nulls (bools are unpacked).

    Straight from the buffers: Array.to_numpy would import pandas on first use (~1 s).
    """
    data = arr.buffers()[1]
    if arr.type == pa.bool_():
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return bits[arr.offset:arr.offset + len(arr)].view(np.bool_)
    try:
        dtype = _NP[arr.type]
    except KeyError:
        raise StoreError(f"unexpected column type {arr.type}") from None
    return np.frombuffer(data, dtype=dtype)[arr.offset:arr.offset + len(arr)]


class DecodedBatch:
    """Zero-copy numpy views of one record batch's columns, checked; record(j) decodes row j.

    The checks are what a checksum cannot give: a shard written by a buggy or hostile producer
    (with a matching checksum) must not decode into silently wrong targets or crash numpy.
    """

    def __init__(self, batch: pa.RecordBatch, meta: StoreMeta, where: str) -> None:
        self.codec = meta.codec
        self.vocab_size = meta.vocab_size
        self.where = where
        self.ids_col = batch.column("sample_id")
        self.text_col = batch.column("text")
        self.cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in batch.schema.names:
            if name in ("sample_id", "text"):
                continue
            col = batch.column(name)
            self.cols[name] = (_np_view(col.offsets), _np_view(col.values))
        if batch.column("sample_id").null_count:
            raise StoreError(f"{where}: a sample_id is null")
        bad = self._check()
        if bad:
            raise StoreError(f"{where}: {bad}; the shard was not written by kdpipe's writer or is corrupted")

    def _lengths(self, name: str) -> np.ndarray:
        return np.diff(self.cols[name][0].astype(np.int64))

    def _flat(self, name: str) -> np.ndarray:
        off, val = self.cols[name]
        return val[off[0]:off[-1]]

    def _check(self) -> str | None:
        """Vectorized over the batch: lengths agree, positions/ids/counts in range. None if fine."""
        codec, V = self.codec, self.vocab_size
        P = self._lengths("target_positions")
        L = self._lengths("input_ids")
        for name in ("num_entries", "tail" if codec.name == "topk" else "tail_count"):
            if not np.array_equal(self._lengths(name), P):
                return f"column {name} has a different length than target_positions in some row"
        n = self._flat("num_entries").astype(np.int64)
        if n.size and n.max() > codec.max_entries:
            return f"a position holds {int(n.max())} entries, more than the codec's {codec.max_entries}"
        cs = np.concatenate([[0], np.cumsum(n)])
        row_end = np.cumsum(P)
        E = cs[row_end] - cs[row_end - P]
        entry_cols = ("ids_lo", "ids_hi", "logprob_q_lo", "logprob_q_hi") if codec.name == "topk" else ("id_delta_lo", "id_delta_hi", "counts")
        for name in entry_cols:
            if not np.array_equal(self._lengths(name), E):
                return f"column {name} does not hold sum(num_entries) values in some row"
        tp = self._flat("target_positions").astype(np.int64)
        row_of = np.repeat(np.arange(len(P)), P)
        if tp.size and ((tp < 1).any() or (tp >= L[row_of]).any()):
            return "a target position lies outside its sequence"
        if tp.size > 1 and ((np.diff(tp) <= 0) & (row_of[1:] == row_of[:-1])).any():
            return "target positions are not strictly increasing"
        inp = self._flat("input_ids")
        if inp.size and (inp.min() < 0 or inp.max() >= V):
            return f"an input id is outside [0, vocab_size={V})"
        if codec.name == "topk":
            tail = self._flat("tail")
            if tail.size and not ((tail >= 0) & (tail <= 1)).all():
                return "a tail mass is outside [0, 1]"
        return None

    def _get(self, name: str, j: int) -> np.ndarray:
        off, val = self.cols[name]
        return val[off[j]:off[j + 1]]

    def record(self, j: int) -> Record:
        try:
            return self._record(j)
        except StoreError:
            raise
        except (pa.ArrowException, *_DECODE_ERRORS) as e:
            # the batch checks should make this unreachable; a damaged shard still must never
            # surface as a numpy/Arrow error (or worse, a silent wrong read)
            raise StoreError(f"{self.where}, row {j}: undecodable ({type(e).__name__}: {e}); the shard was not written "
                             "by kdpipe's writer or is corrupted") from None

    def _record(self, j: int) -> Record:
        counts = self._get("num_entries", j)
        try:
            if self.codec.name == "topk":
                ids = codecs.decode_ids(counts, self._get("ids_lo", j), self._get("ids_hi", j), self.vocab_size)
                lp, tail = codecs.decode_topk(self.codec, counts, self._get("logprob_q_lo", j), self._get("logprob_q_hi", j), self._get("tail", j))
                tail = tail.copy()
            else:
                ids = codecs.decode_delta_ids(counts, self._get("id_delta_lo", j), self._get("id_delta_hi", j), self.vocab_size)
                lp, tail = codecs.decode_sampled(self.codec, counts, self._get("counts", j), self._get("tail_count", j))
        except codecs.CorruptColumns as e:
            raise StoreError(f"{self.where}, row {j}: {e}; the shard was not written by kdpipe's writer or is corrupted") from None
        text = self.text_col[j].as_py()
        return Record(
            sample_id=self.ids_col[j].as_py(), input_ids=self._get("input_ids", j).copy(),
            target_positions=self._get("target_positions", j).copy(), ids=ids, logprobs=lp, tail=tail, text=text,
        )


def _worker_info(worker_id: int | None, num_workers: int | None) -> tuple[int, int]:
    if worker_id is not None and num_workers is not None:
        return worker_id, num_workers
    info = torch.utils.data.get_worker_info()
    if info is not None:
        return (info.id if worker_id is None else worker_id), (info.num_workers if num_workers is None else num_workers)
    return (0 if worker_id is None else worker_id), (1 if num_workers is None else num_workers)


class StoreReader(torch.utils.data.IterableDataset):
    """Iterable of Record over one or more finalized stores (see module doc).

    worker_id/num_workers: None inside a torch DataLoader worker takes them from
    torch.utils.data.get_worker_info(); elsewhere None means 0 / 1.
    """

    def __init__(self, store_dirs: str | os.PathLike | list, rank: int = 0, world_size: int = 1,
                 worker_id: int | None = None, num_workers: int | None = None, shuffle: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1024, epoch: int = 0, verify: bool = True) -> None:
        super().__init__()
        dirs = [store_dirs] if isinstance(store_dirs, (str, os.PathLike)) else list(store_dirs)
        if not dirs:
            raise StoreError("StoreReader needs at least one store directory")
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} must be in [0, world_size={world_size})")
        self.stores: list[StoreManifest] = [open_store(d) for d in dirs]
        fp = self.stores[0].meta.tokenizer_fingerprint
        for m in self.stores[1:]:
            if m.meta.tokenizer_fingerprint != fp:
                raise StoreError(f"{m.store_dir}: tokenizer fingerprint differs from {self.stores[0].store_dir}; stores read together must share a tokenizer")
        self.shards: list[tuple[ShardInfo, StoreMeta]] = [(s, m.meta) for m in self.stores for s in m.shards]
        self.shard_rows = [s.rows for s, _ in self.shards]
        self.rank, self.world_size = rank, world_size
        self.worker_id, self.num_workers = worker_id, num_workers
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, max(1, int(shuffle_buffer))
        self.verify = verify
        self._verified: set[int] = set()
        self._state: dict[str, Any] = {"epoch": int(epoch), "consumed": 0, "buffer": [], "rng": None}

    # -- properties ----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._state["epoch"]

    @property
    def num_sequences(self) -> int:
        return sum(self.shard_rows)

    @property
    def num_target_tokens(self) -> int:
        return sum(m.num_target_tokens for m in self.stores)

    def _part(self) -> tuple[int, int]:
        w, nw = _worker_info(self.worker_id, self.num_workers)
        if not 0 <= w < nw:
            raise StoreError(f"worker_id {w} must be in [0, num_workers={nw})")
        return self.rank * nw + w, self.world_size * nw

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.shards)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def spans(self, epoch: int | None = None) -> list[tuple[int, int, int]]:
        part, parts = self._part()
        return partition(self.shard_rows, self._order(self.epoch if epoch is None else epoch), parts, part)

    def __len__(self) -> int:
        return sum(b - a for _, a, b in self.spans())

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning on the next iteration."""
        self._state = {"epoch": int(epoch), "consumed": 0, "buffer": [], "rng": None}

    # -- cursor --------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        part, parts = self._part()
        return {"stores": [m.cache_key for m in self.stores], "shards": len(self.shards), "part": part, "parts": parts,
                "seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer}

    def state_dict(self) -> dict[str, Any]:
        """The cursor after the last record yielded (JSON-serializable)."""
        st = self._state
        spans = self.spans(st["epoch"])
        shard, row = _locate(spans, st["consumed"])
        return {"version": CURSOR_VERSION, **self._identity(), "epoch": st["epoch"], "consumed": st["consumed"],
                "shard": self.shards[shard][0].file if shard is not None else None, "row": row,
                "buffer": [list(r) for r in st["buffer"]], "rng": st["rng"]}

    def load_state_dict(self, cursor: dict[str, Any]) -> None:
        if cursor.get("version") != CURSOR_VERSION:
            raise StoreError(f"reader cursor version {cursor.get('version')!r} is not {CURSOR_VERSION}")
        ident = self._identity()
        bad = [k for k, v in ident.items() if cursor.get(k) != v]
        if bad:
            raise StoreError(f"reader cursor does not match this reader ({', '.join(f'{k}: {cursor.get(k)!r} != {ident[k]!r}' for k in bad)}); "
                             "resume with the same stores, seed, shuffle settings, world size and workers")
        self._state = {"epoch": int(cursor["epoch"]), "consumed": int(cursor["consumed"]),
                       "buffer": [tuple(r) for r in cursor["buffer"]], "rng": cursor["rng"]}

    # -- reading -------------------------------------------------------------------------------

    def _open(self, g: int) -> _OpenShard:
        info, meta = self.shards[g]
        sh = _OpenShard(info, meta, verify=self.verify and g not in self._verified)
        self._verified.add(g)
        return sh

    def _source(self, spans: list[tuple[int, int, int]], skip: int) -> Iterator[tuple[tuple[int, int], Record]]:
        """Rows of the part in order, starting after `skip` rows (seeking, not reading them)."""
        for g, a, b in spans:
            if skip >= b - a:
                skip -= b - a
                continue
            a += skip
            skip = 0
            sh = self._open(g)
            try:
                for r, rec in enumerate(sh.rows(a, b), start=a):
                    yield (g, r), rec
            finally:
                sh.close()

    def _fetch(self, refs: list[tuple[int, int]]) -> list[Record]:
        """Random access to rows by (shard, row): to refill a shuffle buffer on resume."""
        out: dict[tuple[int, int], Record] = {}
        for g in sorted({g for g, _ in refs}):
            sh = self._open(g)
            try:
                for _, r in sorted(x for x in refs if x[0] == g):
                    out[(g, r)] = next(sh.rows(r, r + 1))
            finally:
                sh.close()
        return [out[tuple(r)] for r in refs]

    def __iter__(self) -> Iterator[Record]:
        st = self._state
        epoch = st["epoch"]
        spans = self.spans(epoch)
        src = self._source(spans, st["consumed"])
        consumed = st["consumed"]
        if not self.shuffle or self.shuffle_buffer <= 1:
            for ref, rec in src:
                consumed += 1
                self._state = {"epoch": epoch, "consumed": consumed, "buffer": [], "rng": None}
                yield rec
        else:
            part, _ = self._part()
            rng = np.random.Generator(np.random.PCG64())
            if st["rng"] is None:
                rng = np.random.default_rng([self.seed, epoch, part, 7])
            else:
                rng.bit_generator.state = st["rng"]
            refs = [tuple(r) for r in st["buffer"]]
            buf = list(zip(refs, self._fetch(refs)))
            B = self.shuffle_buffer

            def snapshot() -> None:
                self._state = {"epoch": epoch, "consumed": consumed, "buffer": [r for r, _ in buf],
                               "rng": rng.bit_generator.state}

            for item in src:
                consumed += 1
                if len(buf) < B:
                    buf.append(item)
                    continue
                j = int(rng.integers(B))
                out, buf[j] = buf[j], item
                snapshot()
                yield out[1]
            while buf:
                j = int(rng.integers(len(buf)))
                out = buf[j]
                buf[j] = buf[-1]
                buf.pop()
                snapshot()
                yield out[1]
        self._state = {"epoch": epoch + 1, "consumed": 0, "buffer": [], "rng": None}


def _locate(spans: list[tuple[int, int, int]], consumed: int) -> tuple[int | None, int]:
    """(shard index, row) of the next row to read after `consumed` rows of a part."""
    for g, a, b in spans:
        if consumed < b - a:
            return g, a + consumed
        consumed -= b - a
    return None, 0
