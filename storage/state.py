"""What a store folder holds on disk, read without opening a shard: whether it is finalized, how many
shard files it has, and each task's manifest. `kdpipe check` (jobs/steps.py: store reuse) and `kdpipe
status` (jobs/status.py: progress) both read it here; the task manifests' names come from format.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.storage.format import MANIFEST_FILE, SHARD_RE, TASKS_DIR, task_manifest_name


@dataclass(frozen=True)
class StoreFiles:
    path: Path
    finalized: bool  # manifest.json exists
    shards: int  # shard files in the folder (0 when it is not a folder)
    # task index (< num_tasks) whose manifest exists -> the manifest (a JSON value), or the OSError /
    # ValueError reading it raised (each caller decides what an unreadable manifest means)
    tasks: dict[int, Any]

    def task_manifest(self, task_index: int) -> Path:
        return self.path / TASKS_DIR / task_manifest_name(task_index)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return e


def store_files(path: str | os.PathLike, num_tasks: int) -> StoreFiles:
    path = Path(path)
    tasks: dict[int, Any] = {}
    shards = 0
    if path.is_dir():
        shards = sum(1 for p in path.iterdir() if SHARD_RE.match(p.name))
        for i in range(num_tasks):
            tm = path / TASKS_DIR / task_manifest_name(i)
            if tm.exists():
                tasks[i] = _read(tm)
    return StoreFiles(path, (path / MANIFEST_FILE).exists(), shards, tasks)
