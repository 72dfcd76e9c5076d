"""What a person sees: kdpipe's own progress and summary; the engine's log goes to a file.

vLLM logs ~80 INFO/WARNING lines for a one-second generation, from the calling process and from
its engine-core and worker processes (which inherit the file descriptors, not Python's
sys.stdout), plus Triton/FutureWarning noise from its imports. So while an engine lives, file
descriptors 1 and 2 point at a log file beside the output (STORE/logs/, REPORT/logs/): every
process's output lands there, whole and in order, and kdpipe's progress bar writes to a copy of
the terminal's stderr it kept. `--verbose` leaves the descriptors alone (everything on screen).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import IO, Iterator


def shown_path(path: str | os.PathLike) -> str:
    """A path as a person can open it from here: normalized (no `jobs/../x`), relative to the working
    directory when it lies below it, else absolute."""
    p = Path(os.path.normpath(os.path.abspath(path)))
    try:
        return str(p.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(p)


@contextlib.contextmanager
def engine_output(log_path: str | os.PathLike, verbose: bool = False) -> Iterator[IO[str]]:
    """Route fds 1/2 (this process and every child started inside) to `log_path`; yield the console.

    The yielded stream is the terminal's stderr, for progress bars and kdpipe's own lines. The
    descriptors are restored on exit, also on an exception, so the error is printed on screen.
    """
    if verbose:
        yield sys.stderr
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    saved = [os.dup(1), os.dup(2)]
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(log_path, "ab")
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield console
    finally:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
        console.close()


# A Python exception line as tracebacks print it, possibly behind a log prefix ("(EngineCore pid=1) ERROR ... ").
_EXC_LINE = re.compile(r"(?:^|\s)((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (\S.*)$")
# Wrappers that only say "it failed elsewhere": the cause is an earlier line.
_WRAPPERS = ("Engine core initialization failed", "See root cause above", "EngineDeadError", "EngineCore encountered")


def root_cause(log_path: str | os.PathLike | None, offset: int, exc: BaseException) -> str:
    """One line: the first exception the engine's log records after byte `offset` (the engine's own processes
    print their tracebacks there, the calling process only gets "initialization failed"), else `exc`'s."""
    text = ""
    if log_path is not None and Path(log_path).is_file():
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        m = _EXC_LINE.search(line.strip())
        if m and not any(w in line for w in _WRAPPERS):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
