"""storage.state.store_files: the one reader of a store folder's task manifests (kdpipe check, kdpipe status)."""

from __future__ import annotations

import json

from kdpipe.storage.format import TASKS_DIR, shard_name, task_manifest_name
from kdpipe.storage.state import store_files


def test_store_files_reads_each_task_manifest_and_counts_shards(tmp_path):
    store = tmp_path / "store"
    (store / TASKS_DIR).mkdir(parents=True)
    (store / TASKS_DIR / task_manifest_name(0)).write_text(json.dumps({"complete": True}))
    (store / TASKS_DIR / task_manifest_name(1)).write_text("{torn")
    (store / TASKS_DIR / task_manifest_name(5)).write_text(json.dumps({"complete": True}))  # beyond num_tasks
    (store / shard_name(0, 0)).write_bytes(b"")
    (store / "notes.txt").write_text("not a shard")

    files = store_files(store, num_tasks=3)
    assert not files.finalized and files.shards == 1
    assert sorted(files.tasks) == [0, 1]  # task 2 has no manifest; task 5 is past num_tasks
    assert files.tasks[0] == {"complete": True}
    assert isinstance(files.tasks[1], ValueError)  # the caller decides: check refuses, status counts it started
    assert files.task_manifest(1) == store / TASKS_DIR / "task-00001.json"


def test_store_files_of_a_missing_folder_is_empty(tmp_path):
    files = store_files(tmp_path / "nothing", num_tasks=4)
    assert (files.finalized, files.shards, files.tasks) == (False, 0, {})
