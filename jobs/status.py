"""`kdpipe status RUN_DIR`: where a submitted (or locally run) chain stands.

Job states come from squeue while a job is queued or running, then from `scontrol show job`
(until Slurm forgets it, MinJobAge), and from sacct when the cluster keeps accounting. The
store's progress is read from its task manifests; each run's last training and validation
lines from RUN/metrics.jsonl.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from kdpipe.pipeline.console import shown_path
from kdpipe.pipeline.metrics_log import last_metrics
from kdpipe.storage.errors import ConfigError


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, list[dict[str, str]]]:
    """job id -> one record per job/array task: {id, state, reason, start, end, exit}."""
    out: dict[str, list[dict[str, str]]] = {j: [] for j in job_ids}
    if not job_ids:
        return out
    acct = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State,Start,End,ExitCode"])
    for line in (acct or "").splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            jid, state, start, end, code = parts
            base = jid.split("_")[0]
            if base in out:
                out[base].append({"id": jid, "state": state.split()[0], "reason": "", "start": start, "end": end, "exit": code})
    for jid in job_ids:
        if out[jid]:
            continue
        text = _run(["scontrol", "show", "job", "-o", jid])
        for line in (text or "").splitlines():
            rec = dict(p.split("=", 1) for p in line.split() if "=" in p)
            task = rec.get("ArrayTaskId")
            out[jid].append({
                "id": f"{jid}_{task}" if task else rec.get("JobId", jid),
                "state": rec.get("JobState", "?"),
                "reason": rec.get("Reason", "None"),
                "start": rec.get("StartTime", ""),
                "end": rec.get("EndTime", ""),
                "exit": rec.get("ExitCode", ""),
            })
        if not out[jid]:
            sq = _run(["squeue", "-h", "-j", jid, "-o", "%i|%T|%r|%S"])
            for line in (sq or "").splitlines():
                i, state, reason, start = (line.split("|") + ["", "", "", ""])[:4]
                out[jid].append({"id": i, "state": state, "reason": reason, "start": start, "end": "", "exit": ""})
    return out


def store_progress(store: Path, num_tasks: int) -> dict[str, Any]:
    from kdpipe.storage.state import store_files

    files = store_files(store, num_tasks)
    complete, started = [], []
    for i, doc in files.tasks.items():
        started.append(i)
        if isinstance(doc, OSError):
            raise doc
        if not isinstance(doc, ValueError) and doc.get("complete"):  # an unreadable manifest: started, not complete
            complete.append(i)
    return {"path": str(store), "num_tasks": num_tasks, "finalized": files.finalized, "tasks_complete": complete,
            "tasks_started": started, "shards": files.shards}


def collect_status(run_dir: str | Path) -> dict[str, Any]:
    rd = Path(run_dir)
    sub = rd / "submission.json"
    local = rd / "run.json"
    if sub.exists():
        doc = json.loads(sub.read_text())
        mode = "slurm"
    elif local.exists():
        doc = json.loads(local.read_text())
        mode = "local"
    else:
        raise ConfigError(f"{rd}: no submission.json or run.json; pass the run directory of a submitted or run job")
    status: dict[str, Any] = {"run_dir": shown_path(rd), "mode": mode, "job": doc.get("job")}
    if mode == "slurm":
        ids = [j["job_id"] for j in doc.get("jobs", [])]
        states = slurm_states(ids)
        status["jobs"] = [dict(j, tasks=states.get(j["job_id"], [])) for j in doc.get("jobs", [])]
        status["submission_complete"] = doc.get("complete")
        status["submission_error"] = doc.get("error")
        store = doc.get("store", {})
        status["store"] = store_progress(Path(store["path"]), int(store.get("num_tasks", 1))) if store.get("path") else None
        if status["store"] is not None:
            status["store"]["reused"] = store.get("reused", False)
    else:
        status["steps"] = doc.get("steps", [])
    status["runs"] = [
        {"name": r["name"], "dir": r["dir"], "last_metrics": last_metrics(Path(r["dir"])),
         "last_validation": last_metrics(Path(r["dir"]), "validation")} for r in doc.get("runs", [])
    ]
    if doc.get("on_policy"):
        status["rounds"] = rounds_status(doc["on_policy"])
    return status


def format_metrics(m: dict[str, Any]) -> str:
    """A metrics.jsonl row as one readable line: step first, numbers to 4 significant digits."""
    def value(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = (["step"] if "step" in m else []) + sorted(k for k in m if k not in ("step", "split"))
    return "  ".join(f"{k} {value(m[k])}" for k in keys)


def format_status(st: dict[str, Any]) -> str:
    lines = [f"job {st.get('job')}  ({st['mode']})  {st['run_dir']}"]
    if st.get("submission_error"):
        lines.append(f"submission stopped: {st['submission_error']}")
    for j in st.get("jobs", []):
        tasks = j.get("tasks") or []
        if not tasks:
            lines.append(f"  {j['step']:<28} job {j['job_id']:<10} (unknown to Slurm now)")
            continue
        counts: dict[str, int] = {}
        for t in tasks:
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        reason = next((t["reason"] for t in tasks if t["state"] == "PENDING" and t["reason"] not in ("", "None")), "")
        lines.append(f"  {j['step']:<28} job {j['job_id']:<10} {summary}" + (f" ({reason})" if reason else ""))
    for s in st.get("steps", []):
        lines.append(f"  {s['step']:<28} " + (f"task {s['task']} " if "task" in s else "") + f"done in {s['seconds']} s")
    store = st.get("store")
    if store:
        state = "finalized" if store["finalized"] else f"{len(store['tasks_complete'])}/{store['num_tasks']} tasks complete"
        lines.append(f"store {store['path']}: {state}, {store['shards']} shard(s)" + (" (reused)" if store.get("reused") else ""))
    if st.get("rounds"):
        lines += format_rounds(st["rounds"])
    for r in st.get("runs", []):
        m = r["last_metrics"]
        lines.append(f"run {r['name']}: " + (format_metrics(m) if m else "no metrics yet"))
        if r.get("last_validation"):
            lines.append(f"run {r['name']} validation: " + format_metrics(r["last_validation"]))
    return "\n".join(lines)


def rounds_status(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rd in rounds:
        run, num_tasks = Path(rd["run"]), int(rd.get("num_tasks", 1))
        store = store_progress(Path(rd["store"]), num_tasks)
        state = ("done" if (run / "final").is_dir() else "training" if (run / "metrics.jsonl").exists()
                 else "store finalized" if store["finalized"] else f"generating ({len(store['tasks_complete'])}/{num_tasks} tasks)"
                 if store["tasks_started"] else "waiting")
        out.append({**rd, "state": state, "store_progress": store, "last_metrics": last_metrics(run)})
    return out


def format_rounds(rounds: list[dict[str, Any]]) -> list[str]:
    lines = []
    for rd in rounds:
        m = rd.get("last_metrics")
        lines.append(f"round {rd['round']}: {rd['state']}" + (f"  step {m['step']} loss {m['loss']:.4g} loss_kd {m['loss_kd']:.4g}" if m else "")
                     + f"  ({shown_path(rd['run'])})")
    return lines or [json.dumps(rounds)]
