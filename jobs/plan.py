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
import sys
import tomllib
from pathlib import Path
from typing import Any

from kdpipe.jobs import phases
from kdpipe.jobs.spec import JobSpec, RunSpec, expand_students
from kdpipe.jobs.steps import StoreState, Step, check_store, eval_gpus, ranges, same_config
from kdpipe.pipeline.config import atomic_write_text
from kdpipe.storage.errors import ConfigError, KdpipeError


@dataclasses.dataclass(frozen=True)
class Plan:
    job: JobSpec
    store: StoreState
    runs: tuple[RunSpec, ...]
    steps: tuple[Step, ...]
    python: str  # interpreter the commands run with
    skipped: tuple[str, ...] = ()  # steps left out because their output already exists (why)
    rounds: tuple = ()  # jobs.rounds.RoundPlan per on-policy round ([on_policy])

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
        store = check_store(job.generation.store, job.generation.num_tasks, expected, phases.comparable_meta(gen_cfg), note)

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
        from kdpipe.pipeline.train.config import LOSS_AUTO  # resolved by the trainer on its device
        trained = same_config(out / "final" / "train_config.toml", train_text, ignore={"resume"}, resolved_at_run=LOSS_AUTO)
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
            if trained and (out / "eval" / "report.json").is_file() and same_config(out / "eval" / "eval_config.toml", eval_text):
                skipped.append(f"evaluate-{run.name}: {out / 'eval' / 'report.json'} exists with the same config")
                continue
            epath = cfgdir / f"evaluate-{run.name}.toml"
            steps.append(Step(
                kind="evaluate", name=f"evaluate-{run.name}",
                argv=tuple(phases.eval_argv(python, epath)),
                after=() if trained else (f"train-{run.name}",), gpus=eval_gpus(job, eval_cfg),
                config=epath, config_text=eval_text, run=run,
            ))
    rounds: list = []
    if job.on_policy is not None:  # the round chain, after the off-policy steps (jobs/rounds.py)
        from kdpipe.jobs.rounds import round_steps

        op_steps, op_skipped, rounds = round_steps(job, python, runs, steps, _toml)
        steps += op_steps
        skipped += op_skipped
    return Plan(job=job, store=store, runs=tuple(runs), steps=tuple(steps), python=python, skipped=tuple(skipped),
                rounds=tuple(rounds))


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
            what += f"  array {len(s.tasks)} task(s) [{ranges(s.tasks)}] of {job.generation.num_tasks}"
        if s.kind in ("train", "evaluate"):
            what += f"  nodes={s.nodes} gpus/node={s.gpus}" + (f" procs/node={s.procs}" if s.kind == "train" else "")
        if s.after:
            what += f"  after {', '.join(s.after)}"
        lines.append(what)
    from kdpipe.jobs.rounds import describe_rounds

    lines += describe_rounds(plan)
    lines.append(f"runs: {len(plan.runs)}")
    for r in plan.runs:
        swept = ", ".join(f"{k}={v}" for k, v in r.swept.items()) or "no sweep"
        lines.append(f"  {r.name:<28} student #{r.student + 1}  ({swept})  -> {plan.run_dir_of(r)}")
        lines += _cross_tokenizer_lines(plan, r)
    return "\n".join(lines)


def _cross_tokenizer_lines(plan: Plan, run: RunSpec) -> list[str]:
    """A run with cross_tokenizer set: its alignment, loss and share of 1:1 groups on a store sample."""
    from kdpipe.pipeline.train.xtok.hooks import cross_tokenizer_plan

    try:
        cfg = phases.train_config(plan.job, run, plan.run_dir_of(run))
    except KdpipeError:
        return []
    return cross_tokenizer_plan(cfg)
