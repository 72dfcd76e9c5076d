"""`kdpipe submit`: render the plan's sbatch scripts into the run dir and submit the chain.

    generate (array, --array=<missing tasks>) --afterok--> finalize --afterok--> train-<run> --afterok--> evaluate-<run>

Each script is rendered right before its `sbatch --parsable`, with the real job ids of what it
waits for, so the file in RUN_DIR/scripts is exactly what Slurm ran. submission.json is
rewritten after every accepted job: if sbatch is missing or refuses a script midway, the error
and the file both say which jobs already exist (and how to cancel them).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from kdpipe.jobs.rounds import rounds_doc
from kdpipe.jobs.plan import Plan, write_configs
from kdpipe.jobs.steps import Step, ranges
from kdpipe.jobs.render import events_block, render, shell_command
from kdpipe.pipeline.config import atomic_write_text
from kdpipe.storage.errors import KdpipeError

SUBMISSION_FILE = "submission.json"


class SubmitError(KdpipeError):
    """sbatch is missing or refused a script; some jobs of the chain may already exist."""


def events_file(plan: Plan) -> Path:
    return plan.job.run_dir / "events.log"


def logs_dir(plan: Plan) -> Path:
    return plan.job.run_dir / "logs"


def scripts_dir(plan: Plan) -> Path:
    return plan.job.run_dir / "scripts"


def _sbatch_lines(plan: Plan, step: Step, dependency: list[str]) -> str:
    """The #SBATCH option lines whose values spec.py validated (no shell ever reads them)."""
    s = plan.job.slurm
    opts = []
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            opts.append(f"--{key}={getattr(s, key)}")
    if step.kind in s.time:
        opts.append(f"--time={s.time[step.kind]}")
    opts.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.mem is not None:
        opts.append(f"--mem={s.mem}")
    if step.gpus > 0:
        opts.append(f"--gpus-per-node={step.gpus}")
    opts.extend(s.extra_sbatch)
    if dependency:
        opts.append(f"--dependency=afterok:{':'.join(dependency)}")
        # A failed upstream job cancels this one instead of leaving it pending forever.
        opts.append("--kill-on-invalid-dep=yes")
    return "\n".join(f"#SBATCH {o}" for o in opts)


def _train_launch(plan: Plan, step: Step) -> str:
    """One process for a single-process run; else srun -> one torchrun per node, rendezvous on the first node."""
    procs = step.procs
    if step.nodes == 1 and procs == 1:
        return shell_command(step.argv)
    python, rest = step.argv[0], list(step.argv[3:])  # argv = python -m kdpipe.pipeline.cli <command> ...
    torchrun = [
        python, "-m", "torch.distributed.run",
        f"--nnodes={step.nodes}", f"--nproc-per-node={procs}",
        "--rdzv-backend=c10d",
    ]
    return "\n".join([
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        # Offset by the job id: runs of a sweep sharing a node must not share a rendezvous port.
        f"rdzv_port=$(( {int(plan.job.slurm.rdzv_port)} + SLURM_JOB_ID % 1000 ))",
        "srun --nodes=" + str(step.nodes) + " --ntasks-per-node=1 --kill-on-bad-exit=1 "
        + shell_command(torchrun)
        + ' --rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" '
        + shell_command(["-m", "kdpipe.pipeline.cli", *rest]),
    ])


def render_step(plan: Plan, step: Step, dependency: list[str]) -> str:
    job = plan.job
    words = {
        "job_name": f"{job.name}-{step.name}",
        "base_dir": str(job.base_dir),
        "log_pattern": f"{step.name}-%A_%a.out" if step.tasks is not None else f"{step.name}-%j.out",
    }
    blocks = {
        "sbatch_lines": _sbatch_lines(plan, step, dependency),
        "setup": "\n".join(job.slurm.setup),
        "events": events_block(str(events_file(plan))),
    }
    if step.kind == "generate":
        assert step.tasks is not None
        blocks["array"] = ranges(step.tasks)
        words["num_tasks"] = str(job.generation.num_tasks)
        words["gpus"] = str(step.gpus)
        blocks["command"] = shell_command(step.argv)
    elif step.kind == "train":
        assert step.run is not None
        words["nodes"] = str(step.nodes)
        words["procs_per_node"] = str(step.procs)
        words["run_name"] = step.run.name
        blocks["launch"] = _train_launch(plan, step)
    elif step.kind == "evaluate":
        assert step.run is not None
        words["run_name"] = step.run.name
        blocks["command"] = shell_command(step.argv)
    else:
        blocks["command"] = shell_command(step.argv)
    return render(step.kind, words, blocks)


def render_all(plan: Plan) -> list[tuple[Step, str]]:
    """Every script with symbolic dependencies (`<finalize>`), as --dry-run prints them."""
    return [(s, render_step(plan, s, [f"<{a}>" for a in s.after])) for s in plan.steps]


def _write_submission(plan: Plan, jobs: list[dict], complete: bool, error: str | None = None) -> Path:
    job = plan.job
    doc = {
        "job": job.name,
        "job_file": str(job.path),
        "run_dir": str(job.run_dir),
        "submitted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "error": error,
        "store": {
            "path": str(plan.store.path),
            "state_at_submit": plan.store.status,
            "num_tasks": job.generation.num_tasks,
            "tasks_submitted": list(plan.step("generate").tasks or ()) if any(s.name == "generate" for s in plan.steps) else [],
            "reused": plan.store.status == "finalized",
        },
        "runs": [{"name": r.name, "dir": str(plan.run_dir_of(r)), "swept": dict(r.swept)} for r in plan.runs],
        "jobs": jobs,
        "on_policy": rounds_doc(plan),  # [on_policy] rounds (kdpipe status shows them)
    }
    path = job.run_dir / SUBMISSION_FILE
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    return path


def _refuse_if_queued(previous: Path) -> None:
    """A second chain into the same run dir while the first is queued would race on its files."""
    try:
        ids = [j["job_id"] for j in json.loads(previous.read_text()).get("jobs", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return
    squeue = shutil.which("squeue")
    if not ids or squeue is None:
        return
    r = subprocess.run([squeue, "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    active = [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode == 0 and active:
        raise SubmitError(
            f"{previous}: jobs of the previous submission are still queued or running ({', '.join(active[:8])}); "
            f"wait for them (`kdpipe status {previous.parent}`), cancel them (`scancel {' '.join(ids)}`), "
            "or submit with another --run-dir. Nothing was submitted."
        )


def _sbatch_error_text(r: subprocess.CompletedProcess) -> str:
    return (r.stderr or r.stdout or "").strip() or f"exit status {r.returncode}"


def rerun_hint(plan: Plan) -> str:
    """How to force a skipped step to run again (there is no flag: its output is what skips it)."""
    parts = []
    if plan.store.status == "finalized":
        parts.append(f"generate + finalize: delete or move the store {plan.store.path} (or set another generation.store)")
    for why in plan.skipped:
        step, _, rest = why.partition(":")
        target = rest.strip().split(" exists", 1)[0]
        if step.startswith("evaluate-"):
            target = str(Path(target).parent)  # the whole RUN/eval folder
        parts.append(f"{step}: delete {target}")
    if not parts:
        return ""
    return "to rerun a skipped step, remove its output: " + "; ".join(parts) + "; or pass another --run-dir for new runs"


def submit_plan(
    plan: Plan,
    dry_run: bool = False,
    sbatch: str = "sbatch",
    echo: Callable[[str], None] = print,
) -> dict:
    """Submit (or, with dry_run, only print) the chain; returns {step name: job id}."""
    if dry_run:
        from kdpipe.jobs.plan import describe

        # The plan first, as `kdpipe check` prints it: what would run, and why the rest is skipped.
        echo("\n".join("# " + line for line in describe(plan).splitlines()))
        for step, text in render_all(plan):
            echo(f"# ===== {step.name} -> {scripts_dir(plan) / (step.name + '.sbatch')}")
            echo(text)
        echo(f"# dry run: nothing written, nothing submitted ({len(plan.steps)} job(s) would be submitted)")
        hint = rerun_hint(plan)
        if hint:
            echo("# " + hint)
        return {}

    if not plan.steps:
        echo("nothing to submit: " + "; ".join(plan.skipped))
        hint = rerun_hint(plan)
        if hint:
            echo(hint)
        return {}
    exe = shutil.which(sbatch)
    if exe is None:
        raise SubmitError(
            f"'{sbatch}' not found on PATH: submit from a Slurm login node, or run the chain here with `kdpipe run {plan.job.path}`. "
            "Nothing was submitted."
        )
    job = plan.job
    for d in (job.run_dir, scripts_dir(plan), logs_dir(plan)):
        d.mkdir(parents=True, exist_ok=True)
    previous = job.run_dir / SUBMISSION_FILE
    if previous.exists():
        _refuse_if_queued(previous)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        os.replace(previous, job.run_dir / f"submission.{stamp}.json")
    write_configs(plan)

    ids: dict[str, str] = {}
    records: list[dict] = []
    for step in plan.steps:
        dependency = [ids[a] for a in step.after]
        text = render_step(plan, step, dependency)
        script = scripts_dir(plan) / f"{step.name}.sbatch"
        atomic_write_text(script, text)
        argv = [exe, "--parsable", str(script)]
        try:
            # sbatch runs in the logs dir: the jobs' relative --output files land there.
            r = subprocess.run(argv, cwd=logs_dir(plan), capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            r = subprocess.CompletedProcess(argv, 1, "", str(e))
        if r.returncode != 0:
            msg = f"sbatch refused {script} ({step.name}): {_sbatch_error_text(r)}"
            path = _write_submission(plan, records, complete=False, error=msg)
            if ids:
                done = ", ".join(f"{k}={v}" for k, v in ids.items())
                tail = f" Already submitted: {done} (recorded in {path}); cancel them with `scancel {' '.join(ids.values())}` or fix the problem and submit again."
            else:
                tail = " Nothing was submitted."
            raise SubmitError(msg + "." + tail)
        job_id = r.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
        ids[step.name] = job_id
        records.append({
            "step": step.name,
            "kind": step.kind,
            "job_id": job_id,
            "script": str(script),
            "after": list(step.after),
            "array": ranges(step.tasks) if step.tasks is not None else None,
            "run": step.run.name if step.run else None,
            "config": str(step.config) if step.config else None,
        })
        _write_submission(plan, records, complete=False)
        echo(f"submitted {step.name:<28} job {job_id}" + (f"  after {', '.join(dependency)}" if dependency else ""))
    path = _write_submission(plan, records, complete=True)
    if plan.store.status == "finalized":
        echo(f"store {plan.store.path} is finalized with the same cache key: generate and finalize skipped")
    echo(f"wrote {path}")
    return ids
