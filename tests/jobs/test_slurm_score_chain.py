"""A score-store chain under the real one-node Slurm: the `afterok` links hold (issue 11 §1).

Teacher-forced `score` at k=64 under vLLM used to exit 134 after finishing (vLLM/torch teardown),
so Slurm marked the finished array task FAILED and `finalize`'s `afterok` never fired. Here the
generate task (vLLM, 100 documents of ~300 tokens, k=64) must end COMPLETED with exit 0, then
finalize, then the student, each starting only after the one before ended.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.vllm]

WORDS = ("the city council approved a new budget for parks and schools on monday researchers in paris "
         "reported that river reached its highest level ten years quick brown fox jumps over lazy dog").split()

JOB = """\
name = "score-slurm"
[teacher]
model = "{teacher}"
dtype = "float32"
max_model_len = 1024
enforce_eager = true

[data]
dataset = "{data}"
text_field = "document"
target_field = "ref"
id_field = "id"

[generation]
recipe = "score"
k = 64
num_tasks = 1
store = "store"
progress = false

[[students]]
name = "s"
model = "{student}"
alpha = 0.5
temperature = 2.0
steps = 2
tokens_per_batch = 512
save_every = 0

[slurm]
cpus_per_task = 2
mem = "6G"
time = {{ generate = "00:20:00", finalize = "00:05:00", train = "00:15:00" }}
"""


def text(rng, sentences: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS, size=int(rng.integers(5, 12)))).capitalize() + "." for _ in range(sentences))


def events(run_dir: Path) -> list[list[str]]:
    return [ln.split() for ln in (run_dir / "events.log").read_text().splitlines() if ln.strip()]


def test_score_chain_afterok_links_hold(slurm_cluster, tmp_path, tiny_teacher, tiny_student):
    from kdtest import require

    require("vllm", "the generate task runs the teacher under vLLM")
    rng = np.random.default_rng(13)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "document": text(rng, 22), "ref": text(rng, 3)}) + "\n"
                            for i in range(100)))
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(teacher=tiny_teacher, data=data, student=tiny_student))
    kdpipe = shutil.which("kdpipe", path=os.path.dirname(sys.executable))
    r = subprocess.run([kdpipe, "submit", str(job)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "runs" / "score-slurm"
    sub = json.loads((run_dir / "submission.json").read_text())
    ids = {j["step"]: j["job_id"] for j in sub["jobs"]}
    assert list(ids) == ["generate", "finalize", "train-s"]
    infos = slurm_cluster.wait(list(ids.values()), timeout=840)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (run_dir / "logs").glob("*.out"))
    for step, recs in infos.items():
        assert all(x["JobState"] == "COMPLETED" for x in recs), f"{step}: {recs}\n{logs}"
    assert infos[ids["generate"]][0]["ExitCode"] == "0:0", infos[ids["generate"]]

    # afterok held: finalize after the generate task exited 0, the student after finalize
    ev = events(run_dir)
    gen_exit = [float(e[0]) for e in ev if e[1] == "exit" and e[2] == "generate"]
    assert gen_exit and all(e[4] == "0" for e in ev if e[1] == "exit" and e[2] == "generate"), ev
    fin_start = [float(e[0]) for e in ev if e[1] == "start" and e[2] == "finalize"]
    fin_end = [float(e[0]) for e in ev if e[1] == "exit" and e[2] == "finalize"]
    train_start = [float(e[0]) for e in ev if e[1] == "start" and e[2] == "train"]
    assert fin_start and fin_start[0] >= max(gen_exit)
    assert train_start and train_start[0] >= fin_end[0]
    assert f"--dependency=afterok:{ids['generate']}" in (run_dir / "scripts" / "finalize.sbatch").read_text()
    assert (tmp_path / "store" / "manifest.json").is_file()
    assert (run_dir / "runs" / "s" / "final").is_dir()
