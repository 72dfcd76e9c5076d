"""Click commands of the job layer: check, run, submit, status (thin: parse, call one function)."""

from __future__ import annotations

import json

import click

from kdpipe.pipeline.cli import run_command

JOB = click.argument("job_file", type=click.Path(dir_okay=False))
RUN_DIR = click.option("--run-dir", type=click.Path(file_okay=False), default=None,
                       help="Override the job file's run_dir (scripts, configs, logs, submission.json).  [default: the job file's run_dir]")


def _plan(job_file: str, run_dir: str | None):
    from kdpipe.jobs.plan import make_plan
    from kdpipe.jobs.spec import load_job

    return make_plan(load_job(job_file, run_dir=run_dir))


def _check(job_file: str, run_dir: str | None) -> None:
    from kdpipe.jobs.plan import describe

    click.echo(describe(_plan(job_file, run_dir)))


@click.command()
@JOB
@RUN_DIR
def check(job_file: str, run_dir: str | None) -> None:
    """Validate JOB_FILE and print its resolved plan (phases, array sizes, stores, runs); runs nothing."""
    run_command(_check, job_file, run_dir)


def outputs_summary(plan) -> str:
    """Where a finished chain's outputs are (printed at the end of `kdpipe run`): the store, every
    student run and every on-policy round (its store, student and report), paths as openable from here."""
    from kdpipe.jobs.local import logs_dir
    from kdpipe.pipeline.console import shown_path as p

    lines = [f"done: job {plan.job.name}"]
    if plan.runs or not plan.rounds:  # an on-policy-only job has no off-policy store
        lines.append(f"  store    {p(plan.store.path)}")
    outs = [(r.name, plan.run_dir_of(r)) for r in plan.runs]
    for rp in plan.rounds:
        lines.append(f"  round {rp.index}  store {p(rp.store)}")
        outs.append((f"onpolicy-r{rp.index}", rp.run))
    for name, out in outs:
        lines.append(f"  run      {name}: {p(out)}  (student: {p(out / 'final')})")
        report = out / "eval" / "report.md"
        if report.is_file():
            lines.append(f"  report   {name}: {p(report)}")
    lines.append(f"  logs     {p(logs_dir(plan))}  (summary: {p(plan.job.run_dir / 'run.json')})")
    return "\n".join(lines)


def _run(job_file: str, run_dir: str | None, stream: bool) -> None:
    from kdpipe.jobs.local import run_plan

    plan = _plan(job_file, run_dir)
    run_plan(plan, stream=stream, echo=click.echo)
    click.echo(outputs_summary(plan))


@click.command()
@JOB
@RUN_DIR
@click.option("--stream/--quiet", default=False, help="Also print each step's output here (it always goes to RUN_DIR/logs).  [default: --quiet]")
def run(job_file: str, run_dir: str | None, stream: bool) -> None:
    """Run JOB_FILE's chain on this machine, in order (generate tasks, finalize, students, evaluation)."""
    run_command(_run, job_file, run_dir, stream)


def _submit(job_file: str, run_dir: str | None, dry_run: bool, sbatch: str) -> None:
    from kdpipe.jobs.submit import submit_plan

    submit_plan(_plan(job_file, run_dir), dry_run=dry_run, sbatch=sbatch, echo=click.echo)


@click.command()
@JOB
@RUN_DIR
@click.option("--dry-run", is_flag=True, help="Print the plan and the sbatch scripts; write and submit nothing.  [default: off]")
@click.option("--sbatch", default="sbatch", show_default=True, help="The sbatch program to call.")
def submit(job_file: str, run_dir: str | None, dry_run: bool, sbatch: str) -> None:
    """Submit JOB_FILE to Slurm: generation array -> finalize -> student runs -> evaluations (afterok)."""
    run_command(_submit, job_file, run_dir, dry_run, sbatch)


def _status(run_dir: str, as_json: bool) -> None:
    from kdpipe.jobs.status import collect_status, format_status

    st = collect_status(run_dir)
    click.echo(json.dumps(st, indent=2, default=str) if as_json else format_status(st))


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.  [default: off]")
def status(run_dir: str, as_json: bool) -> None:
    """The state of each job of a chain, the store's progress and each run's last metrics."""
    run_command(_status, run_dir, as_json)
