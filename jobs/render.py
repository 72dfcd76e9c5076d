"""Fill the sbatch templates of kdpipe.slurm (slurm/*.sbatch) safely.

A template holds `{{name}}` placeholders. Values come in two kinds:
- words: any string (paths, names, numbers); the renderer shell-quotes each one with
  shlex.quote, so a path with spaces, quotes, `$()` or backticks stays one literal word;
- blocks: whole lines built by this package from words it quoted itself (a command line, the
  #SBATCH lines whose values spec.py validated) or, for `setup`, the job file's own shell
  lines, which are meant to run as commands (module load, source venv/bin/activate).
Every placeholder must be given and every given value must be used, so a template and its
caller cannot drift apart silently.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from typing import Iterable, Mapping

PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# Marks the array task index inside an argv; becomes "$SLURM_ARRAY_TASK_ID" in a script.
TASK_ID = "\0TASK_ID\0"


def template_text(name: str) -> str:
    return resources.files("kdpipe.slurm").joinpath(f"{name}.sbatch").read_text(encoding="utf-8")


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def render(name: str, words: Mapping[str, str], blocks: Mapping[str, str]) -> str:
    text = template_text(name)
    wanted = placeholders(text)
    given = set(words) | set(blocks)
    if set(words) & set(blocks):
        raise ValueError(f"{name}.sbatch: {sorted(set(words) & set(blocks))} given both as word and block")
    if wanted != given:
        raise ValueError(
            f"slurm/{name}.sbatch: placeholders {sorted(wanted - given)} not filled, values {sorted(given - wanted)} unused"
        )
    values = {k: shlex.quote(str(v)) for k, v in words.items()}
    values.update(blocks)
    rendered = PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    # Empty blocks leave blank lines; drop runs of them so the script reads cleanly.
    return re.sub(r"\n{3,}", "\n\n", rendered)


def shell_command(argv: Iterable[str], task_var: str = "SLURM_ARRAY_TASK_ID") -> str:
    """An argv as one shell line: every word quoted; the TASK_ID marker becomes "$task_var"."""
    out = []
    for a in argv:
        if a == TASK_ID:
            out.append(f'"${task_var}"')
        elif TASK_ID in a:
            raise ValueError("TASK_ID must be a whole argument")
        else:
            out.append(shlex.quote(a))
    return " ".join(out)


def local_argv(argv: Iterable[str], task_index: int | None) -> list[str]:
    """An argv for subprocess (no shell): the TASK_ID marker becomes the task number."""
    return [str(task_index) if a == TASK_ID else a for a in argv]


def events_block(events_file: str) -> str:
    """A shell function appending `<unix time> <what> <phase> <task> [rc]` lines to the run's events log."""
    return (
        "kdpipe_event() { printf '%s %s\\n' \"$(date +%s.%N)\" \"$*\" >> "
        + shlex.quote(events_file)
        + "; }"
    )
