"""`kdpipe tiny-model OUT --train-on FILE`: a small local teacher (or student start) in a minute on CPU.

Flags and `--config FILE.toml` fill one TinyTeacherConfig (pipeline/tiny.py), then one call: the
tokenizer and the Llama are built with pipeline/tiny.py's builders and trained with
pipeline/lm_train.py's loop (the project's one causal-LM training loop).
"""

from __future__ import annotations

import click

from kdpipe.pipeline.cli import config_options, flag_names, given, run_command
from kdpipe.pipeline.tiny import TinyTeacherConfig


@click.command("tiny-model", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML file with any of these options (flags given here override it).  [default: none]")
@config_options(TinyTeacherConfig, skip=("out",))
def tiny_model(out: str, config_path: str | None, **flags) -> None:
    """Build a tiny Llama and its tokenizer in OUT, trained briefly on FILE's (document, summary) pairs.

    A local teacher for trying the pipeline on CPU (no download). Example:

      kdpipe tiny-model teacher/ --train-on docs.jsonl --text-field document
      kdpipe tiny-model student/ --train-on docs.jsonl --text-field document --layers 1 --steps 0
    """
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.tiny import train_tiny_model

    cfg = run_command(load_config, TinyTeacherConfig, config_path, {**given(flags), "out": out},
                      flag_names=flag_names(TinyTeacherConfig), command="tiny-model")
    path = run_command(train_tiny_model, cfg, lambda line: click.echo(line, err=True))
    click.echo(f"tiny-model: {cfg.layers} layers x {cfg.hidden}, vocabulary {cfg.vocab}, context {cfg.context}, "
               f"{cfg.steps} training steps; model in {path}")
