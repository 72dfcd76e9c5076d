"""A writer killed mid-shard leaves no visible partial shard, and a rerun completes the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from kdpipe.storage import StoreError, StoreReader, finalize_store, open_store

HERE = Path(__file__).parent

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {here!r})
    import numpy as np
    from kdstore_testutil import fake_sample, make_meta
    from kdpipe.storage import ShardWriter
    import kdpipe.storage.writer as writer_module
    # Record batches of ~1.5 kB into 6 kB shards: a shard takes several adds, so the writer sits
    # between batches with its shard open (a .tmp) -- the state the kill must hit.
    writer_module.BATCH_BYTES = 1500
    rng = np.random.default_rng(0)
    samples = [(f"s{{i:04d}}", fake_sample(rng)) for i in range(60)]
    slow = sys.argv[2] == "slow"
    with ShardWriter(sys.argv[1], make_meta(), shard_bytes=6000) as w:
        done = w.done_ids()
        print("resuming past", len(done), flush=True)
        for sid, s in samples:
            if sid in done:
                continue
            w.add(sid, *s)
            if slow and list(w.store_dir.glob("*.arrow")) and list(w.store_dir.glob("*.arrow.tmp")):
                # a finished shard and an open one: tell the test, which kills us here. The writer
                # reports it itself, so no polling race decides whether the kill lands mid-shard.
                print("shard open", flush=True)
                time.sleep(600)
    print("complete", flush=True)
""")


def _run_writer(store: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER.format(here=str(HERE)), str(store), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_writer_leaves_no_partial_shard_and_rerun_completes(tmp_path):
    store = tmp_path / "store"
    proc = _run_writer(store, "slow")
    # wait until the writer says a shard is finished and the next one is being written (.tmp exists)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "shard open":
            break
    else:
        proc.wait()
        pytest.fail(f"writer never had a shard open: {''.join(lines)!r} {proc.stderr.read()!r}")
    assert list(store.glob("*.arrow.tmp")) and list(store.glob("*.arrow"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Every visible shard is a complete Arrow IPC file; the partial one is only a .tmp.
    visible = sorted(store.glob("*.arrow"))
    assert visible
    before = {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in visible}
    for f in visible:
        with pa.OSFile(str(f)) as fh:
            pa.ipc.open_file(fh).read_all()
    # Not finalizable: the task did not complete.
    with pytest.raises(StoreError, match="did not complete"):
        finalize_store(store)
    assert not (store / "manifest.json").exists()
    # The rerun skips what is stored, cleans the stale .tmp and completes.
    out, err = _run_writer(store, "fast").communicate(timeout=120)
    assert "complete" in out, err
    assert "resuming past 0" not in out
    assert not list(store.glob("*.tmp"))
    for f in visible:  # finished shards were not rewritten
        assert (f.stat().st_size, f.stat().st_mtime_ns) == before[f]
    finalize_store(store)
    ids = [r.sample_id for r in StoreReader(store, shuffle=False)]
    assert sorted(ids) == [f"s{i:04d}" for i in range(60)]
    assert open_store(store).num_sequences == 60


def test_checkpoint_keeps_rows_and_leaves_task_incomplete(tmp_path):
    """Preemption path: checkpoint() makes the encoded rows durable, the task stays incomplete."""
    import numpy as np

    from kdpipe.storage import ShardWriter
    from kdstore_testutil import fake_sample, make_meta

    rng = np.random.default_rng(0)
    meta = make_meta()
    samples = {f"s{i}": fake_sample(rng) for i in range(6)}
    w = ShardWriter(tmp_path, meta, shard_bytes=1 << 30)  # one big shard: nothing rolls by itself
    for sid in list(samples)[:3]:
        w.add(sid, *samples[sid])
    w.checkpoint()
    w.abort()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(StoreError, match=r"task\(s\) 0 did not complete"):
        finalize_store(tmp_path)  # incomplete: refused
    with ShardWriter(tmp_path, meta, shard_bytes=1 << 30) as w2:
        assert w2.done_ids() == {"s0", "s1", "s2"}
        for sid in list(samples)[3:]:
            w2.add(sid, *samples[sid])
    finalize_store(tmp_path)
    ids = sorted(r.sample_id for r in StoreReader(tmp_path, shuffle=False))
    assert ids == sorted(samples)
