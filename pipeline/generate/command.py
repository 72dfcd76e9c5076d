"""`kdpipe generate-logits`: flags and `--config FILE.toml` fill one GenerateConfig, then one call.

Every GenerateConfig field is a flag (`top_k` -> `--top-k`, booleans as `--x/--no-x`); the
options, their help and defaults are generated from the dataclass (its field comments), so the
two cannot drift apart. Precedence:
dataclass defaults < TOML file (flat keys, or a [generate] table) < flags given.
"""

from __future__ import annotations

import click

from kdpipe.pipeline.cli import config_options, flag_names, given, run_command
from kdpipe.pipeline.generate.config import GenerateConfig


def load_generate_config(config_path: str | None, overrides: dict) -> GenerateConfig:
    """defaults < TOML (flat, or its [generate] table) < flags given."""
    from kdpipe.pipeline.config import load_config, read_toml

    section = None
    if config_path is not None:
        data = read_toml(config_path)
        if isinstance(data.get("generate"), dict):
            section = "generate"
    return load_config(GenerateConfig, config_path, overrides, section=section,
                       flag_names=flag_names(GenerateConfig), command="generate-logits")


@click.command("generate-logits", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file with any of these options (flags given here override it).  [default: none]")
@click.option("-v", "--verbose", is_flag=True, default=False,
              help="Show the engine's own log (vLLM) here instead of only in STORE/logs/.  [default: false]")
@config_options(GenerateConfig)
def generate_logits(config_path: str | None, verbose: bool, **flags) -> None:
    """Phase one: the teacher reads DATA once and writes its targets into the store OUT.

    Example: kdpipe generate-logits --teacher Qwen/Qwen2.5-7B-Instruct --data docs.jsonl
    --recipe summarize --out store/ --codec topk --top-k 64
    """
    from kdpipe.pipeline.generate.run import generate_logits as run

    def go():
        cfg = load_generate_config(config_path, given(flags))
        return run(cfg, verbose=verbose)

    from kdpipe.pipeline.shutdown import exit_process

    try:
        summary = run_command(go)
    except KeyboardInterrupt:  # Ctrl-C before the run loop (loading, engine start): nothing is lost either
        click.echo("generate-logits INTERRUPTED before the task finished (rerun the same command to continue)", err=True)
        exit_process(143)
    click.echo(summary.line())
    # 143 after SIGTERM or Ctrl-C, so a job chain does not go on to `kdpipe finalize` (the rerun resumes);
    # 0 once the task is done, whatever vLLM's teardown would do (see kdpipe.pipeline.shutdown).
    exit_process(143 if summary.interrupted else 0)
