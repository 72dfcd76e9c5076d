"""`kdpipe train-student`: parse TrainConfig (defaults < --config TOML < flags), call trainer.train.

Every TrainConfig field is a flag (`--tail-mode`, `--grad-accum`, `--lora/--no-lora`, …), generated
with its help and default from the dataclass (its field comments) so the two never drift apart;
`--store` may be repeated.
"""

from __future__ import annotations

import os

import click

from kdpipe.pipeline.cli import config_options, flag_names, given, run_command
from kdpipe.pipeline.train.config import TrainConfig

# Repeatable flags for tuple-of-paths fields: field -> flag name.
REPEATABLE = {"stores": "store", "val_stores": "val_store"}


@click.command("train-student")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file with any TrainConfig key; flags given on the command line win.  [default: none]")
@config_options(TrainConfig, rename=REPEATABLE, multiple=tuple(REPEATABLE))
def train_student(config_path, **flags):
    """Phase two: stream one or more stores into student training.

    loss = alpha * CE(student, target tokens) + (1 - alpha) * T^2 * D(teacher_T || student_T),
    per target token. Example:

      kdpipe train-student --student ./student --store ./store --out ./run --alpha 0.5 --temperature 2
    """
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.train.trainer import train

    names = flag_names(TrainConfig, REPEATABLE)
    cfg = run_command(load_config, TrainConfig, config_path, given(flags), flag_names=names, command="train-student")
    result = run_command(train, cfg)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    if result.interrupted:
        click.echo(f"interrupted at step {result.steps}: checkpoint written in {result.run}; continue with --resume")
    else:
        last = result.last or {}
        click.echo(f"done: {result.steps} steps, final student in {result.final} (last loss {last.get('loss', float('nan')):.4f})")
        if result.best is not None:
            click.echo(f"best: step {result.best['step']} (validation {result.best['metric']} "
                       f"{result.best['value']:.4f}) in {result.run / 'best'}")
