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


class BackgroundLane:
    """The session's long, self-contained CLI tests, run in background threads (WIDTH at a time, nice +10).

    Why: the suite shares 2 cores, and most of its tests keep about one busy. A test module that defines
    `BACKGROUND_JOB(root) -> result` (a function that only runs kdpipe's command line in subprocesses, through
    `run_in_lane`) has it started here when collection ends (tests/conftest.py); its tests run last and read
    the result through the `background_job` fixture, waiting only for what is left of it. The jobs take the
    cycles the foreground tests leave idle; the lane runs WIDTH jobs at a time, so memory stays bounded. What
    each job runs, and every assertion about it, is unchanged: the job's exceptions are raised in its tests.
    """

    TIMEOUT_S = 3000  # per job, from the lane's start (a job waits behind the jobs before it)
    # Jobs at a time. Measured on 2 cores (575 tests, CI=true): one at a time 1,235 s (the suite before the lane,
    # with the demo alone in the background: 1,325 s).
    WIDTH = 2

    def __init__(self) -> None:
        import threading
        import time
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(self.WIDTH, thread_name_prefix="kd-lane")
        self._jobs: dict = {}
        self._procs: set = set()
        self._lock = threading.Lock()
        self._stopped = False
        self.started = time.monotonic()

    def submit(self, key: str, fn, *args) -> None:
        """Queue fn(*args) under `key` (once)."""
        if key not in self._jobs:
            self._jobs[key] = self._pool.submit(fn, *args)

    def has(self, key: str) -> bool:
        return key in self._jobs

    def result(self, key: str):
        """The job's result, its exception raised here (each job's timeout counts from the lane's start)."""
        import time

        fut = self._jobs[key]
        return fut.result(timeout=max(1.0, self.TIMEOUT_S * len(self._jobs) - (time.monotonic() - self.started)))

    def run(self, cmd: list[str], timeout: float, **kw):
        """subprocess.run at nice +10 in its own session (killed with its children by stop())."""
        import subprocess

        if kw.pop("capture_output", False):
            kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with self._lock:
            if self._stopped:  # the session ended (an interrupt): a running job starts nothing more
                raise RuntimeError("the test session ended; background job stopped")
            p = subprocess.Popen(["nice", "-n", "10", *cmd], start_new_session=True, stdin=subprocess.DEVNULL, **kw)
            self._procs.add(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(p)
            raise
        finally:
            with self._lock:
                self._procs.discard(p)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    @staticmethod
    def _kill(p) -> None:
        import signal

        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop(self) -> None:
        """Kill what still runs (an interrupted session) and drop queued jobs."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._stopped = True
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                self._kill(p)


LANE_KEY = pytest.StashKey[BackgroundLane]()  # config.stash: the session's lane (tests/conftest.py)
_LANE: list[BackgroundLane] = []  # the same lane, for jobs started outside pytest's hooks


def run_in_lane(cmd: list[str], timeout: float = 900, **kw):
    """What a BACKGROUND_JOB runs its subprocesses with: the session's lane (nice +10, killed at session end),
    or a plain subprocess.run when the job runs without one."""
    import subprocess

    if _LANE:
        return _LANE[0].run(cmd, timeout=timeout, **kw)
    return subprocess.run(cmd, timeout=timeout, **kw)




TINY_TEACHER_SEED = 0  # tests/conftest.py's tiny_teacher: TinyModelConfig(seed=0) on DEFAULT_CORPUS * 4


def tiny_teacher_in_lane(out) -> None:
    """The session's tiny teacher (tests/conftest.py), built in a subprocess: for a BACKGROUND_JOB, which starts
    before any fixture exists and must not train in the pytest process beside the foreground tests."""
    import sys

    code = ("import sys; from kdpipe.pipeline.tiny import DEFAULT_CORPUS, TinyModelConfig, build_tiny; "
            "build_tiny(sys.argv[1], [DEFAULT_CORPUS] * 4, TinyModelConfig(seed=int(sys.argv[2])))")
    r = run_in_lane([sys.executable, "-c", code, str(out), str(TINY_TEACHER_SEED)], timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
