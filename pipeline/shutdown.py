"""Ending work that ran a vLLM engine: explicit teardown, then an exit status that is the work's own.

Every command that starts an engine (generate-logits, evaluate, demo) ends through here:

  shutdown_llm(llm)   stops the engine now, while the interpreter is whole: the engine-core
                      client's shutdown (its processes joined, its sockets and output thread
                      closed), then any child process the engine left is joined (terminated
                      after a grace period), and the LLM object is dropped and collected.
  exit_process(code)  flushes and closes what Python would flush at exit (logging handlers,
                      stdout, stderr), then ends the process with `code` by os._exit.

Why os._exit: with vLLM 0.32 / torch 2.13 (CPU), a process whose work had finished, whose store
was sealed and whose summary line was printed sometimes died during interpreter teardown with
"terminate called without an active exception" (SIGABRT, exit status 134), about half the runs
at top-k 64 (issue 11). The abort happens in native teardown (a C++ std::thread still joinable
when its owner is destroyed), after every byte of kdpipe's work is on disk, and a bare vLLM
script shows it too. A SLURM chain reads the exit status, so a finished task that exits 134
stops `afterok` dependents. Once everything is flushed there is nothing left for the normal
teardown to do that matters, so the process ends with the status of its work: 0 when the work
finished, 143 after SIGTERM (the task is incomplete; a rerun resumes), non-zero on failure.

The hard exit applies only when this process IS the kdpipe command (the console script or
`python -m kdpipe.pipeline.cli`) and imported vLLM; inside a test runner or a user's own program
calling the same click command, `exit_process` raises SystemExit as usual.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import NoReturn

CHILD_JOIN_S = 10.0  # grace for the engine's child processes after its shutdown returned


def shutdown_llm(llm) -> None:
    """Stop a `vllm.LLM` now: engine core shut down, its processes joined, the object collected.

    Only this engine's processes are joined: another engine in the same process (a test's shared
    teacher, the on-policy sampler) keeps running.
    """
    if llm is None:
        return
    procs: list = []
    try:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        procs = list(getattr(manager, "processes", None) or [])
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    finally:
        del llm
        gc.collect()
        _join(procs)


def _join(procs, timeout: float = CHILD_JOIN_S) -> None:
    """Join processes; terminate (then kill) the ones still alive after `timeout`."""
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)


def join_children(timeout: float = CHILD_JOIN_S) -> None:
    """Join every multiprocessing child still alive (the process is ending)."""
    _join(multiprocessing.active_children(), timeout)


def _is_kdpipe_process() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "kdpipe.pipeline.cli":
        return True  # python -m kdpipe.pipeline.cli
    return Path(getattr(main, "__file__", "") or "").name == "kdpipe"  # the console script


def exit_process(code: int = 0) -> NoReturn:
    """End the command with `code` (see the module doc for why this may be os._exit)."""
    if not ("vllm" in sys.modules and _is_kdpipe_process()):
        sys.exit(code)
    join_children()
    logging.shutdown()  # flushes and closes every handler (log files under STORE/logs included)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    # The work is on disk and reported; skip the native teardown that can abort (module doc).
    os._exit(code)
