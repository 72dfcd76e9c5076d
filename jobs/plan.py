"""The resolved plan of a job: which phases run, with which configs, after what.

    generate (array: the tasks still missing) -> finalize -> train <run> -> evaluate <run>

Store reuse is decided here, from the store directory on disk:
- no store yet                      -> every array task, then finalize;
- some tasks complete (same key)    -> only the missing tasks, then finalize;
- finalized with the same cache key -> neither generate nor finalize: students start at once;
- a store with a DIFFERENT cache key -> ConfigError (it holds another teacher's/codec's targets).
`make_plan` writes nothing; `write_configs` renders each phase's config into the run dir.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from kdpipe.jobs import phases
from kdpipe.jobs.spec import JobSpec, RunSpec, expand_students
from kdpipe.pipeline.config import atomic_write_text
from kdpipe.storage.errors import ConfigError, KdpipeError, StoreError


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


@dataclasses.dataclass(frozen=True)
class Plan:
    job: JobSpec
    store: StoreState
    runs: tuple[RunSpec, ...]
    steps: tuple[Step, ...]
    python: str  # interpreter the commands run with
    skipped: tuple[str, ...] = ()  # steps left out because their output already exists (why)
    rounds: tuple = ()  # jobs.onpolicy.RoundPlan per on-policy round ([on_policy])

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def configs_dir(self) -> Path:
        return self.job.run_dir / "configs"

    def run_dir_of(self, run: RunSpec) -> Path:
        return self.job.run_dir / "runs" / run.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable ({e}); remove the store directory or fix the file") from None


def inspect_store(path: Path, num_tasks: int, expected_key: str | None, comparable: dict[str, Any] | None = None,
                  key_note: str = "") -> StoreState:
    """What is on disk at `path`, compared with the key this job would write.

    When the key cannot be computed here, the fields in `comparable` (teacher, recipe, codec)
    are compared with the store's metadata instead, so a store of another teacher is never reused.
    """
    from kdpipe.storage.format import MANIFEST_FILE, META_FILE, TASKS_DIR

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
    for i in range(num_tasks):
        tm = path / TASKS_DIR / f"task-{i:05d}.json"
        if tm.exists() and _read_json(tm).get("complete"):
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


def _toml(cfg: Any) -> str:
    import tomli_w

    from kdpipe.pipeline.config import config_to_dict

    return tomli_w.dumps(config_to_dict(cfg))


def make_plan(job: JobSpec, python: str | None = None) -> Plan:
    """Validate every phase's config (by building its dataclass) and order the steps."""
    python = python or job.slurm.python or sys.executable
    cfgdir = job.run_dir / "configs"

    if not job.students:  # an [on_policy] chain from a start_model: no off-policy store at all
        store = StoreState(job.generation.store, "new", None, None, "not used (no [[students]])")
    else:
        gen_cfg = phases.generate_config(job)
        # The key needs the teacher's tokenizer and the dataset: compute it only when a store exists
        # to compare with (a new store gets its key from the generate tasks).
        if (job.generation.store / "meta.json").exists():
            expected, note = phases.expected_cache_key(gen_cfg)
        else:
            expected, note = None, "no store yet"
        store = inspect_store(job.generation.store, job.generation.num_tasks, expected, phases.comparable_meta(gen_cfg), note)

    steps: list[Step] = []
    after_store: tuple[str, ...] = ()
    if store.status != "finalized" and job.students:  # without [[students]] nothing reads this store
        missing = tuple(i for i in range(job.generation.num_tasks) if i not in store.done_tasks)
        if missing:
            steps.append(Step(
                kind="generate", name="generate",
                argv=tuple(phases.generate_argv(python, cfgdir / "generate.toml")),
                tasks=missing, gpus=job.teacher.tensor_parallel_size if job.slurm.gpus_per_node else 0,
                config=cfgdir / "generate.toml", config_text=_toml(gen_cfg),
            ))
        steps.append(Step(
            kind="finalize", name="finalize",
            argv=tuple(phases.finalize_argv(python, job.generation.store, job.generation.num_tasks)),
            after=("generate",) if missing else (),
        ))
        after_store = ("finalize",)

    runs = expand_students(job, phases.train_list_fields())
    if not runs and job.on_policy is None:
        raise ConfigError(f"{job.path}: the [[students]] entries expand to zero runs; give at least one student")
    evaluated = _evaluated_runs(job, runs)
    skipped: list[str] = []
    for run in runs:
        out = job.run_dir / "runs" / run.name
        train_cfg = phases.train_config(job, run, out)
        train_text = _toml(train_cfg)
        tpath = cfgdir / f"train-{run.name}.toml"
        # A rerun of the chain (after a failure or preemption) does not redo finished work: a run
        # whose RUN/final holds this very config is done; an interrupted one resumes (resume = true).
        trained = _same_config(out / "final" / "train_config.toml", train_text, ignore={"resume"})
        if trained:
            skipped.append(f"train-{run.name}: {out / 'final'} exists with the same config")
        else:
            steps.append(Step(
                kind="train", name=f"train-{run.name}",
                argv=tuple(phases.train_argv(python, tpath)),
                after=after_store, nodes=run.nodes, gpus=run.gpus, procs=run.procs_per_node,
                config=tpath, config_text=train_text, run=run,
            ))
        if run.name in evaluated:
            eval_cfg = phases.eval_config(job, run, out)
            eval_text = _toml(eval_cfg)
            if trained and (out / "eval" / "report.json").is_file() and _same_config(out / "eval" / "eval_config.toml", eval_text):
                skipped.append(f"evaluate-{run.name}: {out / 'eval' / 'report.json'} exists with the same config")
                continue
            epath = cfgdir / f"evaluate-{run.name}.toml"
            steps.append(Step(
                kind="evaluate", name=f"evaluate-{run.name}",
                argv=tuple(phases.eval_argv(python, epath)),
                after=() if trained else (f"train-{run.name}",), gpus=_eval_gpus(job, eval_cfg),
                config=epath, config_text=eval_text, run=run,
            ))
    rounds: list = []
    if job.on_policy is not None:  # the round chain, after the off-policy steps (jobs/onpolicy.py)
        from kdpipe.jobs.onpolicy import round_steps

        op_steps, op_skipped, rounds = round_steps(job, python, runs, steps, _toml)
        steps += op_steps
        skipped += op_skipped
    return Plan(job=job, store=store, runs=tuple(runs), steps=tuple(steps), python=python, skipped=tuple(skipped),
                rounds=tuple(rounds))


def _same_config(saved: Path, text: str, ignore: set[str] = frozenset()) -> bool:
    """Whether the resolved config a phase saved equals the one this plan would hand it."""
    if not saved.is_file():
        return False
    try:
        a = tomllib.loads(saved.read_text(encoding="utf-8"))
        b = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def _evaluated_runs(job: JobSpec, runs: list[RunSpec]) -> set[str]:
    """Runs that get an evaluation: all, or those [evaluation].runs names (run or student names)."""
    if job.evaluation is None:
        return set()
    chosen = job.evaluation.get("runs")
    if chosen is None:
        return {r.name for r in runs}
    where = f"{job.path} [evaluation].runs"
    if not isinstance(chosen, list) or not all(isinstance(c, str) for c in chosen):
        raise ConfigError(f"{where}: expected a list of run names, got {chosen!r}")
    names = {r.name for r in runs}
    students = {job.students[r.student].name: r.student for r in runs if job.students[r.student].name}
    out = set()
    for c in chosen:
        if c in names:
            out.add(c)
        elif c in students:  # a student name selects all of its sweep's runs
            out.update(r.name for r in runs if r.student == students[c])
        else:
            from kdpipe.jobs.spec import suggest

            raise ConfigError(f"{where}: no run named {c!r}{suggest(c, names | set(students))}; runs are {', '.join(sorted(names))}")
    if not out:
        raise ConfigError(f"{where}: the list is empty, so nothing is evaluated; remove [evaluation] or name a run")
    return out


def _eval_gpus(job: JobSpec, eval_cfg: Any) -> int:
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


def write_configs(plan: Plan) -> None:
    """Render each phase's config (TOML) into RUN_DIR/configs, with a copy of the job file and
    the plan as `kdpipe check` prints it, so a run dir says what produced it."""
    plan.configs_dir.mkdir(parents=True, exist_ok=True)
    for s in plan.steps:
        if s.config is not None and s.config_text is not None:
            atomic_write_text(s.config, s.config_text)
        if s.kind == "train" and s.config_text is not None:
            # A chain's training step runs with resume = true (a rerun continues a preempted run); phase two
            # refuses --resume into a folder that does not exist (a mistyped --out), so the run's folder is made here.
            out = tomllib.loads(s.config_text).get("out")
            if isinstance(out, str) and out:
                Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.configs_dir / "job.toml", plan.job.path.read_text(encoding="utf-8"))
    atomic_write_text(plan.configs_dir / "plan.txt", describe(plan) + "\n")


def describe(plan: Plan) -> str:
    """The plan as `kdpipe check` prints it."""
    job, st = plan.job, plan.store
    lines = [
        f"job {job.name}  ({job.path})",
        f"run dir   {job.run_dir}",
        f"store     {st.path}",
        f"          state: {st.status}"
        + (f", {len(st.done_tasks)}/{job.generation.num_tasks} tasks complete" if st.status == "partial" else "")
        + (f", {st.num_sequences} sequences" if st.num_sequences is not None else ""),
        "          cache key: " + (
            st.expected_key if st.expected_key
            else "set by the generate tasks" if st.status == "new"
            else f"not computable here ({st.key_note[:160]}); teacher/recipe/codec compared instead, and each generate task checks the key"
        ),
        f"teacher   {job.teacher.model}  tensor_parallel_size={job.teacher.tensor_parallel_size}",
        "phases:",
    ]
    if st.status == "finalized":
        lines.append("  generate + finalize: skipped (finalized store with the same cache key is reused)")
    for why in plan.skipped:
        lines.append(f"  skipped {why}")
    if not plan.steps:
        lines.append("  nothing to run: every step's output exists")
    for s in plan.steps:
        what = f"  {s.name:<28} {s.kind}"
        if s.tasks is not None:
            what += f"  array {len(s.tasks)} task(s) [{_ranges(s.tasks)}] of {job.generation.num_tasks}"
        if s.kind in ("train", "evaluate"):
            what += f"  nodes={s.nodes} gpus/node={s.gpus}" + (f" procs/node={s.procs}" if s.kind == "train" else "")
        if s.after:
            what += f"  after {', '.join(s.after)}"
        lines.append(what)
    from kdpipe.jobs.onpolicy import describe_rounds

    lines += describe_rounds(plan)
    lines.append(f"runs: {len(plan.runs)}")
    for r in plan.runs:
        swept = ", ".join(f"{k}={v}" for k, v in r.swept.items()) or "no sweep"
        lines.append(f"  {r.name:<28} student #{r.student + 1}  ({swept})  -> {plan.run_dir_of(r)}")
        lines += _cross_tokenizer_lines(plan, r)
    return "\n".join(lines)


def _cross_tokenizer_lines(plan: Plan, run: RunSpec) -> list[str]:
    """A run with cross_tokenizer set: its alignment, loss and share of 1:1 groups on a store sample."""
    from kdpipe.pipeline.train.xtok import cross_tokenizer_plan

    try:
        cfg = phases.train_config(plan.job, run, plan.run_dir_of(run))
    except KdpipeError:
        return []
    return cross_tokenizer_plan(cfg)


def _ranges(ids: tuple[int, ...]) -> str:
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


array_spec = _ranges
