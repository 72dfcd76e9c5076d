"""A real one-node Slurm for tests: munge + slurmctld + slurmd from Debian's packages.

`SlurmCluster(scratch).start()` writes a slurm.conf under `scratch` (state, spool, logs and
pid files all live there), starts the daemons and waits until the node is idle; `.env` is the
environment (SLURM_CONF) that Slurm's clients need; `.stop()` ends exactly the daemons it
started, by the pids in their pid files. Any test module can import it; tests/jobs/conftest.py
wraps it in a session-scoped fixture. Root is needed (SlurmdUser=root runs the jobs).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo")


def missing_programs() -> list[str]:
    """Slurm/munge programs not on PATH (also looks in /usr/sbin, where Debian puts the daemons)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [p for p in DAEMONS + CLIENTS if shutil.which(p, path=path) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{name} not found; install: apt-get install slurmctld slurmd slurm-client munge")
    return found


def _total_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlurmCluster:
    def __init__(self, scratch: str | os.PathLike, cluster_name: str = "kdtest"):
        self.scratch = Path(scratch)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.cluster_name = cluster_name
        self.conf = self.scratch / "slurm.conf"
        self._started_munge_pid: int | None = None
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- configuration -------------------------------------------------------------------------
    def write_conf(self) -> None:
        s = self.scratch
        for d in ("state", "spool", "log"):
            (s / d).mkdir(parents=True, exist_ok=True)
        # Leave room for the test process and other work on the box; jobs ask for little.
        mem = max(1024, int(_total_memory_mb() * 0.6))
        self.conf.write_text(
            "\n".join([
                f"ClusterName={self.cluster_name}",
                f"SlurmctldHost={self.host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                f"StateSaveLocation={s}/state",
                f"SlurmdSpoolDir={s}/spool",
                f"SlurmctldPidFile={s}/slurmctld.pid",
                f"SlurmdPidFile={s}/slurmd.pid",
                f"SlurmctldLogFile={s}/log/slurmctld.log",
                f"SlurmdLogFile={s}/log/slurmd.log",
                "SlurmctldPort=6917",
                "SlurmdPort=6918",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SchedulerType=sched/backfill",
                # Re-evaluate pending jobs often: a test waits on dependency chains.
                "SchedulerParameters=sched_interval=2,bf_interval=2",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "ReturnToService=2",
                "MpiDefault=none",
                # Finished jobs stay visible to `scontrol show job` long enough for assertions.
                "MinJobAge=3600",
                "KillWait=5",
                "DefMemPerCPU=512",
                f"NodeName={self.host} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN",
                f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )

    # -- daemons -------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True)
        if ok.returncode == 0 and "Success" in ok.stdout:
            return  # a munged is already serving this machine; leave it alone
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            if Path(d).exists():
                shutil.chown(d, "munge", "munge")
        munged = _which("munged")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", munged], check=True)
        for _ in range(50):
            ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True)
            if ok.returncode == 0 and "Success" in ok.stdout:
                pidfile = Path("/run/munge/munged.pid")
                if pidfile.exists():
                    self._started_munge_pid = int(pidfile.read_text().split()[0])
                return
            time.sleep(0.2)
        raise RuntimeError(f"munged did not start: {ok.stdout}{ok.stderr}")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.write_conf()
        self._start_munge()
        subprocess.run([_which("slurmctld")], env=self.env, check=True)
        subprocess.run([_which("slurmd")], env=self.env, check=True)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            r = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True
            )
            state = (r.stdout or r.stderr).strip()
            if r.returncode == 0 and state.startswith("idle"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm node not idle after {timeout}s (sinfo: {state!r}); logs in {self.scratch}/log")

    def _stop_pidfile(self, pidfile: Path) -> None:
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().split()[0])
        except (ValueError, IndexError):
            return
        if not _pid_alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _pid_alive(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        # Cancel what is left so no job step outlives the test session.
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        self._stop_pidfile(self.scratch / "slurmd.pid")
        self._stop_pidfile(self.scratch / "slurmctld.pid")
        if self._started_munge_pid is not None and _pid_alive(self._started_munge_pid):
            os.kill(self._started_munge_pid, signal.SIGTERM)
            self._started_munge_pid = None

    # -- helpers for tests ---------------------------------------------------------------------
    def job_info(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o ID` parsed: one dict per job record (one per array task)."""
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True, text=True)
        records = []
        for line in r.stdout.splitlines():
            rec = {}
            for part in line.split():
                if "=" in part:
                    k, _, v = part.partition("=")
                    rec.setdefault(k, v)
            if rec:
                records.append(rec)
        return records

    def wait(self, job_ids: list[str], timeout: float = 900.0) -> dict[str, list[dict[str, str]]]:
        """Wait until every job (and array task) has left the queue; returns their records."""
        deadline = time.time() + timeout
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
        while True:
            infos = {j: self.job_info(j) for j in job_ids}
            # A dependency that can never be satisfied leaves a job pending forever: done too.
            def finished(r):
                return r.get("JobState") in terminal or r.get("Reason") == "DependencyNeverSatisfied"

            if all(recs and all(finished(r) for r in recs) for recs in infos.values()):
                return infos
            if time.time() > deadline:
                raise TimeoutError(f"Slurm jobs not finished after {timeout}s: {infos}")
            time.sleep(2)
