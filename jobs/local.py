"""`kdpipe run`: the plan's chain on this machine, in order, as child processes of one tree.

Each step runs the same `python -m kdpipe.pipeline.cli ...` command its sbatch script would run
(no shell: argv lists), from the job file's directory, with its output in RUN_DIR/logs. Array
tasks run one after another. A failing step stops the chain with its log's last lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from kdpipe.jobs.plan import Plan, write_configs
from kdpipe.jobs.steps import Step
from kdpipe.jobs.render import local_argv
from kdpipe.jobs.submit import events_file, logs_dir
from kdpipe.pipeline.config import atomic_write_text
from kdpipe.storage.errors import ConfigError, KdpipeError


class StepFailed(KdpipeError):
    """A step of a local run exited non-zero (its exit status in `returncode`)."""

    def __init__(self, message: str, returncode: int = 1) -> None:
        super().__init__(message)
        self.returncode = returncode


def _event(plan: Plan, *words: object) -> None:
    with open(events_file(plan), "a", encoding="utf-8") as f:
        f.write(f"{time.time():.6f} " + " ".join(str(w) for w in words) + "\n")


def _train_argv(step: Step) -> list[str]:
    procs = step.procs
    if step.nodes > 1:
        raise ConfigError(
            f"run {step.run.name if step.run else step.name}: nodes = {step.nodes}; a local run has one node. "
            "Use `kdpipe submit` for multi-node runs, or set nodes = 1"
        )
    if procs == 1:
        return list(step.argv)
    python, rest = step.argv[0], list(step.argv[3:])
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "kdpipe.pipeline.cli", *rest]


def run_logged(argv: list[str], log: Path, label: str, stream: bool = False, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> float:
    """Run one command with its stdout and stderr in `log` (also on our stdout when `stream`).

    Engines write walls of INFO lines, warnings and progress bars; they belong in the step's log,
    and the terminal shows one line per step. A non-zero exit raises StepFailed with the log's
    last lines, so the error is visible without opening the file. Returns the seconds it took.
    """
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out, subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        raise StepFailed(f"{label} failed (exit {rc}); full log: {log}\n{tail.rstrip()}", rc)
    return time.time() - t0


def _run_one(plan: Plan, step: Step, argv: list[str], label: str, log: Path, stream: bool) -> float:
    task = label.rsplit(" task ", 1)[1] if " task " in label else (step.run.name if step.run else "0")
    _event(plan, "start", step.kind, task)
    env = dict(os.environ, KDPIPE_RUN_DIR=str(plan.job.run_dir))
    try:
        secs = run_logged(argv, log, label, stream, cwd=plan.job.base_dir, env=env)
    except StepFailed as e:
        _event(plan, "exit", step.kind, task, e.returncode)
        raise
    _event(plan, "exit", step.kind, task, 0)
    return secs


def run_plan(plan: Plan, stream: bool = False, echo: Callable[[str], None] = print,
             announce: Callable[[str, Path], None] | None = None) -> dict:
    """Run every step in order; returns the summary also written to RUN_DIR/run.json.

    echo gets one line per finished step; announce (if given) gets each step's label and log
    file before it starts, so a quiet terminal can show what is running.
    """
    job = plan.job
    logs_dir(plan).mkdir(parents=True, exist_ok=True)
    write_configs(plan)
    if plan.store.status == "finalized":
        echo(f"store {plan.store.path} is finalized with the same cache key: generate and finalize skipped")
    summary: dict = {"job": job.name, "job_file": str(job.path), "store": str(plan.store.path),
                     "store_state_at_start": plan.store.status, "steps": []}
    for why in plan.skipped:
        echo(f"skip {why}")
    done: set[str] = set()
    for step in plan.steps:
        missing = [a for a in step.after if a not in done]
        assert not missing, f"plan order: {step.name} before {missing}"
        if step.kind == "generate":
            assert step.tasks is not None
            for i in step.tasks:
                label, log = f"{step.name} task {i}", logs_dir(plan) / f"{step.name}-{i}.log"
                if announce is not None:
                    announce(label, log)
                secs = _run_one(plan, step, local_argv(step.argv, i), label, log, stream)
                echo(f"ok  {label:<36} {secs:7.1f} s")
                summary["steps"].append({"step": step.name, "task": i, "seconds": round(secs, 2)})
        else:
            argv = _train_argv(step) if step.kind == "train" else list(step.argv)
            log = logs_dir(plan) / f"{step.name}.log"
            if announce is not None:
                announce(step.name, log)
            secs = _run_one(plan, step, argv, step.name, log, stream)
            echo(f"ok  {step.name:<36} {secs:7.1f} s")
            summary["steps"].append({"step": step.name, "seconds": round(secs, 2)})
        done.add(step.name)
    summary["runs"] = [{"name": r.name, "dir": str(plan.run_dir_of(r)), "swept": dict(r.swept)} for r in plan.runs]
    from kdpipe.jobs.rounds import rounds_doc

    summary["on_policy"] = rounds_doc(plan)
    atomic_write_text(job.run_dir / "run.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary
