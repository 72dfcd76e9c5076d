"""A job file whose paths hold spaces, quotes, `$()`, backticks and `;` runs them as paths.

The rendered scripts are executed by bash with `[slurm] python` pointing at a recorder that
writes the argv it received: every path must arrive as one literal argument, and no file may
appear outside the run directory (the real pipeline in a hostile directory runs in
test_local.py and test_slurm.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from kdpipe.jobs.plan import make_plan, write_configs
from kdpipe.jobs.render import local_argv
from kdpipe.jobs.spec import load_job
from kdpipe.jobs.submit import render_step

HOSTILE = "it's \"$(touch PWNED-1)\" `touch PWNED-2`; touch PWNED-3 & $HOME \\n"


def snapshot(root: Path, skip: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for n in dirnames + filenames:
            out.add(os.path.join(dirpath, n))
    return out


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def test_hostile_paths_render_and_run_as_paths(tmp_path):
    base = tmp_path / HOSTILE
    base.mkdir()
    record = base / "runs" / HOSTILE / "record.jsonl"  # inside the run dir
    recorder = base / f"py {HOSTILE}"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}) + '\\n')\n"
    )
    recorder.chmod(0o755)
    job_file = base / "job.toml"
    job_file.write_text(f"""
name = "hostile"
run_dir = {toml_str("runs/" + HOSTILE)}
[teacher]
model = {toml_str("teacher " + HOSTILE)}
[data]
dataset = {toml_str("data " + HOSTILE + ".jsonl")}
[generation]
num_tasks = 2
store = {toml_str("store " + HOSTILE)}
[[students]]
name = "s"
model = {toml_str("student " + HOSTILE)}
[evaluation]
data = {toml_str("eval " + HOSTILE + ".jsonl")}
[slurm]
python = {toml_str(str(recorder))}
""")
    job = load_job(job_file)
    run_dir = base / "runs" / HOSTILE
    assert job.run_dir == run_dir
    before = snapshot(tmp_path, run_dir)

    plan = make_plan(job)
    write_configs(plan)
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost")
    expected = []
    for step in plan.steps:
        text = render_step(plan, step, ["1"] if step.after else [])
        script = job.run_dir / f"{step.name}.sbatch"
        script.write_text(text)
        r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, (step.name, r.stdout, r.stderr)
        expected.append({"argv": local_argv(step.argv, 1)[1:], "cwd": str(base)})

    got = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert got == expected  # every word arrived literally, from the job file's directory
    store = str(base / ("store " + HOSTILE))
    finalize = got[1]["argv"]
    assert finalize[finalize.index("finalize") + 1] == store
    # The rendered configs hold the hostile paths verbatim (TOML-escaped, never shell-expanded).
    gen_cfg = tomllib.loads((job.run_dir / "configs" / "generate.toml").read_text())
    assert gen_cfg["out"] == store and gen_cfg["data"] == "data " + HOSTILE + ".jsonl"

    after = snapshot(tmp_path, run_dir) - {str(run_dir), str(run_dir.parent)}  # the run dir itself is made
    assert after == before, f"files created outside the run dir: {sorted(after - before)}"
    assert not list(tmp_path.rglob("PWNED-*"))
    for root in (Path.cwd(), Path.home(), Path("/")):
        assert not list(root.glob("PWNED-*"))
    events = (job.run_dir / "events.log").read_text().splitlines()
    assert sum(" start " in e for e in events) == len(plan.steps)
