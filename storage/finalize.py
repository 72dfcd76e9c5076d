"""finalize_store: merge the per-task manifests into manifest.json once every task is complete."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdpipe.storage.errors import StoreError
from kdpipe.storage.format import FINALIZE_LOCK, FORMAT_VERSION, MANIFEST_FILE, META_FILE, SHARD_RE, TASKS_DIR, task_manifest_name
from kdpipe.storage.manifest import (
    StoreMeta, TaskManifest, atomic_write_json, cache_key, check_format_version, kdpipe_version, load_task_manifest,
    read_json, remove_orphan_tmps,
)
from kdpipe.storage.tokenizer_files import tokenizer_record


def finalize_store(store_dir: str | os.PathLike, num_tasks: int | None = None) -> dict[str, Any]:
    """Check every task manifest (present, complete, same store) and write manifest.json atomically.

    num_tasks: tasks expected; None takes the number the tasks recorded. Nothing is written
    unless every check passes. Returns the manifest dict.
    """
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise StoreError(f"{store_dir}: store directory not found")
    with _finalize_lock(store_dir):
        # we are the only finalize: a manifest.json.<pid>.tmp here is a killed finalize's leftover
        remove_orphan_tmps(store_dir / MANIFEST_FILE)
        return _finalize(store_dir, num_tasks)


@contextmanager
def _finalize_lock(store_dir: Path):
    """Exclusive, non-blocking flock on STORE/.finalize.lock: a second finalize refuses, not races.

    flock dies with its holder, so a killed finalize never blocks the rerun.
    """
    lock_path = store_dir / FINALIZE_LOCK
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"{lock_path}: cannot create the finalize lock ({e.strerror or e}); check permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{store_dir}: another `kdpipe finalize` is running on this store (lock {lock_path}); "
                             "wait for it to finish (its manifest is the same), or rerun finalize afterwards") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _finalize(store_dir: Path, num_tasks: int | None) -> dict[str, Any]:
    meta_path = store_dir / META_FILE
    if not meta_path.exists():
        raise StoreError(f"{meta_path}: not found; no writer has started in {store_dir} (is it a kdpipe store?)")
    meta_raw = read_json(meta_path, "store metadata")
    check_format_version(meta_raw, meta_path)
    meta = StoreMeta.from_dict(meta_raw.get("meta"), where=str(meta_path))
    key = cache_key(meta)
    if meta_raw.get("cache_key") != key:
        raise StoreError(f"{meta_path}: cache_key does not match the recorded metadata; the file was edited or corrupted")

    tasks_dir = store_dir / TASKS_DIR
    found = sorted(tasks_dir.glob("task-*.json")) if tasks_dir.is_dir() else []
    manifests: dict[int, tuple[Path, TaskManifest]] = {}
    for p in found:
        tm = load_task_manifest(p, store_dir, key)
        manifests[tm.task_index] = (p, tm)
    recorded = sorted({tm.num_tasks for _, tm in manifests.values()})
    if num_tasks is None:
        if len(recorded) != 1:
            raise StoreError(f"{tasks_dir}: tasks disagree on num_tasks ({recorded}) or none ran; pass --num-tasks")
        num_tasks = recorded[0]
    elif recorded and recorded != [num_tasks]:
        raise StoreError(f"{tasks_dir}: tasks were started with num_tasks={recorded}, not {num_tasks}")
    missing = [i for i in range(num_tasks) if i not in manifests]
    if missing:
        raise StoreError(f"{store_dir}: task(s) {', '.join(map(str, missing))} of {num_tasks} never wrote a manifest "
                         f"({tasks_dir / task_manifest_name(missing[0])} missing); run them, then finalize again")
    extra = sorted(set(manifests) - set(range(num_tasks)))
    if extra:
        raise StoreError(f"{store_dir}: task manifest(s) for task(s) {extra} beyond num_tasks={num_tasks}")
    incomplete = [i for i in range(num_tasks) if not manifests[i][1].complete]
    if incomplete:
        raise StoreError(f"{store_dir}: task(s) {', '.join(map(str, incomplete))} did not complete "
                         f"({manifests[incomplete[0]][0]} has complete=false); rerun them (they resume), then finalize again")

    shards: list[dict[str, Any]] = []
    owner: dict[str, int] = {}
    for i in range(num_tasks):
        p, tm = manifests[i]
        for info in tm.shards:
            if info.file in owner:
                raise StoreError(f"{p}: shard {info.file} is also claimed by task {owner[info.file]}; "
                                 "two tasks wrote the same shard name — the store is inconsistent, regenerate the affected tasks")
            owner[info.file] = i
            if not info.path.exists():
                raise StoreError(f"{info.path}: shard listed by {p} is missing; rerun task {i}")
            size = info.path.stat().st_size
            if size != info.bytes:
                raise StoreError(f"{info.path}: shard is {size} bytes, {p} says {info.bytes} (truncated or replaced); rerun task {i}")
            shards.append(info.to_dict())
    unlisted = sorted(f.name for f in store_dir.glob("shard-*.arrow") if SHARD_RE.fullmatch(f.name) and f.name not in owner)
    if unlisted:
        raise StoreError(f"{store_dir}: shard file(s) {', '.join(unlisted[:3])} are not listed by their task's manifest; "
                         "rerun that task (it adopts finished shards), then finalize again")
    n_seq = sum(s["rows"] for s in shards)
    if n_seq == 0:
        raise StoreError(f"{store_dir}: the store is empty (no task wrote a sequence); check the dataset and rerun phase one")
    manifest = {
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "meta": meta.to_dict(),
        "num_tasks": num_tasks,
        "kdpipe_version": kdpipe_version(),
        "num_sequences": n_seq,
        "num_target_tokens": sum(s["target_tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    tok = tokenizer_record(store_dir)  # optional, additive (see tokenizer_files.py for the version rule)
    if tok is not None:
        manifest["teacher_tokenizer"] = tok
    atomic_write_json(store_dir / MANIFEST_FILE, manifest)
    return manifest
