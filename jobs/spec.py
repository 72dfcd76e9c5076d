"""The job file: one TOML that describes a whole distillation chain.

    name = "llama70b-to-8b"            # names the jobs and the default run dir
    run_dir = "runs/llama70b-to-8b"    # scripts, rendered configs, logs, submission.json

    [teacher]      model, tensor_parallel_size, engine options (dtype, max_model_len, ...)
    [data]         the dataset phase one reads (passed to phase one's config)
    [generation]   recipe, codec, k, draws, num_tasks (= array size), store (+ phase-one keys)
    [[students]]   model, alpha, temperature, divergence, tail_mode, optimizer, steps, nodes,
                   gpus (+ phase-two keys, e.g. validation: val_stores (paths relative to the job
                   file), val_fraction, eval_every, save_best); a list value is a sweep: one run
                   per combination
    [evaluation]   optional; one evaluation per student run (evaluation config keys), or only
                   for the runs listed in `runs` (run or student names)
    [slurm]        partition, account, qos, time.<phase>, gpus_per_node, cpus_per_task, mem,
                   extra_sbatch, setup, python

This module owns only what the job layer itself needs (paths, array size, node and GPU counts,
Slurm resources, sweeps). Everything else in a section is handed, untouched, to the phase's own
config dataclass (see jobs/phases.py), so the phases keep the only list of their fields.
Relative paths resolve against the job file's directory, so a job means the same thing from
any working directory and on any compute node.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from pathlib import Path
from typing import Any, Mapping

from kdpipe.pipeline.config import read_toml
from kdpipe.pipeline.config import suggest as config_suggest
from kdpipe.storage.errors import ConfigError

# Names become Slurm job names, file names and TOML keys: keep them to a safe alphabet.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Slurm --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
MEM_RE = re.compile(r"^\d+[KMGT]?$")
# partition / account / qos values end up on #SBATCH lines, which sbatch parses itself.
SLURM_WORD_RE = re.compile(r"^[A-Za-z0-9_.,+-]+$")

PHASE_NAMES = ("generate", "finalize", "train", "evaluate")
TOP_KEYS = ("name", "run_dir", "teacher", "data", "generation", "students", "evaluation", "slurm", "on_policy")


# Common names from other trainers for a phase-two key (difflib cannot see `learning_rate` -> `lr`).
SYNONYMS = {
    "learning_rate": "lr", "learningrate": "lr", "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps",
    "lr_warmup_steps": "warmup_steps", "beta1": "adam_beta1", "beta2": "adam_beta2", "clip_grad_norm": "max_grad_norm",
    "grad_clip": "max_grad_norm", "gradient_clipping": "max_grad_norm", "decay": "weight_decay", "wd": "weight_decay",
    "scheduler": "schedule", "lr_scheduler": "schedule", "lr_schedule": "schedule", "min_lr": "min_lr_ratio",
    "max_steps": "steps", "num_steps": "steps", "batch_tokens": "tokens_per_batch", "type": "name",
}


def suggest(key: str, allowed) -> str:
    return config_suggest(key, allowed, SYNONYMS)


def unknown_key_error(where: str, key: str, allowed) -> ConfigError:
    allowed = sorted(allowed)
    return ConfigError(f"{where}: unknown key '{key}'{suggest(key, allowed)}; allowed keys: {', '.join(allowed)}")


def _take(table: Mapping[str, Any], key: str, kind, where: str, default: Any = dataclasses.MISSING) -> Any:
    """table[key] checked against `kind` (a type or tuple of types); `default` when absent."""
    if key not in table:
        if default is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{key}'")
        return default
    value = table[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _table(data: Mapping[str, Any], key: str, where: str, required: bool) -> dict[str, Any]:
    if key not in data:
        if required:
            raise ConfigError(f"{where}: missing required section [{key}]")
        return {}
    value = data[key]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: [{key}] must be a table of keys, got {value!r}")
    return dict(value)


def _positive(value: int, where: str, minimum: int = 1) -> int:
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    model: str
    tensor_parallel_size: int = 1
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # engine options (phase-one keys)

    OWN = ("model", "tensor_parallel_size")


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    store: Path  # absolute
    num_tasks: int = 1
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # recipe, codec, k, draws, ...

    OWN = ("store", "num_tasks")


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """One [[students]] entry as written: values may still be sweep lists."""

    index: int
    name: str | None
    nodes: Any  # int or list of ints (sweep)
    gpus: Any  # GPUs per node; int or list of ints
    values: Mapping[str, Any]  # phase-two keys (model, alpha, ...), lists = sweeps
    procs_per_node: Any = None  # training processes per node; None = gpus (or 1 without GPUs)
    optimizer_keys: tuple[str, ...] = ()  # the keys of `values` written inside `optimizer = { ... }`

    OWN = ("name", "nodes", "gpus", "procs_per_node")
    # Keys of an entry the job layer reads itself (plus every phase-two key).
    ENTRY_KEYS = OWN + ("optimizer",)


@dataclasses.dataclass(frozen=True)
class SlurmSpec:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: Mapping[str, str] = dataclasses.field(default_factory=dict)  # phase -> Slurm time limit
    gpus_per_node: int = 0  # 0 = CPU-only nodes: no GPU request at all
    cpus_per_task: int = 1
    mem: str | None = None  # per node, Slurm syntax ("64G"); None = the cluster default
    extra_sbatch: tuple[str, ...] = ()  # extra "#SBATCH ..." option lines, e.g. "--constraint=a100"
    setup: tuple[str, ...] = ()  # shell lines run before each phase (module load, venv activation)
    python: str | None = None  # interpreter on the compute nodes; None = the one that submits
    rdzv_port: int = 29500  # torchrun rendezvous port on the first node of a multi-node run

    KEYS = ("partition", "account", "qos", "time", "gpus_per_node", "cpus_per_task", "mem", "extra_sbatch", "setup", "python", "rdzv_port")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    path: Path  # the job file (absolute)
    base_dir: Path  # its directory: relative paths resolve here, scripts cd here
    name: str
    run_dir: Path  # absolute
    teacher: TeacherSpec
    data: Mapping[str, Any]
    generation: GenerationSpec
    students: tuple[StudentSpec, ...]
    evaluation: Mapping[str, Any] | None
    slurm: SlurmSpec
    on_policy: Any = None  # OnPolicySpec: the [on_policy] round chain, if any

    def resolve_path(self, value: str | os.PathLike) -> Path:
        return resolve_path(self.base_dir, value)


def resolve_path(base_dir: Path, value: str | os.PathLike) -> Path:
    # Normalized (lexically, as `cd` does): plans, configs and summaries read /x/job-run, not /x/jobs/../job-run.
    p = Path(os.path.expanduser(str(value)))
    return Path(os.path.normpath(p if p.is_absolute() else (base_dir / p)))


def _parse_slurm(t: dict[str, Any], where: str, generation_tp: int) -> SlurmSpec:
    for k in t:
        if k not in SlurmSpec.KEYS:
            raise unknown_key_error(where, k, SlurmSpec.KEYS)
    out: dict[str, Any] = {}
    for k in ("partition", "account", "qos"):
        v = _take(t, k, str, where, None)
        if v is not None and not SLURM_WORD_RE.match(v):
            raise ConfigError(f"{where}.{k}: {v!r} is not a Slurm name; use letters, digits and . _ - , +")
        out[k] = v
    time = _take(t, "time", Mapping, where, {})
    for phase, limit in time.items():
        if phase not in PHASE_NAMES:
            raise unknown_key_error(f"{where}.time", phase, PHASE_NAMES)
        if not isinstance(limit, str) or not TIME_RE.match(limit):
            raise ConfigError(
                f"{where}.time.{phase}: {limit!r} is not a Slurm time limit; use \"MINUTES\", \"HH:MM:SS\" or \"D-HH:MM:SS\" (a string)"
            )
    out["time"] = dict(time)
    out["gpus_per_node"] = _take(t, "gpus_per_node", int, where, 0)
    if out["gpus_per_node"] < 0:
        raise ConfigError(f"{where}.gpus_per_node: must be >= 0 (0 = CPU-only nodes), got {out['gpus_per_node']}")
    out["cpus_per_task"] = _positive(_take(t, "cpus_per_task", int, where, 1), f"{where}.cpus_per_task")
    mem = _take(t, "mem", (str, int), where, None)
    if mem is not None:
        mem = str(mem)
        if not MEM_RE.match(mem):
            raise ConfigError(f"{where}.mem: {mem!r} is not a Slurm memory size; use e.g. \"64G\", \"500M\" or \"0\" (all of the node)")
    out["mem"] = mem
    for k in ("extra_sbatch", "setup"):
        lines = _take(t, k, list, where, [])
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise ConfigError(f"{where}.{k}[{i}]: expected a string, got {line!r}")
            if "\n" in line or "\r" in line:
                raise ConfigError(f"{where}.{k}[{i}]: one line per entry (found a line break); split it into several entries")
        out[k] = tuple(lines)
    for i, line in enumerate(out["extra_sbatch"]):
        if not line.startswith("-"):
            raise ConfigError(
                f"{where}.extra_sbatch[{i}]: {line!r} must be an sbatch option such as \"--constraint=a100\" (written without '#SBATCH')"
            )
    out["python"] = _take(t, "python", str, where, None)
    out["rdzv_port"] = _take(t, "rdzv_port", int, where, 29500)
    if not 1 <= out["rdzv_port"] <= 65535:
        raise ConfigError(f"{where}.rdzv_port: must be a TCP port (1..65535), got {out['rdzv_port']}")
    spec = SlurmSpec(**out)
    if spec.gpus_per_node and generation_tp > spec.gpus_per_node:
        raise ConfigError(
            f"{where}: teacher.tensor_parallel_size = {generation_tp} is larger than slurm.gpus_per_node = "
            f"{spec.gpus_per_node}; one array task runs the teacher on one node, so lower tensor_parallel_size "
            f"to at most {spec.gpus_per_node} or raise gpus_per_node"
        )
    return spec


def _parse_student(entry: Any, index: int, where: str) -> StudentSpec:
    w = f"{where} [[students]] #{index + 1}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{w}: each [[students]] entry must be a table, got {entry!r}")
    name = _take(entry, "name", str, w, None)
    if name is not None and not NAME_RE.match(name):
        raise ConfigError(f"{w}.name: {name!r} must start with a letter or digit and use only letters, digits, '.', '_', '-' (at most 64)")
    if "model" not in entry:
        raise ConfigError(f"{w}: missing required key 'model' (the student model: a hub id or a local directory)")

    def counts(key: str, minimum: int) -> Any:
        v = entry.get(key, minimum)
        for x in v if isinstance(v, list) else [v]:
            if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
                raise ConfigError(f"{w}.{key}: expected an integer >= {minimum} (or a list of them for a sweep), got {x!r}")
        return v

    nodes = counts("nodes", 1)
    gpus = counts("gpus", 0)
    procs = counts("procs_per_node", 1) if "procs_per_node" in entry else None
    values = {k: v for k, v in entry.items() if k not in StudentSpec.OWN and k != "optimizer"}
    # optimizer: "adamw" or a table of its settings ({ lr = 1e-5, warmup_steps = 100 }), which
    # are phase-two keys written in one place; sweeps work inside it too.
    opt = entry.get("optimizer")
    if opt is not None:
        if isinstance(opt, str):
            opt = {"name": opt}
        if not isinstance(opt, Mapping):
            raise ConfigError(f"{w}.optimizer: expected \"adamw\" or a table such as {{ name = \"adamw\", lr = 1e-5 }}, got {opt!r}")
        opt_name = opt.get("name", "adamw")
        if opt_name != "adamw":
            raise ConfigError(f"{w}.optimizer.name: {opt_name!r} is not supported; phase two trains with \"adamw\"")
        opt_keys = []
        for k, v in opt.items():
            if k == "name":
                continue
            if k in values:
                raise ConfigError(f"{w}.optimizer.{k}: also set as {k} in the entry; give it once")
            values[k] = v
            opt_keys.append(k)
    else:
        opt_keys = []
    return StudentSpec(index=index, name=name, nodes=nodes, gpus=gpus, values=values, procs_per_node=procs,
                       optimizer_keys=tuple(opt_keys))


def parse_job(data: Mapping[str, Any], path: Path, run_dir: str | os.PathLike | None = None) -> JobSpec:
    where = str(path)
    for k in data:
        if k not in TOP_KEYS:
            raise unknown_key_error(where, k, TOP_KEYS)
    base = path.parent
    name = _take(data, "name", str, where)
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: name = {name!r} must start with a letter or digit and use only letters, digits, '.', '_', '-' (at most 64)")
    rd = resolve_path(base, run_dir) if run_dir is not None else resolve_path(base, _take(data, "run_dir", str, where, f"runs/{name}"))

    t = _table(data, "teacher", where, required=True)
    tw = f"{where} [teacher]"
    teacher = TeacherSpec(
        model=_take(t, "model", str, tw),
        tensor_parallel_size=_positive(_take(t, "tensor_parallel_size", int, tw, 1), f"{tw}.tensor_parallel_size"),
        extra={k: v for k, v in t.items() if k not in TeacherSpec.OWN},
    )

    g = _table(data, "generation", where, required=True)
    gw = f"{where} [generation]"
    generation = GenerationSpec(
        store=resolve_path(base, _take(g, "store", str, gw)),
        num_tasks=_positive(_take(g, "num_tasks", int, gw, 1), f"{gw}.num_tasks"),
        extra={k: v for k, v in g.items() if k not in GenerationSpec.OWN},
    )

    students_raw = data.get("students")
    if students_raw is None and "on_policy" in data:
        students_raw = []  # an on-policy chain from a given start_model needs no off-policy student
    elif students_raw is None:
        raise ConfigError(f"{where}: missing required [[students]] (at least one student entry)")
    if not isinstance(students_raw, list) or (not students_raw and "on_policy" not in data):
        raise ConfigError(f"{where}: students must be one or more [[students]] tables")
    students = tuple(_parse_student(s, i, where) for i, s in enumerate(students_raw))

    evaluation = _table(data, "evaluation", where, required=False) if "evaluation" in data else None
    slurm = _parse_slurm(_table(data, "slurm", where, required=False), f"{where} [slurm]", teacher.tensor_parallel_size)
    return JobSpec(
        path=path,
        base_dir=base,
        name=name,
        run_dir=rd,
        teacher=teacher,
        data=_table(data, "data", where, required=False),
        generation=generation,
        students=students,
        evaluation=evaluation,
        slurm=slurm,
        on_policy=_parse_on_policy(data, where),
    )


def _parse_on_policy(data: Mapping[str, Any], where: str) -> Any:
    if "on_policy" not in data:
        return None
    return parse_on_policy(data["on_policy"], where)


# The [on_policy] section (its round chain: jobs/rounds.py).
ON_POLICY_KEYS = ("rounds", "samples_per_prompt", "temperature", "steps_per_round", "start", "start_model", "evaluate_every_round",
        "prompts", "train", "generation", "nodes", "gpus")
ON_POLICY_PROMPT_KEYS = {"dataset": "data", "data": "data", "split": "split", "text_field": "text_field", "id_field": "id_field",
               "limit": "limit"}
# [generation] keys that describe the off-policy store's dataset/recipe, not the rounds'.
NOT_INHERITED = ("recipe", "target_field", "sampler", "samples_per_prompt", "sampling_temperature")


@dataclasses.dataclass(frozen=True)
class OnPolicySpec:
    rounds: int
    steps_per_round: int
    prompts: Mapping[str, Any]
    samples_per_prompt: int = 1
    temperature: float = 1.0
    start: str | None = None  # a [[students]] run name
    start_model: str | None = None
    evaluate_every_round: bool = False
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    generation: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    nodes: int = 1
    gpus: int = 0


def parse_on_policy(t: Any, where: str) -> OnPolicySpec:
    w = f"{where} [on_policy]"
    if not isinstance(t, Mapping):
        raise ConfigError(f"{w}: must be a table of keys, got {t!r}")
    for k in t:
        if k not in ON_POLICY_KEYS:
            raise unknown_key_error(w, k, ON_POLICY_KEYS)

    def integer(key: str, minimum: int, default: Any = dataclasses.MISSING) -> int:
        if key not in t:
            if default is dataclasses.MISSING:
                raise ConfigError(f"{w}: missing required key '{key}'")
            return default
        v = t[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"{w}.{key}: expected an integer >= {minimum}, got {v!r}")
        return v

    rounds = integer("rounds", 1)
    steps = integer("steps_per_round", 1)
    n = integer("samples_per_prompt", 1, 1)
    temp = t.get("temperature", 1.0)
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or temp < 0:
        raise ConfigError(f"{w}.temperature: expected a number >= 0 (the sampler's temperature), got {temp!r}")
    start, start_model = t.get("start"), t.get("start_model")
    if (start is None) == (start_model is None):
        raise ConfigError(
            f"{w}: give exactly one start: start = \"<a [[students]] run name>\" (trained off-policy first, round 0) "
            "or start_model = \"<model directory or hub id>\""
        )
    for key, v in (("start", start), ("start_model", start_model)):
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"{w}.{key}: expected a non-empty string, got {v!r}")
    prompts = t.get("prompts")
    if not isinstance(prompts, Mapping) or not (prompts.get("dataset") or prompts.get("data")):
        raise ConfigError(f"{w}.prompts: expected a table with at least dataset = \"<prompts file or hub id>\", got {prompts!r}")
    for k in prompts:
        if k not in ON_POLICY_PROMPT_KEYS:
            raise unknown_key_error(f"{w}.prompts", k, ON_POLICY_PROMPT_KEYS)
    for key in ("train", "generation"):
        if not isinstance(t.get(key, {}), Mapping):
            raise ConfigError(f"{w}.{key}: expected a table of phase keys, got {t[key]!r}")
    for key in ("stores", "out", "student", "model", "steps", "resume"):
        if key in t.get("train", {}):
            raise ConfigError(f"{w}.train.{key}: set by the round chain (student = the previous round's final weights, "
                              "stores = the round's store, steps = steps_per_round); remove it")
    for key in ("out", "store", "data", "dataset", "task_index", "num_tasks") + NOT_INHERITED:
        if key in t.get("generation", {}):
            raise ConfigError(f"{w}.generation.{key}: set by the round chain (or by [on_policy] itself); remove it")
    every = t.get("evaluate_every_round", False)
    if not isinstance(every, bool):
        raise ConfigError(f"{w}.evaluate_every_round: expected true or false, got {every!r}")
    return OnPolicySpec(
        rounds=rounds, steps_per_round=steps, prompts=dict(prompts), samples_per_prompt=n, temperature=float(temp),
        start=start, start_model=start_model, evaluate_every_round=every, train=dict(t.get("train", {})),
        generation=dict(t.get("generation", {})), nodes=integer("nodes", 1, 1), gpus=integer("gpus", 0, 0),
    )


def load_job(path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> JobSpec:
    """Read and validate a job file (structure only; jobs.plan checks each phase's config)."""
    p = Path(os.path.normpath(Path(path).absolute()))
    return parse_job(read_toml(p), p, run_dir=run_dir)


# -- sweeps ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One student run after sweep expansion."""

    name: str  # unique within the job: names the run directory and the Slurm job
    student: int  # index of its [[students]] entry
    nodes: int
    gpus: int  # per node
    procs_per_node: int  # torchrun processes per node (= gpus, or 1 on CPU unless set)
    values: Mapping[str, Any]  # phase-two keys with single values
    swept: Mapping[str, Any]  # the swept keys and this run's values (for names and reports)


def _short(value: Any) -> str:
    s = str(value)
    if "/" in s:  # a model path or hub id: its last part is what tells runs apart
        s = s.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.]+", "_", s)[:24]


def expand_students(job: JobSpec, list_fields: frozenset[str] = frozenset()) -> list[RunSpec]:
    """Every [[students]] entry expanded over its sweep lists (cartesian product).

    A list value is a sweep, except for keys in `list_fields` (phase-two fields that are lists
    themselves), where only a list of lists is a sweep.
    """
    runs: list[RunSpec] = []
    for st in job.students:
        w = f"{job.path} [[students]] #{st.index + 1}"
        entries = dict(st.values, nodes=st.nodes, gpus=st.gpus, procs_per_node=st.procs_per_node)
        axes: dict[str, list[Any]] = {}
        for key, value in entries.items():
            is_sweep = isinstance(value, list) and (key not in list_fields or all(isinstance(v, list) for v in value))
            if is_sweep:
                if not value:
                    raise ConfigError(f"{w}.{key}: the sweep list is empty, so this student expands to zero runs; give at least one value")
                axes[key] = value
        combos = list(itertools.product(*axes.values())) if axes else [()]
        base_name = st.name or _short(st.values.get("model", f"student{st.index}"))
        for combo in combos:
            chosen = dict(zip(axes, combo))
            values = {k: (chosen[k] if k in chosen else v) for k, v in entries.items()}
            suffix = "-".join(f"{_key_abbrev(k)}{_short(v)}" for k, v in chosen.items() if len(axes[k]) > 1)
            name = f"{base_name}-{suffix}" if suffix else base_name
            nodes, gpus, procs = values.pop("nodes"), values.pop("gpus"), values.pop("procs_per_node")
            if procs is None:
                procs = max(gpus, 1)
            elif gpus and procs != gpus:
                raise ConfigError(f"{w}: procs_per_node = {procs} but gpus = {gpus}; with GPUs there is one process per GPU, so drop procs_per_node")
            runs.append(RunSpec(name=name, student=st.index, nodes=nodes, gpus=gpus, procs_per_node=procs, values=values, swept=chosen))
    seen: dict[str, RunSpec] = {}
    for r in runs:
        if r.name in seen:
            raise ConfigError(
                f"{job.path}: two student runs are both named '{r.name}' ([[students]] #{seen[r.name].student + 1} and "
                f"#{r.student + 1}); give the entries different 'name' keys"
            )
        seen[r.name] = r
    for r in runs:
        if job.slurm.gpus_per_node and r.gpus > job.slurm.gpus_per_node:
            raise ConfigError(
                f"{job.path} [[students]] #{r.student + 1}.gpus: {r.gpus} GPUs per node is more than slurm.gpus_per_node = "
                f"{job.slurm.gpus_per_node}; use more nodes instead"
            )
    return runs


_ABBREV = {"alpha": "a", "temperature": "T", "divergence": "", "tail_mode": "", "model": "", "learning_rate": "lr", "lr": "lr", "steps": "s", "nodes": "n", "gpus": "g"}


def _key_abbrev(key: str) -> str:
    return _ABBREV.get(key, key[:8])
