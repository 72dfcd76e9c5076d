"""Export of a finalized store to Parquet and axolotl's KD layout (`kdpipe export STORE OUT`); the formats,
the meta in the schema metadata and the import back are described in storage/interop.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.storage.errors import StoreError
from kdpipe.storage.interop import AXOLOTL_VERSION, EXPORT_FORMATS, META_KEY

# ----------------------------------------------------------------------------------------------
# export


def _out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out}: output folder exists and is not empty; choose a new OUT or delete it")
    out.mkdir(parents=True, exist_ok=True)


def _parquet_rows(rec) -> dict[str, Any]:
    ids, lps = rec.ids, rec.logprobs  # [P, K] padded with -1 / -inf
    valid = ids >= 0
    return {
        "sample_id": rec.sample_id, "text": rec.text,
        "input_ids": rec.input_ids.astype(np.int32).tolist(),
        "target_positions": rec.target_positions.astype(np.int32).tolist(),
        "target_token_ids": [row[v].tolist() for row, v in zip(ids, valid)],
        "target_logprobs": [row[v].astype(np.float32).tolist() for row, v in zip(lps, valid)],
        "tail_mass": rec.tail.astype(np.float32).tolist(),
    }


def _axolotl_rows(rec) -> dict[str, Any]:
    L = int(rec.input_ids.shape[0])
    ids, lps = rec.ids, rec.logprobs  # [P, K]
    K = max(1, int(ids.shape[1]) if ids.size else 1)
    t_ids = np.tile(np.arange(K, dtype=np.int32), (L, 1))  # [L, K] axolotl's padding: ids 0..K-1
    t_lp = np.full((L, K), -np.inf, dtype=np.float32)  # [L, K]
    t_mask = np.zeros((L, K), dtype=np.int32)  # [L, K]
    rows = rec.target_positions.astype(np.int64) - 1  # position p -> row p-1 (next-token rows)
    valid = ids >= 0
    t_ids[rows, :ids.shape[1]] = np.where(valid, ids, np.arange(ids.shape[1])[None, :])
    t_lp[rows, :ids.shape[1]] = np.where(valid, lps, -np.inf)
    t_mask[rows, :ids.shape[1]] = valid
    labels = np.full(L, -100, dtype=np.int64)
    labels[rec.target_positions] = rec.input_ids[rec.target_positions]
    return {
        "sample_id": rec.sample_id, "text": rec.text,
        "input_ids": rec.input_ids.astype(np.int32).tolist(),
        "attention_mask": [1] * L,
        "labels": labels.tolist(),
        "target_token_ids": t_ids.tolist(),
        "target_logprobs": t_lp.tolist(),
        "target_mask": t_mask.tolist(),
    }


def _schema(fmt: str):
    import pyarrow as pa

    i32, f32 = pa.int32(), pa.float32()
    if fmt == "parquet":
        return pa.schema([
            ("sample_id", pa.string()), ("text", pa.string()), ("input_ids", pa.list_(i32)),
            ("target_positions", pa.list_(i32)), ("target_token_ids", pa.list_(pa.list_(i32))),
            ("target_logprobs", pa.list_(pa.list_(f32))), ("tail_mass", pa.list_(f32)),
        ])
    return pa.schema([
        ("sample_id", pa.string()), ("text", pa.string()), ("input_ids", pa.list_(i32)), ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int64())), ("target_token_ids", pa.list_(pa.list_(i32))),
        ("target_logprobs", pa.list_(pa.list_(f32))), ("target_mask", pa.list_(pa.list_(pa.int8()))),
    ])


def export_store(store: str | os.PathLike, out: str | os.PathLike, fmt: str, rows_per_file: int = 10_000) -> dict[str, Any]:
    """Write a finalized store as Parquet (`parquet` or `axolotl` columns, see module doc)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdpipe.storage.manifest import open_store
    from kdpipe.storage.reader import StoreReader

    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"--format {fmt!r}: export writes one of {', '.join(EXPORT_FORMATS)}")
    store, out = Path(store), Path(out)
    try:
        m = open_store(store)  # refuses an unfinalized store, naming its manifest
    except StoreError as e:
        raise StoreError(f"export: {e}") from None
    _out_dir(out)
    side = {"format": fmt, "axolotl_version": AXOLOTL_VERSION if fmt == "axolotl" else None,
            "source_store": str(store), "cache_key": m.cache_key, "meta": m.meta.to_dict()}
    schema = _schema(fmt).with_metadata({META_KEY: json.dumps(side).encode()})
    to_row = _parquet_rows if fmt == "parquet" else _axolotl_rows
    files, rows, buf = [], 0, []

    def flush() -> None:
        if not buf:
            return
        name = f"data-{len(files):05d}.parquet"
        tmp = out / (name + ".tmp")
        pq.write_table(pa.Table.from_pylist(buf, schema=schema), tmp, compression="zstd")
        os.replace(tmp, out / name)
        files.append(name)
        buf.clear()

    for rec in StoreReader(str(store), shuffle=False, verify=True):
        buf.append(to_row(rec))
        rows += 1
        if len(buf) >= rows_per_file:
            flush()
    flush()
    return {**side, "files": files, "rows": rows}
