"""The `kdpipe` command: a thin click group.

Each subcommand lives beside the library code it calls and is imported only when used, so
`kdpipe --help` and `kdpipe inspect` do not pay for importing torch or vLLM.
"""

from __future__ import annotations

import importlib

import click

# name -> ("module:attribute" of a click.Command, one-line help shown by `kdpipe --help`)
COMMANDS = {
    "generate-logits": ("kdpipe.pipeline.generate.command:generate_logits", "Phase one: the teacher under vLLM writes its targets into a store."),
    "finalize": ("kdpipe.storage.command:finalize", "Merge the per-task manifests of a store once every task is done."),
    "inspect": ("kdpipe.storage.command:inspect", "Summarize a store; --verify re-checks every shard."),
    "export": ("kdpipe.storage.interop_command:export", "Write a store as Parquet or axolotl's KD dataset layout."),
    "import": ("kdpipe.storage.interop_command:import_", "Build a store from vLLM log-prob responses or an axolotl KD dataset."),
    "train-student": ("kdpipe.pipeline.train.command:train_student", "Phase two: stream one or more stores into student training."),
    "evaluate": ("kdpipe.pipeline.evaluate.command:evaluate", "Generate with each model and score it against the teacher."),
    "demo": ("kdpipe.pipeline.demo:demo", "The whole pipeline on a tiny built-in teacher, on CPU."),
    "check": ("kdpipe.jobs.command:check", "Validate a job file and print its resolved plan."),
    "run": ("kdpipe.jobs.command:run", "Run a job file's chain locally, in order."),
    "submit": ("kdpipe.jobs.command:submit", "Submit a job file to SLURM as a dependency chain."),
    "status": ("kdpipe.jobs.command:status", "Show the state of a submitted chain."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Static help texts: listing the commands must not import every one of them.
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdpipe")
def main() -> None:
    """kdpipe: offline knowledge distillation for LLMs.

    Phase one (generate-logits) runs the teacher under vLLM into a store of zstd Arrow
    shards; phase two (train-student) streams that store into student training.
    """


def run_command(fn, *args, **kwargs):
    """Call a library function from a command; a KdpipeError becomes a clear one-line error."""
    from kdpipe.storage.errors import KdpipeError

    try:
        return fn(*args, **kwargs)
    except KdpipeError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
