"""Scale of the store's bookkeeping: finalize, inspect and reader start-up at 100, 1,000 and 10,000 shards.

Stores of one-row shards are written with the real ShardWriter (100 shards per task, so 10,000
shards = 100 array tasks), then for each size:
  finalize     finalize_store (reads every task manifest, checks every shard's size)
  inspect      inspect_store, summary (reads the manifest and the first rows)
  verify       inspect_store(verify=True) (checksums and re-reads every shard)
  reader_start StoreReader(store) + first record, in a fresh process
  reader_rss   peak RSS of a fresh process that reads every record (must stay flat)
Ratios time(1k)/time(100) and time(10k)/time(1k) are ~10 for linear growth, ~100 for quadratic.
Also the writer itself: time per shard for the last 100 shards of a 1,000-shard task versus the
first 100 (a per-shard cost that grows with the shards already written shows up here).

    python benchmarks/bench_scale.py [--sizes 100,1000,10000] [--out DIR]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 1000
PER_TASK = 100


def meta():
    from kdpipe.storage import CodecConfig, StoreMeta

    return StoreMeta(teacher="bench-scale", teacher_revision=None, tokenizer_fingerprint="fp", vocab_size=VOCAB, recipe="bench",
                     recipe_params={}, codec=CodecConfig(top_k=8), dataset_fingerprint="ds", generation_params={})


def sample(rng: np.random.Generator, L: int = 24, k: int = 8):
    ids = rng.integers(0, VOCAB, L)
    pos = np.arange(1, L)
    lp = np.sort(rng.uniform(-12, -0.1, size=(L - 1, k)).astype(np.float32), axis=1)[:, ::-1]
    top = np.stack([rng.choice(VOCAB, k, replace=False) for _ in range(L - 1)])
    return ids, pos, top, lp


def write_task(store: Path, task: int, num_tasks: int, shards: int, rng, stamps: list | None = None) -> None:
    """`shards` one-row shards (shard_bytes=1 rolls a shard after every row)."""
    from kdpipe.storage import ShardWriter

    with ShardWriter(store, meta(), task_index=task, num_tasks=num_tasks, shard_bytes=1) as w:
        for i in range(shards):
            w.add(f"t{task}-{i}", *sample(rng))
            if stamps is not None:
                stamps.append(time.perf_counter())


def build(store: Path, n_shards: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    tasks = max(1, n_shards // PER_TASK)
    t0 = time.perf_counter()
    for t in range(tasks):
        write_task(store, t, tasks, n_shards // tasks, rng)
    return time.perf_counter() - t0


READER_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from kdpipe.storage import StoreReader
t1 = time.perf_counter()
r = StoreReader(sys.argv[1], shuffle=True, shuffle_buffer=64, seed=0)
it = iter(r)
next(it)
t2 = time.perf_counter()
rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = 1 + sum(1 for _ in it)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "read_all_s": t3 - t2, "rows": n,
                  "peak_rss_mb_at_start": rss_start / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed(fn, *a, **k) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--writer-shards", type=int, default=1000)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kdpipe-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    from kdpipe.storage import finalize_store, inspect_store, open_store

    rows = []
    try:
        # warm-up: imports (inspect pulls in the reader and torch) and first-call caches off the clock
        warm = work / "warm"
        build(warm, 10)
        finalize_store(warm)
        inspect_store(warm)
        inspect_store(warm, verify=True)
        shutil.rmtree(warm, ignore_errors=True)
        for n in sizes:
            store = work / f"store-{n}"
            shutil.rmtree(store, ignore_errors=True)
            build_s = build(store, n)
            fin_s, m = timed(finalize_store, store)
            assert len(m["shards"]) == n
            open_s, _ = timed(open_store, store)
            insp_s, rep = timed(inspect_store, store)
            ver_s, rep_v = timed(inspect_store, store, verify=True)
            assert rep_v["ok"] and rep_v["shards"] == n, rep_v["problems"][:3]
            r = subprocess.run([sys.executable, "-c", READER_CHILD, str(store)], capture_output=True, text=True, check=True)
            rd = json.loads(r.stdout.strip().splitlines()[-1])
            assert rd["rows"] == n
            row = {"shards": n, "build_s": build_s, "finalize_s": fin_s, "open_store_s": open_s, "inspect_s": insp_s,
                   "verify_s": ver_s, "reader_start_s": rd["start_s"], "reader_read_all_s": rd["read_all_s"],
                   "reader_peak_rss_mb": rd["peak_rss_mb"], "manifest_bytes": (store / "manifest.json").stat().st_size}
            rows.append(row)
            print(f"{n:>6} shards: build {build_s:7.2f}s  finalize {fin_s:6.3f}s  open {open_s:6.3f}s  inspect {insp_s:6.3f}s  "
                  f"verify {ver_s:6.2f}s  reader start {rd['start_s']:6.3f}s  read all {rd['read_all_s']:6.2f}s  "
                  f"peak RSS {rd['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(store, ignore_errors=True)

        # the writer: per-shard time early vs late in one task
        stamps: list[float] = []
        wstore = work / "writer"
        shutil.rmtree(wstore, ignore_errors=True)
        t0 = time.perf_counter()
        write_task(wstore, 0, 1, args.writer_shards, np.random.default_rng(1), stamps)
        d = np.diff([t0] + stamps)
        first, last = float(d[:100].mean()), float(d[-100:].mean())
        shutil.rmtree(wstore, ignore_errors=True)
        print(f"writer: {args.writer_shards} one-row shards in one task: {first * 1e3:.2f} ms/shard (first 100) -> "
              f"{last * 1e3:.2f} ms/shard (last 100), x{last / first:.1f}")
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    keys = ["finalize_s", "open_store_s", "inspect_s", "verify_s", "reader_start_s"]
    ratios = {}
    for a, b in zip(rows, rows[1:]):
        f = b["shards"] / a["shards"]
        for k in keys:
            ratios[f"{k}_{b['shards']}/{a['shards']}"] = b[k] / max(a[k], 1e-9)
        print(f"x{f:.0f} shards ({a['shards']} -> {b['shards']}): " + ", ".join(
            f"{k[:-2]} x{b[k] / max(a[k], 1e-9):.1f}" for k in keys) + f" (linear = x{f:.0f})")
    rss_ratio = rows[-1]["reader_peak_rss_mb"] / rows[0]["reader_peak_rss_mb"]
    print(f"reader peak RSS {rows[0]['shards']} -> {rows[-1]['shards']} shards: x{rss_ratio:.2f}")
    print(json.dumps({"rows": rows, "ratios": ratios, "reader_rss_ratio": rss_ratio,
                      "writer_ms_per_shard_first100": first * 1e3, "writer_ms_per_shard_last100": last * 1e3,
                      "writer_slowdown": last / first}))


if __name__ == "__main__":
    main()
