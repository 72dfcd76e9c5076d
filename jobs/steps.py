"""What a job plan is made of, shared by the plan, the on-policy rounds, the local runner and the
Slurm submitter: a Step, the state of the job's store on disk, and the small rules both chains use
(whether a saved resolved config is the same, the GPUs an evaluation takes, Slurm's --array ranges)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from kdpipe.jobs.spec import JobSpec, RunSpec
from kdpipe.storage.errors import ConfigError, StoreError


@dataclasses.dataclass(frozen=True)
class StoreState:
    path: Path
    status: str  # "new" | "partial" | "finalized"
    cache_key: str | None  # the key of what is on disk (None: nothing yet)
    expected_key: str | None  # the key this job's generation settings give (None: not computable here)
    key_note: str = ""  # why expected_key is None
    done_tasks: tuple[int, ...] = ()
    num_sequences: int | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str  # generate | finalize | train | evaluate
    name: str  # unique in the plan; names the script, the log and the Slurm job
    argv: tuple[str, ...]  # the kdpipe command (render.TASK_ID marks the array task index)
    after: tuple[str, ...] = ()  # steps that must succeed first
    tasks: tuple[int, ...] | None = None  # array task indices (generate only)
    nodes: int = 1
    gpus: int = 0  # GPUs per node
    procs: int = 1  # processes per node (train: torchrun workers)
    config: Path | None = None  # the rendered phase config this step reads
    config_text: str | None = None
    run: RunSpec | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable ({e}); remove the store directory or fix the file") from None


def check_store(path: Path, num_tasks: int, expected_key: str | None, comparable: dict[str, Any] | None = None,
                key_note: str = "") -> StoreState:
    """What is on disk at `path`, compared with the key this job would write.

    When the key cannot be computed here, the fields in `comparable` (teacher, recipe, codec)
    are compared with the store's metadata instead, so a store of another teacher is never reused.
    """
    from kdpipe.storage.format import MANIFEST_FILE, META_FILE, TASKS_DIR
    from kdpipe.storage.state import store_files

    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return StoreState(path, "new", None, expected_key, key_note)
    if not path.is_dir():
        raise ConfigError(f"generation.store = {path} exists and is not a directory; choose another store path")
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise ConfigError(
            f"generation.store = {path} is a non-empty directory without {META_FILE}, so it is not a kdpipe store; "
            "point generation.store at a new or empty directory"
        )
    doc = _read_json(meta_file)
    key = doc.get("cache_key")
    meta = doc.get("meta", {})
    fix = "Point generation.store at a new directory, or delete the old store if it is no longer needed"
    if expected_key is not None and key != expected_key:
        raise ConfigError(
            f"generation.store = {path} holds a store with cache key {str(key)[:16]}… (teacher {meta.get('teacher')!r}, "
            f"recipe {meta.get('recipe')!r}, codec {meta.get('codec')}), but this job's teacher/data/recipe/codec settings "
            f"give cache key {expected_key[:16]}…, so it contains other targets. {fix}"
        )
    if expected_key is None and comparable:
        diff = []
        for k, want in comparable.items():
            have = meta
            for part in k.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if have != want:
                diff.append(f"{k}: store {have!r} != job {want!r}")
        if diff:
            raise ConfigError(f"generation.store = {path} was written with other settings ({'; '.join(diff)}), so its cache key differs. {fix}")
    if (path / MANIFEST_FILE).exists():
        from kdpipe.storage import open_store

        manifest = open_store(path)
        return StoreState(path, "finalized", key, expected_key, key_note, tuple(range(num_tasks)), manifest.num_sequences)
    done = []
    files = store_files(path, num_tasks)
    for i, doc in files.tasks.items():
        if isinstance(doc, (OSError, ValueError)):
            raise StoreError(f"{files.task_manifest(i)}: unreadable ({doc}); remove the store directory or fix the file")
        if doc.get("complete"):
            done.append(i)
    extra = [
        p.name for p in sorted((path / TASKS_DIR).glob("task-*.json"))
        if int(p.stem.split("-")[1]) >= num_tasks
    ] if (path / TASKS_DIR).is_dir() else []
    if extra:
        raise ConfigError(
            f"generation.store = {path} has manifests of tasks beyond num_tasks = {num_tasks} ({', '.join(extra[:3])}); "
            "the store was started with more array tasks: set generation.num_tasks back to that number"
        )
    return StoreState(path, "partial", key, expected_key, key_note, tuple(done))


def same_config(saved: Path, text: str, ignore: set[str] = frozenset(), resolved_at_run: dict[str, Any] | None = None) -> bool:
    """Whether the resolved config a phase saved equals the one this plan would hand it.

    `resolved_at_run`: keys the phase resolves itself on the machine that runs it, with their "auto" value; where the
    plan hands the auto value, whatever the run resolved it to is the same config."""
    if not saved.is_file():
        return False
    try:
        a = tomllib.loads(saved.read_text(encoding="utf-8"))
        b = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    skip = set(ignore) | {k for k, auto in (resolved_at_run or {}).items() if b.get(k) == auto}
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def eval_gpus(job: JobSpec, eval_cfg: Any) -> int:
    """The evaluation runs every model (the teacher too) with its tensor_parallel_size on one node."""
    tp = int(getattr(eval_cfg, "tensor_parallel_size", 1) or 1)
    if not job.slurm.gpus_per_node:
        return 0
    if tp > job.slurm.gpus_per_node:
        raise ConfigError(
            f"{job.path} [evaluation].tensor_parallel_size = {tp} is larger than slurm.gpus_per_node = "
            f"{job.slurm.gpus_per_node}; lower it to at most {job.slurm.gpus_per_node}"
        )
    return tp


def ranges(ids: tuple[int, ...]) -> str:
    """0,1,2,5,7,8 -> '0-2,5,7-8' (Slurm's --array syntax)."""
    out, start, prev = [], None, None
    for i in sorted(ids):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(out)
