"""The teacher's tokenizer files inside a store: STORE/teacher_tokenizer/.

Phase one saves the teacher tokenizer there (`save_pretrained` files) so that phase two can
decode and re-align the stored token ids without a hub: cross-tokenizer distillation needs the
teacher's byte string of every token, and the sequence-level fallback needs its decoder.

Version rule: the folder is optional and additive. It does not change any column or the cache
key (the tokenizer is already fixed by `meta.tokenizer_fingerprint`), so FORMAT_VERSION stays 1;
stores written before it simply lack the folder, and readers that predate it ignore it.
`finalize` records the files' checksums under the manifest key `teacher_tokenizer`
(`{"dir": "teacher_tokenizer", "files": {name: "xxh3_128:…"}}`) and `inspect --verify` re-checks
them. Consumers load the files and compare the tokenizer's fingerprint with the stored one
before using it (`pipeline/train/student.py`), so files that do not belong to the store are
refused even without a manifest record.

The folder is written once, atomically (a pid-named temp folder renamed into place): the first
writer wins, later writers of the same store (other array tasks, reruns) leave it alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kdpipe.storage.errors import StoreError
from kdpipe.storage.manifest import checksum_matches, file_checksum, fsync_dir

TEACHER_TOKENIZER_DIR = "teacher_tokenizer"


def teacher_tokenizer_dir(store_dir: str | os.PathLike) -> Path | None:
    """STORE/teacher_tokenizer if the store carries it, else None."""
    p = Path(store_dir) / TEACHER_TOKENIZER_DIR
    return p if p.is_dir() else None


def save_teacher_tokenizer(store_dir: str | os.PathLike, tokenizer) -> Path:
    """Write the tokenizer's files into STORE/teacher_tokenizer once (atomic; first writer wins)."""
    store_dir = Path(store_dir)
    final = store_dir / TEACHER_TOKENIZER_DIR
    if final.is_dir():
        return final
    store_dir.mkdir(parents=True, exist_ok=True)
    tmp = store_dir / f".{TEACHER_TOKENIZER_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)  # fails if another writer got there first: theirs is the same tokenizer
        except OSError:
            if not final.is_dir():
                raise
        fsync_dir(store_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tokenizer_record(store_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest entry for the folder (file name -> checksum), or None when the store has none."""
    d = teacher_tokenizer_dir(store_dir)
    if d is None:
        return None
    return {"dir": TEACHER_TOKENIZER_DIR, "files": {f.name: file_checksum(f) for f in sorted(d.iterdir()) if f.is_file()}}


def verify_tokenizer_files(store_dir: str | os.PathLike, record: Any) -> list[str]:
    """Problems of STORE/teacher_tokenizer against its manifest record (empty list = fine)."""
    if record is None:
        return []
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return [f"manifest key 'teacher_tokenizer' is malformed ({str(record)[:80]!r})"]
    d = Path(store_dir) / TEACHER_TOKENIZER_DIR
    problems = []
    for name, checksum in sorted(record["files"].items()):
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(checksum, str):
            problems.append(f"{TEACHER_TOKENIZER_DIR}: bad file entry {str(name)[:60]!r}")
            continue
        p = d / name
        if not p.is_file():
            problems.append(f"{TEACHER_TOKENIZER_DIR}/{name} is missing")
            continue
        ok, got = checksum_matches(p, checksum)
        if not ok:
            problems.append(f"{TEACHER_TOKENIZER_DIR}/{name}: checksum mismatch ({got} != manifest {checksum})")
    return problems


def check_tokenizer_folder(path: str | os.PathLike) -> Path:
    """A --teacher-tokenizer path: a directory with tokenizer files, or StoreError naming it."""
    p = Path(path)
    if not p.is_dir() or not any((p / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise StoreError(f"{p}: not a tokenizer folder (no tokenizer.json / tokenizer_config.json); pass the folder "
                         "that `save_pretrained` wrote for the teacher's tokenizer")
    return p
