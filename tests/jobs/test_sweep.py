"""One teacher pass, many students (issue 10 §5): a sweep job runs phase one exactly once.

The shipped sweep (jobs/examples/debian-sweep.toml) expands to >= 8 students over
alpha x temperature x divergence, all on one store. A tiny sweep of the same shape runs with
`kdpipe run`: events.log shows one generate and one finalize, then every student; a rerun and a
second job on the same store reuse the store by its cache key and generate nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kdpipe.jobs.plan import make_plan
from kdpipe.jobs.spec import expand_students, load_job

from jobs_helpers import EXAMPLES, with_local_models

pytestmark = pytest.mark.slow  # a real teacher pass (hf engine) and 5 one-step students (~60 s CPU)

SWEEP = """\
name = "sweep"
[teacher]
model = "{teacher}"
dtype = "float32"
max_model_len = 256
engine = "hf"

[data]
dataset = "{data}"
text_field = "document"
id_field = "id"
limit = 4

[generation]
recipe = "summarize"
k = 4
store = "store"
max_new_tokens = 4
progress = false

[[students]]
name = "kd"
model = "{student}"
alpha = [0.2, 0.5]
temperature = 2.0
divergence = ["forward_kl", "generalized_jsd"]
steps = 1
tokens_per_batch = 256
save_every = 0
"""


def _events(run_dir) -> list[list[str]]:
    return [ln.split()[1:] for ln in (run_dir / "events.log").read_text().splitlines() if ln.strip()]


def _kdpipe() -> str:
    return shutil.which("kdpipe", path=os.path.dirname(sys.executable))


def test_shipped_sweep_is_one_store_many_students(tmp_path):
    job = load_job(with_local_models(EXAMPLES / "debian-sweep.toml", tmp_path))
    runs = expand_students(job)
    assert len(runs) >= 8
    swept = {k for r in runs for k in r.swept}
    assert swept == {"alpha", "temperature", "divergence"}
    assert {r.swept["divergence"] for r in runs} == {"forward_kl", "reverse_kl", "generalized_jsd"}
    assert len({tuple(sorted(r.swept.items())) for r in runs}) == len(runs)
    assert all(r.values.get("alpha", 1.0) < 1.0 for r in runs)  # every run distils (the logits)
    plan = make_plan(job)
    assert [s.kind for s in plan.steps].count("generate") <= 1  # one teacher pass for every student
    assert all(s.after in ((), ("finalize",)) for s in plan.steps if s.kind == "train")


def test_sweep_runs_phase_one_once(tmp_path, tiny_teacher, vllm_student, tiny_data):
    text = SWEEP.format(teacher=tiny_teacher, student=vllm_student, data=tiny_data)
    job_file = tmp_path / "sweep.toml"
    job_file.write_text(text)
    r = subprocess.run([_kdpipe(), "run", str(job_file)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "runs" / "sweep"
    ev = _events(run_dir)
    starts = [e[1] for e in ev if e[0] == "start"]
    assert starts.count("generate") == 1 and starts.count("finalize") == 1
    assert starts.count("train") == 4
    assert all(e[-1] == "0" for e in ev if e[0] == "exit")
    assert starts.index("finalize") < starts.index("train")  # every student after the single teacher pass
    names = sorted(p.name for p in (run_dir / "runs").iterdir())
    assert names == sorted(f"kd-a{a}-{d}" for a in ("0.2", "0.5") for d in ("forward_kl", "generalized_jsd"))
    stores = {tuple(json.loads(json.dumps(_toml(run_dir / "runs" / n / "final" / "train_config.toml")["stores"]))) for n in names}
    assert stores == {(str(tmp_path / "store"),)}

    # A second job (another student sweep, same teacher/data/generation) on the same store: the
    # plan finds the finalized store with the same cache key, so no teacher pass at all.
    job2 = tmp_path / "sweep2.toml"
    job2.write_text(text.replace('name = "sweep"', 'name = "sweep2"').replace("alpha = [0.2, 0.5]", "alpha = 0.3")
                    .replace('divergence = ["forward_kl", "generalized_jsd"]', 'divergence = "reverse_kl"'))
    plan = make_plan(load_job(job2))
    assert plan.store.status == "finalized" and plan.store.cache_key == plan.store.expected_key
    assert [s.kind for s in plan.steps] == ["train"]
    r = subprocess.run([_kdpipe(), "run", str(job2)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generate and finalize skipped" in r.stdout
    assert [e[1] for e in _events(tmp_path / "runs" / "sweep2") if e[0] == "start"] == ["train"]


def _toml(path):
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)
