"""Child processes of the fault tests: a phase-one task writer and finalize, with injectable faults.

    python fault_child.py write STORE --n N --task I --tasks T [--shard-bytes B] [--delay-seed S]
    python fault_child.py finalize STORE
    python fault_child.py hold-lock STORE --task I        (holds a task's writer open until killed)

Faults (environment):
    KDPIPE_CRASH_AT="os.replace:3:before"  SIGKILL self at the 3rd call of os.replace, before it runs
                                           (also os.fsync, os.link, os.rename, os.unlink; "after" = once it ran)
    KDPIPE_FSIZE=BYTES                     RLIMIT_FSIZE (SIGXFSZ ignored: writes fail with EFBIG)
The last stdout line is one JSON object: {"ok": true} or {"ok": false, "type": ..., "error": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def install_crash_point(spec: str) -> None:
    fn_name, nth, when = spec.split(":")
    nth = int(nth)
    mod_name, attr = fn_name.split(".")
    assert mod_name == "os"
    real = getattr(os, attr)
    calls = [0]

    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **kw)
        if calls[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(os, attr, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["write", "finalize", "hold-lock"])
    ap.add_argument("store")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=1)
    ap.add_argument("--shard-bytes", type=int, default=3000)
    ap.add_argument("--delay-seed", type=int, default=None)
    ap.add_argument("--max-delay", type=float, default=0.004)
    args = ap.parse_args()

    if os.environ.get("KDPIPE_FSIZE"):
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        lim = int(os.environ["KDPIPE_FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))
    import faultlib  # noqa: E402  (imports numpy/pyarrow before the crash point is armed)
    from kdpipe.storage import KdpipeError, ShardWriter, finalize_store

    if os.environ.get("KDPIPE_CRASH_AT"):
        install_crash_point(os.environ["KDPIPE_CRASH_AT"])
    store = Path(args.store)
    try:
        if args.what == "finalize":
            finalize_store(store)
        elif args.what == "hold-lock":
            with ShardWriter(store, faultlib.make_meta(), task_index=args.task, num_tasks=args.tasks):
                print(json.dumps({"holding": True}), flush=True)
                time.sleep(3600)
        else:
            rng = random.Random(args.delay_seed)
            ids = faultlib.sample_ids(args.n)[args.task::args.tasks]
            with ShardWriter(store, faultlib.make_meta(), task_index=args.task, num_tasks=args.tasks,
                             shard_bytes=args.shard_bytes) as w:
                done = w.done_ids()
                print(json.dumps({"resumed_with": len(done)}), flush=True)
                for sid in ids:
                    if sid in done:
                        continue
                    if args.delay_seed is not None:
                        time.sleep(rng.uniform(0, args.max_delay))
                    w.add(sid, *faultlib.sample_for(sid), text=f"text of {sid}")
    except KdpipeError as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "kdpipe": True, "error": str(e)}), flush=True)
        sys.exit(2)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        print(json.dumps({"ok": False, "type": type(e).__name__, "kdpipe": False, "error": str(e)}), flush=True)
        sys.exit(3)
    print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    main()
