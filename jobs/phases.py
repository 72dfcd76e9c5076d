"""The bridge from a job file's sections to each phase's own config dataclass.

The phases own their field lists (GenerateConfig, TrainConfig, EvalConfig); this module holds
only (a) the few friendly job-file names that differ from a phase's field name (ALIASES),
(b) the fields the job layer sets itself (paths, task sharding), and (c) the command line of
each phase. A section is validated by building the phase's dataclass with
kdpipe.pipeline.config.build_config, so a misspelt key gets the phase's did-you-mean and a bad
value the phase's own message, prefixed with the job file and section.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from kdpipe.jobs.render import TASK_ID
from kdpipe.jobs.spec import JobSpec, RunSpec, unknown_key_error
from kdpipe.pipeline.config import build_config, looks_like_path
from kdpipe.storage.errors import ConfigError, KdpipeError

PHASE_CLASSES = {
    "generate": ("kdpipe.pipeline.generate.config", "GenerateConfig", "phase one (generate-logits)"),
    "train": ("kdpipe.pipeline.train.config", "TrainConfig", "phase two (train-student)"),
    "evaluate": ("kdpipe.pipeline.evaluate.config", "EvalConfig", "evaluation (evaluate)"),
}

# job-file key -> phase field, per phase (only where the job file's name reads better).
ALIASES = {
    "generate": {"model": "teacher", "revision": "teacher_revision", "dataset": "data", "k": "top_k", "store": "out"},
    "train": {"model": "student"},
    "evaluate": {},
}

# Fields the job layer fills; a job file sets them through the job's own keys instead.
RESERVED = {
    "generate": {"out": "generation.store", "task_index": "the array task (set per task)", "num_tasks": "generation.num_tasks"},
    "train": {"stores": "generation.store", "out": "the run directory RUN_DIR/runs/<run name>"},
    "evaluate": {"out": "the run directory (RUN_DIR/runs/<run name>/eval)", "stores": "generation.store"},
}


def phase_class(phase: str) -> type:
    module, name, what = PHASE_CLASSES[phase]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what} is not available in this installation ({module}.{name}: {e})") from None


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def list_fields(cls: type) -> frozenset[str]:
    """Fields whose type is a list/tuple: in a student entry a plain list there is a value, not a sweep."""
    hints = typing.get_type_hints(cls)
    out = set()
    for name in field_names(cls):
        tp = hints[name]
        kinds = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if any(typing.get_origin(k) in (list, tuple) or k in (list, tuple) for k in kinds):
            out.add(name)
    return frozenset(out)


def _collect(
    phase: str,
    cls: type,
    sections: list[tuple[str, Mapping[str, Any]]],
    injected: Mapping[str, Any],
    job_keys: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge job sections into one phase mapping; unknown/duplicate/reserved keys are errors.

    `job_keys`: keys the job layer itself reads in these sections (listed among the allowed keys).
    -> (values, field -> the key as the user wrote it, e.g. "FILE [generation] k" for top_k).
    """
    fields = set(field_names(cls))
    aliases = dict(ALIASES[phase])
    # Old field names a phase still accepts (EvalConfig.RENAMED: document_field -> text_field).
    aliases.update({old: new for old, new in (getattr(cls, "RENAMED", None) or {}).items() if new in fields})
    reserved = RESERVED[phase]
    allowed = sorted(
        (fields - set(reserved) - set(aliases.values()))
        | {a for a, f in ALIASES[phase].items() if f not in reserved}
        | set(job_keys)
    )
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    written: dict[str, str] = {}
    for where, table in sections:
        for key, value in table.items():
            k = aliases.get(key, key.replace("-", "_"))
            if k in reserved:
                raise ConfigError(f"{where}.{key}: set by the job, not here (it comes from {reserved[k]}); remove it")
            if k not in fields:
                raise unknown_key_error(where, key, allowed)
            if key in (getattr(cls, "RENAMED", None) or {}):
                import warnings

                from kdpipe.pipeline.config import RenamedKeyWarning

                warnings.warn(f"{where}.{key} is the old name of '{k}'; it still works, but rename it to '{k}'",
                              RenamedKeyWarning, stacklevel=2)
            if k in values:
                raise ConfigError(f"{where}.{key}: already set in {origin[k]}; give it once")
            values[k] = value
            origin[k] = f"{where}.{key}"
            written[k] = f"{where} {key}"
    values.update(injected)
    return values, written


def _build(phase: str, cls: type, values: Mapping[str, Any], where: str, written: Mapping[str, str]) -> Any:
    try:
        return build_config(cls, values, where=where)
    except KdpipeError as e:
        msg = str(e)
        # An error about a field names it as the user wrote it ("FILE [generation] k", not "….top_k").
        for field, label in written.items():
            for prefix in (f"{where}.{field}:", f"{where}.{field}["):
                if msg.startswith(prefix):
                    raise ConfigError(label + msg[len(prefix) - 1:]) from None
        # A phase's __post_init__ names only its key; say which job file it came from.
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _path_or_hub_id(job: JobSpec, value: str) -> str:
    """A model/dataset value: a path relative to the job file when it exists there, else as given (hub id)."""
    p = job.resolve_path(value)
    return str(p) if p.exists() else value


def _model_path_or_hub_id(job: JobSpec, value: str, key: str) -> str:
    """_path_or_hub_id for a model, refusing a local path that does not exist (`key`: as the user wrote it)."""
    out = _path_or_hub_id(job, value)
    if out == value and looks_like_path(value) and not job.resolve_path(value).exists():
        raise ConfigError(f"{key}: no such directory: {job.resolve_path(value)} ({value!r}, relative to the job file); "
                          "point it at a model directory or give a hub id (ORG/NAME)")
    return out


# -- phase one -----------------------------------------------------------------------------------


def generate_config(job: JobSpec) -> Any:
    cls = phase_class("generate")
    w = str(job.path)
    teacher = {k: v for k, v in job.teacher.extra.items()}
    teacher["model"] = _model_path_or_hub_id(job, job.teacher.model, f"{w} [teacher] model")
    teacher["tensor_parallel_size"] = job.teacher.tensor_parallel_size
    data = dict(job.data)
    for key in ("dataset", "data"):
        if isinstance(data.get(key), str):
            data[key] = _path_or_hub_id(job, data[key])
    values, written = _collect(
        "generate",
        cls,
        [(f"{w} [teacher]", teacher), (f"{w} [data]", data), (f"{w} [generation]", dict(job.generation.extra))],
        {"out": str(job.generation.store), "num_tasks": job.generation.num_tasks},
    )
    return _build("generate", cls, values, f"{w} [teacher]/[data]/[generation]", written)


def expected_cache_key(gen_cfg: Any) -> tuple[str | None, str]:
    """(the store cache key this generation config would write, or None; why it is None).

    Computing it needs the teacher's tokenizer and config and the dataset (to fingerprint them),
    not the engine: on a login node with the hub cache this works; elsewhere the generate tasks
    still refuse a store written with another key.
    """
    try:
        from kdpipe.pipeline.generate.run import expected_cache_key as run_cache_key

        return run_cache_key(gen_cfg), ""
    except (KdpipeError, ImportError, OSError, ValueError, AttributeError, TypeError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def comparable_meta(gen_cfg: Any) -> dict[str, Any]:
    """StoreMeta fields a job can check without the tokenizer or data (when the key is not computable)."""
    teacher = gen_cfg.teacher
    if Path(teacher).is_dir():
        teacher = str(Path(teacher).resolve())
    return {
        "teacher": teacher,
        "teacher_revision": gen_cfg.teacher_revision,
        "recipe": gen_cfg.recipe,
        "codec.name": gen_cfg.codec,
        "codec.top_k": gen_cfg.top_k,
        "codec.top_p": gen_cfg.top_p,
        "codec.draws": gen_cfg.draws,
        "codec.seed": gen_cfg.seed,
    }


def generate_argv(python: str, config: Path) -> list[str]:
    # The task index is passed explicitly: a resubmitted array holds only the missing tasks
    # (e.g. --array=1,3), so it cannot be derived from the array's bounds.
    return [python, "-m", "kdpipe.pipeline.cli", "generate-logits", "--config", str(config), "--task-index", TASK_ID]


def finalize_argv(python: str, store: Path, num_tasks: int) -> list[str]:
    return [python, "-m", "kdpipe.pipeline.cli", "finalize", str(store), "--num-tasks", str(num_tasks)]


# -- phase two -----------------------------------------------------------------------------------


def train_list_fields() -> frozenset[str]:
    return list_fields(phase_class("train"))


def train_config(job: JobSpec, run: RunSpec, out_dir: Path) -> Any:
    cls = phase_class("train")
    w = f"{job.path} [[students]] #{run.student + 1}"
    values = dict(run.values)
    if "resume" in field_names(cls):
        # A rerun of the chain continues an interrupted run from its newest checkpoint (and
        # starts fresh when there is none); a changed config is refused by phase two.
        values.setdefault("resume", True)
    if isinstance(values.get("model"), str):
        values["model"] = _model_path_or_hub_id(job, values["model"], f"{w} model")
    if isinstance(values.get("val_stores"), (str, list, tuple)):  # validation stores: relative to the job file
        vs = values["val_stores"]
        values["val_stores"] = tuple(str(job.resolve_path(str(v))) for v in ([vs] if isinstance(vs, str) else vs))
    # Keys written inside `optimizer = { ... }` are checked as that table's, so an error names it.
    opt_keys = set(job.students[run.student].optimizer_keys) if run.student < len(job.students) else set()
    entry = {k: v for k, v in values.items() if k not in opt_keys}
    opt = {k: v for k, v in values.items() if k in opt_keys}
    sections = [(w, entry)] + ([(f"{w}.optimizer", opt)] if opt else [])
    from kdpipe.jobs.spec import StudentSpec

    values, written = _collect("train", cls, sections, train_injected(cls, job, out_dir), job_keys=StudentSpec.ENTRY_KEYS)
    return _build("train", cls, values, w, written)


def train_injected(cls: type, job: JobSpec, out_dir: Path) -> dict[str, Any]:
    return {"stores": (str(job.generation.store),), "out": str(out_dir)}


def train_argv(python: str, config: Path) -> list[str]:
    return [python, "-m", "kdpipe.pipeline.cli", "train-student", "--config", str(config)]


# -- evaluation ----------------------------------------------------------------------------------


def eval_config(job: JobSpec, run: RunSpec, run_dir: Path) -> Any:
    """The teacher and this run (its folder: the evaluator reads RUN/final and RUN/metrics.jsonl),
    then any extra `models` the [evaluation] section lists (e.g. a CE-only baseline)."""
    cls = phase_class("evaluate")
    w = f"{job.path} [evaluation]"
    section = dict(job.evaluation or {})
    section.pop("runs", None)  # the job layer's selector of evaluated runs (plan.py)
    extra = section.pop("models", [])
    if isinstance(extra, str) or not isinstance(extra, list):
        raise ConfigError(f"{w}.models: expected a list of extra models to compare (the teacher and the run are added), got {extra!r}")
    if isinstance(section.get("data"), str):
        section["data"] = str(job.resolve_path(section["data"]))
    # One name for the document field: evaluation reads it as [data] names it, unless it says otherwise.
    if not {"text_field", "document_field"} & set(section) and isinstance(job.data.get("text_field"), str):
        section["text_field"] = job.data["text_field"]
    # Every run's evaluation compares it with the same teacher on the same prompts: the teacher generates once.
    section.setdefault("teacher_cache", str(job.run_dir / "eval-cache"))
    models = (_path_or_hub_id(job, job.teacher.model), str(run_dir), *(_path_or_hub_id(job, str(m)) for m in extra))
    injected = {"models": models, "out": str(run_dir / "eval"), "stores": (str(job.generation.store),)}
    values, written = _collect("evaluate", cls, [(w, section)], injected)
    return _build("evaluate", cls, values, w, written)


def eval_argv(python: str, config: Path) -> list[str]:
    return [python, "-m", "kdpipe.pipeline.cli", "evaluate", "--config", str(config)]


__all__ = [
    "generate_config", "expected_cache_key", "generate_argv", "finalize_argv",
    "train_config", "train_argv", "train_list_fields", "eval_config", "eval_argv", "phase_class",
]
