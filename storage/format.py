"""The on-disk format of a store: one constant for its version, the Arrow schema of a shard, names.

A store is a directory:

    meta.json                    StoreMeta + cache key, written once by the first writer
    tasks/task-00003.json        per-task manifest (shards finished so far, complete flag)
    tasks/task-00003.lock        exclusive lock held while task 3 writes
    shard-t00003-s000012.arrow   Arrow IPC *file* (random access), zstd-compressed buffers
    manifest.json                written by finalize_store: the contract readers trust

One row per sequence. Columns are plain Arrow lists so pyarrow/polars/duckdb read them directly;
see docs/store-format.md for the meaning of every column and how to decode it with numpy.
"""

from __future__ import annotations

import re

import pyarrow as pa

# The one version constant: bump it whenever a column, its meaning, or the manifest changes.
FORMAT_VERSION = 1

SHARD_SUFFIX = ".arrow"
SHARD_RE = re.compile(r"^shard-t(\d{5})-s(\d{6})\.arrow$")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
TASKS_DIR = "tasks"

# zstd level of the Arrow IPC buffer compression; 19 costs more at write time (phase one is
# dominated by the teacher anyway) and decompresses as fast as low levels.
ZSTD_LEVEL = 19
# Rows are grouped into record batches of about this many uncompressed bytes: large enough for
# zstd to learn the columns' statistics, small enough that one random access stays cheap.
BATCH_BYTES = 4 << 20

# Schema metadata keys (also let a shard be recognized without its manifest).
MD_FORMAT = b"kdpipe.format_version"
MD_CODEC = b"kdpipe.codec"


def shard_name(task_index: int, seq: int) -> str:
    return f"shard-t{task_index:05d}-s{seq:06d}{SHARD_SUFFIX}"


def task_manifest_name(task_index: int) -> str:
    return f"task-{task_index:05d}.json"


def count_type(max_entries: int) -> pa.DataType:
    """Per-position entry counts: one byte when they fit (zstd then sees one symbol per position)."""
    return pa.uint8() if max_entries <= 255 else pa.uint16()


def shard_schema(codec_name: str, max_entries: int) -> pa.Schema:
    """The exact schema of a shard for a codec; readers refuse any other (see reader/inspect)."""
    common = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("target_positions", pa.list_(pa.int32()), nullable=False),
        # [P] entries kept per target position; the entry columns below are flat per row
        # (position-major), so position j owns entries [sum(n[:j]), sum(n[:j+1])).
        pa.field("num_entries", pa.list_(count_type(max_entries)), nullable=False),
    ]
    if codec_name == "topk":
        specific = [
            # token id = ids_hi << 16 | ids_lo, each position's entries sorted by log-prob desc.
            # Split so zstd's entropy coder sees two byte streams with their own statistics
            # (~17 bits per id at a 128k vocabulary instead of ~22 for interleaved uint32).
            pa.field("ids_lo", pa.list_(pa.uint16()), nullable=False),
            pa.field("ids_hi", pa.list_(pa.uint8()), nullable=False),
            # log-prob codes (codecs.codec_table: uniform in sqrt p, then in log p), delta-coded
            # down each position's list: the first entry holds its code, each next one
            # code[j] - code[j-1] >= 0 (small integers: a few bits each after zstd).
            pa.field("logprob_q", pa.list_(pa.uint16()), nullable=False),
            # [P] exact 1 - sum(p kept), float32.
            pa.field("tail", pa.list_(pa.float32()), nullable=False),
        ]
    elif codec_name == "sampled":
        specific = [
            # unique drawn ids ascending within a position, delta-coded: the first entry holds
            # its id, each next id[j] - id[j-1] > 0; value = id_delta_hi << 16 | id_delta_lo.
            # (Sorted ids cost ~2 bits less each than unsorted ones.)
            pa.field("id_delta_lo", pa.list_(pa.uint16()), nullable=False),
            pa.field("id_delta_hi", pa.list_(pa.uint8()), nullable=False),
            # draws that landed on each kept id.
            pa.field("counts", pa.list_(pa.uint8()), nullable=False),
            # [P] draws that landed in the teacher's tail bucket (outside its top-K).
            pa.field("tail_count", pa.list_(pa.uint8()), nullable=False),
        ]
    else:  # CodecConfig validates the name; this is a programming error.
        raise ValueError(f"unknown codec {codec_name!r}")
    return pa.schema(common + specific)
