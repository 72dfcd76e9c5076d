"""`kdpipe train-student`: parse TrainConfig (defaults < --config TOML < flags), call trainer.train.

Every TrainConfig field is a flag (`--tail-mode`, `--grad-accum`, `--lora/--no-lora`, …), generated
from the dataclass so the two never drift apart; `--store` may be repeated.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing

import click

from kdpipe.pipeline.cli import run_command
from kdpipe.pipeline.train.config import TrainConfig

HELP = {
    "student": "Student model: AutoModelForCausalLM hub id or local path.",
    "stores": "A finalized store directory; repeat --store to mix several.",
    "out": "Run directory: checkpoints, final/, metrics.jsonl, train_config.toml.",
    "store_weights": "Mixing weight per store, comma-separated (default: equal).",
    "alpha": "loss = alpha*CE + (1-alpha)*T^2*D; 1.0 = CE only (sequence-level).",
    "temperature": "T: student softmax(z/T) over the vocabulary; teacher tempered over its stored categories.",
    "divergence": "D(teacher_T || student_T).",
    "jsd_beta": "beta of generalized_jsd, in (0, 1).",
    "tail_mode": "topk stores: the tail mass as one category (bucket) or top-k renormalized.",
    "tokens_per_batch": "Padded tokens per micro-batch per rank.",
    "grad_accum": "Micro-batches per optimizer step per rank.",
    "truncate": "Cut sequences longer than the student's context (counted) instead of refusing.",
    "fsdp": "FSDP2 (fully_shard) instead of DDP under torchrun.",
    "resume": "Continue from the newest RUN/checkpoint-STEP.",
    "val_stores": "A finalized store read only for validation; repeat --val-store for several.",
    "val_fraction": "Hold out this share of the training stores' sample ids (seeded hash) for validation.",
    "val_split_seed": "Seed of the --val-fraction split (default: --seed).",
    "eval_every": "Validate every N optimizer steps (0 = only after the last step).",
    "save_best": "Keep RUN/best at the lowest validation --best-metric (RUN/best/best.json names the step).",
    "best_metric": "Validation figure that --save-best minimizes.",
}
# Repeatable flags for tuple-of-paths fields: field -> flag name.
REPEATABLE = {"stores": "store", "val_stores": "val_store"}


def _options(f):
    """Decorate `f` with one click option per TrainConfig field (all optional: None = not given)."""
    hints = typing.get_type_hints(TrainConfig)
    for fld in reversed(dataclasses.fields(TrainConfig)):
        tp = hints[fld.name]
        name = REPEATABLE.get(fld.name, fld.name)
        flag = "--" + name.replace("_", "-")
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        kw: dict = {"default": None, "help": HELP.get(fld.name, "")}
        if tp is bool:
            decl = [f"{flag}/--no-{name.replace('_', '-')}"]
        elif origin is typing.Literal:
            decl, kw["type"] = [flag], click.Choice(list(args))
        elif fld.name in REPEATABLE:
            decl, kw["multiple"], kw["default"] = [flag, fld.name], True, ()
        else:
            inner = [a for a in args if a is not type(None)]
            base = inner[0] if origin in (typing.Union, types.UnionType) else tp
            decl = [flag]
            kw["type"] = {int: int, float: float}.get(base, str)
        f = click.option(*decl, **kw)(f)
    return f


@click.command("train-student")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file with any TrainConfig key; flags given on the command line win.")
@_options
def train_student(config_path, **flags):
    """Phase two: stream one or more stores into student training.

    loss = alpha * CE(student, target tokens) + (1 - alpha) * T^2 * D(teacher_T || student_T),
    per target token. Example:

      kdpipe train-student --student ./student --store ./store --out ./run --alpha 0.5 --temperature 2
    """
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.train.trainer import train

    overrides = {k: v for k, v in flags.items() if v is not None and v != ()}
    cfg = run_command(load_config, TrainConfig, config_path, overrides)
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
