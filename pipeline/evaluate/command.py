"""`kdpipe evaluate`: parse EvalConfig (defaults < --config TOML < flags), call evaluate(), print the headline.

Every EvalConfig field is a flag, generated with its help and default from the dataclass (its
field comments); `--model`, `--name` and `--store` may be repeated. The old `--document-field`
and `--reference-field` still work, with a warning: phase one, evaluate and job files all say
`--text-field` / `--target-field`.
"""

from __future__ import annotations

import warnings

import click

from kdpipe.pipeline.cli import config_options, flag_names, given
from kdpipe.pipeline.evaluate.config import EvalConfig

# Repeatable flags: field -> flag name (each use adds one entry).
REPEATABLE = {"models": "model", "names": "name", "stores": "store"}
RENAME = {**REPEATABLE, "use_chat_template": "chat_template"}


@click.command("evaluate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML with EvalConfig keys; flags override it.  [default: none]")
@click.option("-v", "--verbose", is_flag=True, default=False,
              help="Show the engines' own log (vLLM) here instead of only in OUT/logs/.  [default: false]")
@click.option("--document-field", "old_document_field", hidden=True, help="Old name of --text-field.")
@click.option("--reference-field", "old_reference_field", hidden=True, help="Old name of --target-field.")
@config_options(EvalConfig, rename=RENAME, multiple=tuple(REPEATABLE))
def evaluate(config_path, verbose, old_document_field, old_reference_field, **flags):
    """Generate with each model on the same prompts and score it against the teacher.

    ROUGE-1/2/L/Lsum with bootstrap CIs, embedding similarity, NLI consistency (with --nli-model),
    per-request latency and tokens/s, speed-up and retention vs the teacher and a CE-only baseline.

    Example: kdpipe evaluate --model teacher/ --model run/ --data heldout.jsonl --out report/
    """
    from kdpipe.pipeline.cli import run_command
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.evaluate.report import headline_table
    from kdpipe.pipeline.evaluate.run import evaluate as run_evaluate

    for old, new, value in (("--document-field", "text_field", old_document_field),
                            ("--reference-field", "target_field", old_reference_field)):
        if value is not None:
            flag = "--" + new.replace("_", "-")
            warnings.warn(f"{old} is the old name of {flag}; it still works, but use {flag}", FutureWarning, stacklevel=1)
            if flags.get(new) is not None:
                raise click.UsageError(f"both {old} (old name) and {flag} are given; keep only {flag}")
            flags[new] = value
    cfg = run_command(load_config, EvalConfig, config_path, given(flags),
                      flag_names=flag_names(EvalConfig, RENAME), command="evaluate")
    report = run_command(run_evaluate, cfg, verbose=verbose)
    click.echo(headline_table(report))
    click.echo(f"report: {cfg.out}/report.md (numbers in {cfg.out}/report.json)")
    from kdpipe.pipeline.shutdown import exit_process

    exit_process(0)  # the report is written: exit 0 whatever vLLM's teardown would do (shutdown.py)
