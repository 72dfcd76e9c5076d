"""`kdpipe demo`: the click command over jobs/demo.py (imported only when the command runs, like every
command: jobs/demo.py sets the thread environment before torch loads)."""

from __future__ import annotations

from pathlib import Path

import click

from kdpipe.jobs.demo import BUDGETS, DemoConfig, run_demo, what_it_means


@click.command("demo")
@click.option("--out", default=None, help="Output folder (models, store, runs, report, logs).  [default: demo-output]")
@click.option("--budget", type=click.Choice(list(BUDGETS)), default=None, help="small (CI), default (make demo), large.  [default: default]")
@click.option("--seed", type=int, default=None, help="Seed for models, data subsets, training and generation.  [default: 0]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="TOML with DemoConfig keys.  [default: none]")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Show every step's output (engines, warnings) instead of one line per stage.  [default: off]")
def demo(out, budget, seed, config_path, verbose):
    """The whole pipeline on CPU, on Debian package descriptions: a tiny teacher trained on every training pair,
    phase one, three students on a small transfer set (sft_ref, seqkd, kd), evaluation on held-out documents."""
    from kdpipe.pipeline.cli import run_command
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.evaluate.report import headline_table

    cfg = run_command(load_config, DemoConfig, config_path, {"out": out, "budget": budget, "seed": seed})
    report = run_command(run_demo, cfg, lambda s: click.echo(s, err=True), verbose)
    click.echo("")
    click.echo(headline_table(report))
    click.echo("")
    click.echo(what_it_means(report, cfg.top_k))
    click.echo(f"\nreport: {Path(cfg.out).resolve() / 'report' / 'report.md'}  (demo took {report['demo_seconds']:.0f} s)")
