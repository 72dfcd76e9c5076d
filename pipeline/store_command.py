"""`kdpipe finalize STORE` and `kdpipe inspect STORE`: thin commands over the storage library."""

from __future__ import annotations

import json

import click

from kdpipe.pipeline.cli import run_command


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--num-tasks", type=int, default=None, help="Tasks expected.  [default: the number the tasks recorded]")
def finalize(store: str, num_tasks: int | None) -> None:
    """Merge the per-task manifests of STORE into manifest.json once every task is complete."""
    from kdpipe.storage.finalize import finalize_store

    m = run_command(finalize_store, store, num_tasks=num_tasks)
    click.echo(f"{store}: finalized {len(m['shards'])} shards, {m['num_sequences']} sequences, "
               f"{m['num_target_tokens']} target tokens (cache key {m['cache_key'][:16]}…)")


@click.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Re-check every shard's checksum, schema and columns.  [default: off]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.  [default: off]")
def inspect(store: str, verify: bool, as_json: bool) -> None:
    """Summarize STORE; exits non-zero naming each bad shard and what is wrong."""
    from kdpipe.storage.inspect import format_report, inspect_store

    report = run_command(inspect_store, store, verify=verify)
    click.echo(json.dumps(report) if as_json else format_report(report))
    if not report["ok"]:
        bad = "; ".join(f"{p['shard']}: {p['problem']}" for p in report["problems"])
        raise click.ClickException(f"{store}: {len(report['problems'])} bad shard(s): {bad}")
