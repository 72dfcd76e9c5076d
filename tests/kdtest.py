"""Test support importable from any test folder (a module name no conftest.py can shadow).

In CI (`CI=true`) a missing vLLM or Slurm is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str, why: str) -> None:
    """Skip locally when an optional component is missing; fail in CI, where it must exist."""
    try:
        __import__(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"{module} is required in CI ({why}): {e}")
        pytest.skip(f"{module} not installed ({why})")


class BackgroundDemo:
    """`kdpipe demo --budget small` in a subprocess started early, at lower CPU priority.

    Why: the demo test waits ~7 min on a quiet 2-core machine for one subprocess, most of whose
    work (tiny-model training steps, tokenization, engine spawns) keeps about one core busy, as do
    most tests of the suite. Started when collection ends (tests/conftest.py) at nice +10, it
    takes the cycles the foreground tests leave idle and yields the rest; its tests run last and
    wait only for what is left. Output goes to files (nothing has to read a pipe meanwhile).
    """

    TIMEOUT_S = 3000  # from its start, as the fixture's subprocess.run timeout was

    def __init__(self, out) -> None:
        import subprocess
        import sys
        import time
        from pathlib import Path

        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._stdout = self.out.parent / "demo.stdout"
        self._stderr = self.out.parent / "demo.stderr"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with open(self._stdout, "wb") as so, open(self._stderr, "wb") as se:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kdpipe.pipeline.cli", "demo", "--budget", "small", "--out", str(self.out)],
                stdout=so, stderr=se, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=lambda: os.nice(10))
        self.started = time.monotonic()

    def result(self) -> tuple[int, str, str]:
        """Wait for the demo (up to TIMEOUT_S from its start) -> (exit status, stdout, stderr)."""
        import subprocess
        import time

        try:
            rc = self.proc.wait(timeout=max(1.0, self.TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return rc, self._stdout.read_text(errors="replace"), self._stderr.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the demo and its engine processes if they still run (an interrupted session)."""
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


DEMO_KEY = pytest.StashKey[BackgroundDemo]()  # config.stash: the session's demo (tests/conftest.py)
