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
FINALIZE_LOCK = ".finalize.lock"  # flock held by a running finalize (empty file)
TASKS_DIR = "tasks"

# zstd level of the Arrow IPC buffer compression. The columns are laid out so that zstd's
# entropy coder does the work (not its match finder): level 9 is within ~1.5% of level 19 and
# ~15x faster to write (~100k target tokens/s at k=64 on one core vs ~7k), which matters when
# the writer keeps pace with a GPU teacher. Decompression speed does not depend on the level.
ZSTD_LEVEL = 9
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


def ids_hi_type(vocab_size: int) -> pa.DataType:
    """Bits 16+ of a token id: one bit (Arrow bool, bit-packed) when the vocabulary fits in 17 bits."""
    return pa.bool_() if vocab_size <= (1 << 17) else pa.uint8()


def shard_schema(codec_name: str, max_entries: int, vocab_size: int) -> pa.Schema:
    """The exact schema of a shard for a codec and vocabulary; readers refuse any other."""
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
            # Split so zstd's entropy coder sees separate streams with their own statistics
            # (~17 bits per id at a 128k vocabulary instead of ~22-25 for interleaved uint32);
            # ids_hi is a bit-packed bool when the vocabulary fits in 17 bits, else uint8.
            pa.field("ids_lo", pa.list_(pa.uint16()), nullable=False),
            pa.field("ids_hi", pa.list_(ids_hi_type(vocab_size)), nullable=False),
            # log-prob codes (codecs.codec_table: uniform in sqrt p, then in log p), delta-coded
            # down each position's list: the first entry holds its code, each next one
            # code[j] - code[j-1] >= 0; delta = logprob_q_hi << 8 | logprob_q_lo. Mostly small
            # integers: the low bytes cost a few bits each, the high bytes (mostly 0) almost none.
            pa.field("logprob_q_lo", pa.list_(pa.uint8()), nullable=False),
            pa.field("logprob_q_hi", pa.list_(pa.uint8()), nullable=False),
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
