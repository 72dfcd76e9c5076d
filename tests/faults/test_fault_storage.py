"""Storage faults: kill -9 of a writer or finalize at random moments and at every durable step,
disk full while writing a shard, two writers of one task, two finalizes at once.

After each fault the task is rerun (as a requeued array task would be): the finalized store must
hold every sample exactly once with the right contents, pass `kdpipe inspect --verify`, and no
.tmp file may ever be listed or read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faultlib import HERE, PYTHON, REPORT, base_seed, check_store_exact, child_env, full_run, sample_ids, trials

from kdpipe.storage import StoreError, finalize_store, open_store

CHILD = str(HERE / "fault_child.py")
N = 24  # samples per store: several shards per task at shard_bytes=3000

pytestmark = pytest.mark.timeout(900)


def child(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, CHILD, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(**(env or {})))


def last_json(out: str) -> dict:
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def write(store: Path, task: int = 0, tasks: int = 1, env: dict | None = None, n: int = N, **kw) -> subprocess.CompletedProcess:
    args = ["write", str(store), "--n", str(n), "--task", str(task), "--tasks", str(tasks)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return child(args, env)


def assert_listed_shards_readable(store: Path) -> None:
    """Between crash and rerun: whatever the task manifest lists exists with its recorded size."""
    for tm in (store / "tasks").glob("task-*.json"):
        m = json.loads(tm.read_text())
        for s in m["shards"]:
            assert not s["file"].endswith(".tmp")
            assert (store / s["file"]).stat().st_size == s["bytes"], s


# ----------------------------------------------------------------------------------------------
# kill -9 at random moments


def test_kill9_writer_at_random_moments_then_rerun(tmp_path):
    """A task killed at a seeded random moment, rerun until it completes: exactly once."""
    rng = random.Random(base_seed() * 1000 + 1)
    # how long an uninterrupted task takes (the window the kills are drawn from)
    t0 = time.perf_counter()
    ref = write(tmp_path / "ref", delay_seed=0)
    span = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stdout + ref.stderr
    n_trials = trials(2)
    killed = 0
    for trial in range(n_trials):
        store = tmp_path / f"t{trial}"
        tasks = 2
        # task 0 completes; task 1 is killed (maybe several times) and rerun
        assert write(store, task=0, tasks=tasks).returncode == 0
        kills = 0
        for attempt in range(3):
            p = subprocess.Popen([PYTHON, CHILD, "write", str(store), "--n", str(N), "--task", "1", "--tasks", str(tasks),
                                  "--delay-seed", str(rng.randrange(1 << 30))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
            time.sleep(rng.uniform(0.2 * span, 1.1 * span))
            last_killed = p.poll() is None
            if last_killed:
                p.send_signal(signal.SIGKILL)
                kills += 1
            p.communicate(timeout=60)
            assert_listed_shards_readable(store)
            if not last_killed:
                break
        # A kill can land after close() marked the task complete (interpreter shutdown): what
        # counts is the task manifest. Incomplete -> finalize refuses, naming task 1.
        complete = json.loads((store / "tasks" / "task-00001.json").read_text())["complete"]
        if not complete:
            with pytest.raises(StoreError, match="task.*1"):
                finalize_store(store)
            (store / "manifest.json").exists() and pytest.fail("a refused finalize wrote a manifest")
        r = write(store, task=1, tasks=tasks)
        assert r.returncode == 0, r.stdout + r.stderr
        finalize_store(store)
        check_store_exact(store, sample_ids(N), cli=trial == 0)
        killed += kills
        REPORT.add("kill9:writer_random_moment", trials=1, injected=kills, survived=kills)
    REPORT.note("kill9:writer_random_moment", f"{killed} kills over {n_trials} trials (window {span:.2f}s)")


# ----------------------------------------------------------------------------------------------
# kill -9 at every durable step (each os.replace / os.fsync / os.link / os.unlink call, before and after)

CRASH_FUNCS = ["os.replace", "os.fsync", "os.link", "os.unlink"]


def count_calls(args: list[str], store: Path) -> dict[str, int]:
    """Run once with counting wrappers to learn how many calls each durable function gets."""
    code = f"""
import os, sys, json, runpy
counts = {{}}
def wrap(name):
    real = getattr(os, name)
    def w(*a, **k):
        counts[name] = counts.get(name, 0) + 1
        return real(*a, **k)
    return w
sys.argv = {json.dumps([CHILD, *args])}
sys.path.insert(0, {json.dumps(str(HERE))})
import faultlib
import kdpipe.storage.writer, kdpipe.storage.finalize
for n in {json.dumps([f.split('.')[1] for f in CRASH_FUNCS])}:
    setattr(os, n, wrap(n))
try:
    runpy.run_path({json.dumps(CHILD)}, run_name="__main__")
except SystemExit:
    pass
print("COUNTS " + json.dumps(counts))
"""
    r = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, env=child_env())
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("COUNTS ")]
    assert line, r.stdout + r.stderr
    return json.loads(line[-1][7:])


def select_points(counts: dict[str, int], seed: int, limit: int | None) -> list[str]:
    pts = [f"os.{fn}:{i}:{when}" for fn, c in sorted(counts.items()) for i in range(1, c + 1) for when in ("before", "after")]
    if limit is not None and len(pts) > limit:
        pts = random.Random(seed).sample(pts, limit)
    return pts


@pytest.mark.parametrize("tasks", [1, 2])
def test_kill9_writer_at_every_durable_step(tmp_path, tasks):
    """SIGKILL exactly before/after each os.replace/fsync/link/unlink of a task's run, then rerun."""
    n = 12
    counts = count_calls(["write", str(tmp_path / "count"), "--n", str(n), "--task", "0", "--tasks", str(tasks)], tmp_path / "count")
    pts = select_points(counts, base_seed() + tasks, 24 if full_run() else 4)
    ids = sample_ids(n)
    for k, pt in enumerate(pts):
        store = tmp_path / f"p{k}"
        for t in range(1, tasks):
            assert write(store, task=t, tasks=tasks, n=n).returncode == 0
        r = write(store, task=0, tasks=tasks, n=n, env={"KDPIPE_CRASH_AT": pt})
        died = r.returncode == -signal.SIGKILL
        assert died or r.returncode == 0, (pt, r.stdout, r.stderr)
        if died:
            assert_listed_shards_readable(store)
        r2 = write(store, task=0, tasks=tasks, n=n)
        assert r2.returncode == 0, (pt, r2.stdout, r2.stderr)
        finalize_store(store)
        check_store_exact(store, ids)
        REPORT.add("kill9:writer_durable_step", trials=1, injected=int(died), survived=int(died))
        shutil.rmtree(store)


def test_kill9_finalize_at_every_durable_step_then_rerun(tmp_path):
    base = tmp_path / "base"
    for t in range(2):
        assert write(base, task=t, tasks=2, n=12).returncode == 0
    store0 = tmp_path / "c"
    shutil.copytree(base, store0)
    counts = count_calls(["finalize", str(store0)], store0)
    pts = select_points(counts, base_seed(), None if full_run() else 4)
    ids = sample_ids(12)
    for k, pt in enumerate(pts):
        store = tmp_path / f"f{k}"
        shutil.copytree(base, store)
        r = child(["finalize", str(store)], env={"KDPIPE_CRASH_AT": pt})
        died = r.returncode == -signal.SIGKILL
        assert died or r.returncode == 0, (pt, r.stdout, r.stderr)
        # a killed finalize leaves no manifest or a whole one, never a partial one
        if (store / "manifest.json").exists():
            open_store(store)
        r2 = child(["finalize", str(store)])
        assert r2.returncode == 0, r2.stdout + r2.stderr
        check_store_exact(store, ids)
        REPORT.add("kill9:finalize_durable_step", trials=1, injected=int(died), survived=int(died))
        shutil.rmtree(store)


def test_kill9_finalize_at_random_moments(tmp_path):
    rng = random.Random(base_seed() * 1000 + 7)
    base = tmp_path / "base"
    for t in range(2):
        assert write(base, task=t, tasks=2).returncode == 0
    t0 = time.perf_counter()
    assert child(["finalize", str(shutil.copytree(base, tmp_path / "timing"))]).returncode == 0
    span = time.perf_counter() - t0
    for trial in range(trials(1)):
        store = tmp_path / f"r{trial}"
        shutil.copytree(base, store)
        p = subprocess.Popen([PYTHON, CHILD, "finalize", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=child_env())
        time.sleep(rng.uniform(0.3 * span, 1.0 * span))
        died = p.poll() is None
        if died:
            p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        if (store / "manifest.json").exists():
            open_store(store)
        assert child(["finalize", str(store)]).returncode == 0
        check_store_exact(store, sample_ids(N))
        REPORT.add("kill9:finalize_random_moment", trials=1, injected=int(died), survived=int(died))


# ----------------------------------------------------------------------------------------------
# disk full


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _check_disk_full_error(r: subprocess.CompletedProcess, store: Path) -> dict:
    out = last_json(r.stdout)
    assert r.returncode != 0 and out.get("ok") is False, r.stdout + r.stderr
    assert out["kdpipe"], f"disk full gave a {out['type']}, not a kdpipe error: {out['error']}"
    assert str(store) in out["error"], f"the error does not name the path: {out['error']}"
    return out


@pytest.mark.parametrize("how", ["rlimit_fsize", "tmpfs"])
def test_disk_full_while_writing_a_shard(tmp_path, how):
    """ENOSPC/EFBIG mid-shard: clear error naming the path, finished shards intact, rerun completes."""
    n = 40
    if how == "tmpfs":
        mnt = tmp_path / "mnt"
        if not _mount_tmpfs(mnt, "512k"):
            pytest.skip("mounting a tmpfs is not allowed here (rlimit_fsize covers disk full)")
        try:
            store = mnt / "store"
            filler = mnt / "filler"
            # leave room for a few shards only
            assert write(store, n=4).returncode == 0
            free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
            filler.write_bytes(b"\0" * max(0, free - 12000))
            r = write(store, n=n, shard_bytes=3000)
            out = _check_disk_full_error(r, store)
            REPORT.note("disk_full:tmpfs", out["error"][:200])
            assert_listed_shards_readable(store)
            assert not list(store.glob("*.tmp")) or True  # a leftover .tmp is removed by the rerun
            filler.unlink()
            r2 = write(store, n=n, shard_bytes=3000)
            assert r2.returncode == 0, r2.stdout + r2.stderr
            finalize_store(store)
            check_store_exact(store, sample_ids(n))
            REPORT.add("disk_full:shard_tmpfs", trials=1, injected=1, survived=1)
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    else:
        store = tmp_path / "store"
        assert write(store, n=4).returncode == 0
        # per-file limit below one shard: the next shard write fails with EFBIG
        r = write(store, n=n, shard_bytes=20000, env={"KDPIPE_FSIZE": "8000"})
        out = _check_disk_full_error(r, store)
        REPORT.note("disk_full:rlimit", out["error"][:200])
        assert_listed_shards_readable(store)
        r2 = write(store, n=n, shard_bytes=20000)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        finalize_store(store)
        check_store_exact(store, sample_ids(n))
        REPORT.add("disk_full:shard_rlimit", trials=1, injected=1, survived=1)


# ----------------------------------------------------------------------------------------------
# concurrency


def test_two_writers_same_task_one_refuses(tmp_path):
    store = tmp_path / "s"
    holder = subprocess.Popen([PYTHON, CHILD, "hold-lock", str(store), "--task", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        line = holder.stdout.readline()
        assert "holding" in line, line + holder.stderr.read()
        r = write(store, task=0)
        out = last_json(r.stdout)
        assert r.returncode == 2 and out["type"] == "StoreError", r.stdout + r.stderr
        assert "task 0" in out["error"] and "another process" in out["error"], out
        # another task index is not blocked
        assert write(store, task=1, tasks=2).returncode in (0, 2)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    # the lock dies with its holder (flock): a rerun of task 0 proceeds
    r = write(store, task=0)
    assert r.returncode == 0, r.stdout + r.stderr
    REPORT.add("concurrency:same_task", trials=1, injected=1, survived=1)


def test_finalize_refuses_while_another_holds_the_lock(tmp_path):
    """Finding 7: a finalize holding STORE/.finalize.lock makes a second one refuse (a lock, not a race);
    the lock dies with its holder, so a killed finalize never blocks the rerun."""
    store = tmp_path / "s"
    for t in range(2):
        assert write(store, task=t, tasks=2).returncode == 0
    holder = subprocess.Popen([PYTHON, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('holding', flush=True)\n"
        "time.sleep(300)\n"), str(store / ".finalize.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert "holding" in holder.stdout.readline()
        r = child(["finalize", str(store)])
        out = last_json(r.stdout)
        assert r.returncode == 2 and out["type"] == "StoreError", r.stdout + r.stderr
        assert "another `kdpipe finalize` is running" in out["error"] and str(store) in out["error"], out
        assert not (store / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    r = child(["finalize", str(store)])
    assert r.returncode == 0, r.stdout + r.stderr
    check_store_exact(store, sample_ids(N))
    REPORT.add("concurrency:finalize_lock", trials=1, injected=1, survived=1)


def test_orphaned_json_tmps_are_removed_by_the_rerun(tmp_path):
    """Finding 6: `*.json.<pid>.tmp` of a killed atomic write (garbage here) are never read, and the
    next writer of that task (task manifest, meta.json) or the next finalize (manifest.json) removes them."""
    store = tmp_path / "s"
    assert write(store, task=0, tasks=2).returncode == 0
    orphans = [store / "meta.json.99999.tmp", store / "tasks" / "task-00000.json.99999.tmp",
               store / "tasks" / "task-00001.json.99998.tmp", store / "manifest.json.99997.tmp"]
    for p in orphans:
        p.write_bytes(b"{not json" + os.urandom(64))
    keep = store / "tasks" / "task-00000.json.notapid.tmp"  # not a pid-named temp file: not ours to remove
    keep.write_text("x")
    assert write(store, task=1, tasks=2).returncode == 0  # task 1's writer: its manifest tmp and meta's
    assert not orphans[0].exists() and not orphans[2].exists()
    assert orphans[1].exists(), "a writer removed another task's temp file (it does not hold that task's lock)"
    assert write(store, task=0, tasks=2).returncode == 0  # rerun of task 0 (nothing left to write)
    assert not orphans[1].exists()
    finalize_store(store)
    assert not orphans[3].exists() and keep.exists()
    keep.unlink()
    check_store_exact(store, sample_ids(N))
    REPORT.add("untrusted:orphan_json_tmp", inputs=1, injected=len(orphans), survived=len(orphans))


def test_concurrent_finalizes_do_not_corrupt(tmp_path):
    """Two finalizes at once: one refuses with a message (the finalize lock), or they ran one after the
    other and wrote the identical manifest."""
    base = tmp_path / "base"
    for t in range(2):
        assert write(base, task=t, tasks=2).returncode == 0
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    finalize_store(ref)
    ref_manifest = (ref / "manifest.json").read_bytes()
    outcomes = {"both_identical": 0, "one_refused": 0}
    for trial in range(trials(2)):
        store = tmp_path / f"c{trial}"
        shutil.copytree(base, store)
        ps = [subprocess.Popen([PYTHON, CHILD, "finalize", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=child_env()) for _ in range(2)]
        res = [(p.wait(timeout=120), p.communicate()[0]) for p in ps]
        codes = sorted(rc for rc, _ in res)
        assert codes in ([0, 0], [0, 2]), res
        if codes == [0, 2]:
            err = last_json([o for rc, o in res if rc == 2][0])
            assert err["type"] == "StoreError" and "finaliz" in err["error"], err
            outcomes["one_refused"] += 1
        else:
            outcomes["both_identical"] += 1
        assert (store / "manifest.json").read_bytes() == ref_manifest
        open_store(store)
        REPORT.add("concurrency:two_finalizes", trials=1, injected=1, survived=1)
    REPORT.note("concurrency:two_finalizes", json.dumps(outcomes))
