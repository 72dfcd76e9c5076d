"""`kdpipe evaluate`: parse EvalConfig (defaults < --config TOML < flags), call evaluate(), print the headline."""

from __future__ import annotations

import click


@click.command("evaluate")
@click.option("--model", "models", multiple=True, help="Model folder, hub id, or training run folder (RUN means RUN/final). Repeat; the first is the teacher unless --teacher.")
@click.option("--name", "names", multiple=True, help="Display name per --model, in the same order.")
@click.option("--data", help="JSONL evaluation data (document and reference fields).")
@click.option("--out", help="Report folder: report.json, report.md, *.png, outputs.jsonl.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML with EvalConfig keys; flags override it.")
@click.option("--teacher", help="Name or path of the teacher among the models (default: the first).")
@click.option("--baseline", help="Name or path of the CE-only baseline student among the models.")
@click.option("--store", "stores", multiple=True, help="Store folder whose cache key the report records (repeatable).")
@click.option("--split", help="Keep rows whose split field equals this ('' = every row; default heldout).")
@click.option("--document-field", help="Field with the source document (default document).")
@click.option("--reference-field", help="Field with the reference summary (default summary).")
@click.option("--max-samples", type=int, help="Evaluate only the first N rows.")
@click.option("--max-new-tokens", type=int, help="Generation length cap (same for every model).")
@click.option("--temperature", type=float, help="0 = greedy (default).")
@click.option("--max-model-len", type=int, help="Engine context length (same for every model).")
@click.option("--dtype", help="Engine dtype (default float32).")
@click.option("--tensor-parallel-size", type=int, help="vLLM tensor parallel size for every model.")
@click.option("--seed", type=int, help="Engine and bootstrap seed.")
@click.option("--latency-requests", type=int, help="Prompts timed one request at a time (default: all).")
@click.option("--similarity-model", help="sentence-transformers model path or id ('default' = bundled all-MiniLM-L6-v2, 'none' = skip).")
@click.option("--nli-model", help="NLI sequence classifier path or id (its labels must name entailment).")
@click.option("--bootstrap-samples", type=int, help="Bootstrap resamples for the confidence intervals.")
@click.option("--chat-template/--no-chat-template", "use_chat_template", default=None, help="Wrap prompts in the models' chat template (default on).")
@click.option("--plots/--no-plots", default=None, help="Write PNG plots (default on).")
def evaluate(models, names, config_path, stores, **flags):
    """Generate with each model on the same prompts and score it against the teacher.

    ROUGE-1/2/L/Lsum with bootstrap CIs, embedding similarity, NLI consistency (with --nli-model),
    per-request latency and tokens/s, speed-up and retention vs the teacher and a CE-only baseline.
    """
    from kdpipe.pipeline.cli import run_command
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.evaluate.report import headline_table
    from kdpipe.pipeline.evaluate.run import evaluate as run_evaluate

    overrides = dict(flags)
    # Repeated options given on the command line replace the TOML list; absent ones leave it.
    overrides["models"] = list(models) or None
    overrides["names"] = list(names) or None
    overrides["stores"] = list(stores) or None
    cfg = run_command(load_config, EvalConfig, config_path, overrides)
    report = run_command(run_evaluate, cfg)
    click.echo(headline_table(report))
    click.echo(f"report: {cfg.out}/report.md (numbers in {cfg.out}/report.json)")
    from kdpipe.pipeline.shutdown import exit_process

    exit_process(0)  # the report is written: exit 0 whatever vLLM's teardown would do (shutdown.py)
