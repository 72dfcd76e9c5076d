"""The `kdpipe` command: a thin click group.

Each subcommand lives beside the library code it calls and is imported only when used, so
`kdpipe --help` and `kdpipe inspect` do not pay for importing torch or vLLM.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any, Mapping

import click

# name -> ("module:attribute" of a click.Command, one-line help shown by `kdpipe --help`)
COMMANDS = {
    "generate-logits": ("kdpipe.pipeline.generate.command:generate_logits", "Phase one: the teacher under vLLM writes its targets into a store."),
    "finalize": ("kdpipe.pipeline.store_command:finalize", "Merge the per-task manifests of a store once every task is done."),
    "inspect": ("kdpipe.pipeline.store_command:inspect", "Summarize a store; --verify re-checks every shard."),
    "export": ("kdpipe.pipeline.interop_command:export", "Write a store as Parquet or axolotl's KD dataset layout."),
    "import": ("kdpipe.pipeline.interop_command:import_", "Build a store from vLLM log-prob responses or an axolotl KD dataset."),
    "train-student": ("kdpipe.pipeline.train.command:train_student", "Phase two: stream one or more stores into student training."),
    "evaluate": ("kdpipe.pipeline.evaluate.command:evaluate", "Generate with each model and score it against the teacher."),
    "demo": ("kdpipe.jobs.demo_command:demo", "The whole pipeline on a tiny built-in teacher, on CPU."),
    "tiny-model": ("kdpipe.pipeline.tiny_command:tiny_model", "A tiny local Llama trained briefly on your JSONL: a teacher for trying things on CPU."),
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

    \b
    Start here:
      kdpipe demo                      the whole pipeline on a tiny teacher, on CPU (minutes)
    or, with your own teacher, student and JSONL data, in this order:
      kdpipe generate-logits --teacher T --data docs.jsonl --out store/
      kdpipe finalize store/
      kdpipe train-student --student S --store store/ --out run/
      kdpipe evaluate --model T --model run/ --data heldout.jsonl --out report/

    Every command has --help (every option with its default) and takes --config FILE.toml.
    """


# --------------------------------------------------------------------------- options from configs


def flag_name(field: str, rename: Mapping[str, str] | None = None) -> str:
    """The command-line flag of a config field: `top_k` -> `--top-k` (or its renamed flag)."""
    return "--" + (rename or {}).get(field, field).replace("_", "-")


def flag_names(cls: type, rename: Mapping[str, str] | None = None) -> dict[str, str]:
    return {f.name: flag_name(f.name, rename) for f in dataclasses.fields(cls) if f.init}


def _click_type(tp: Any, name: str):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _click_type(args[0], name) if len(args) == 1 else str
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(tp)])
    if origin in (tuple, list):
        return str  # comma-separated on the command line; the config coerces each item
    return {int: int, float: float, str: str, bool: bool}.get(tp, str)


def option_help(cls: type, field: dataclasses.Field) -> str:
    """A field's description (its source comment) and default, as `--help` shows it."""
    from kdpipe.pipeline.config import field_default, field_help, format_default

    text = field_help(cls).get(field.name, "").strip()
    if text and text[-1] not in ".?!)":
        text += "."
    return f"{text}  [default: {format_default(field_default(field))}]".strip()


def config_options(
    cls: type,
    rename: Mapping[str, str] | None = None,
    multiple: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
):
    """Decorate a click command with one option per field of the config dataclass `cls`.

    Flags follow the field names (`top_k` -> `--top-k`, booleans as `--x/--no-x`); `rename`
    gives a field another flag (`stores` -> `--store`), `multiple` fields take the flag
    repeatedly. Help and defaults come from the dataclass (see `option_help`), so a field
    added later gets its flag, description and default without touching the command. Every
    option defaults to None ("not given"): only given flags override the TOML file.
    """

    def decorate(fn):
        hints = typing.get_type_hints(cls)
        for f in reversed(dataclasses.fields(cls)):
            if not f.init or f.name in skip:
                continue
            tp = hints[f.name]
            flag = flag_name(f.name, rename)
            kw: dict[str, Any] = {"default": None, "help": option_help(cls, f)}
            if tp is bool:
                decls = [f"{flag}/--no-{flag[2:]}", f.name]
            elif f.name in multiple:
                decls, kw["multiple"], kw["default"] = [flag, f.name], True, ()
            else:
                decls, kw["type"] = [flag, f.name], _click_type(tp, f.name)
            fn = click.option(*decls, **kw)(fn)
        return fn

    return decorate


def given(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The options actually given on the command line (None / () = not given)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items() if v is not None and v != ()}


def run_command(fn, *args, **kwargs):
    """Call a library function from a command; a KdpipeError becomes a clear one-line error."""
    from kdpipe.storage.errors import KdpipeError

    try:
        return fn(*args, **kwargs)
    except KdpipeError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
