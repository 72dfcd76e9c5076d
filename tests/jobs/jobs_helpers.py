"""Constants and tiny job files shared by the job-layer tests (imported by name: tests/jobs is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "jobs" / "examples"
CORPUS = REPO / "pipeline" / "data" / "summarization.jsonl"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")  # same rule as tests/conftest.py

# A tiny chain: HF reference engine for the teacher pass (no 40 s engine start per array task),
# 2 array tasks over 8 documents, a 2-step student. Sections are appended by `tiny_job_text`.
TINY_JOB = """\
name = "tiny"
[teacher]
model = "{teacher}"
dtype = "float32"
max_model_len = 256
engine = "hf"

[data]
dataset = "{data}"
text_field = "document"
id_field = "id"
limit = 8

[generation]
recipe = "summarize"
k = 4
num_tasks = 2
store = "{store}"
max_new_tokens = 6
progress = false

[[students]]
name = "s"
model = "{student}"
alpha = {alpha}
temperature = 2.0
steps = 2
tokens_per_batch = 256
save_every = 0

[slurm]
cpus_per_task = 1
mem = "2G"
"""

TINY_EVAL = """
[evaluation]
data = "{data}"
max_samples = 2
max_new_tokens = 6
max_model_len = 256
similarity_model = "none"
bootstrap_samples = 100
plots = false
warmup_requests = 0
"""


def tiny_job_text(teacher, student, data, store="store", alpha="0.5", evaluation=False) -> str:
    def esc(p) -> str:  # a TOML basic string: escape backslashes and quotes
        return str(p).replace("\\", "\\\\").replace('"', '\\"')

    text = TINY_JOB.format(teacher=esc(teacher), student=esc(student), data=esc(data), store=esc(store), alpha=alpha)
    if evaluation:
        text += TINY_EVAL.format(data=esc(data))
    return text


def with_local_models(path: Path, tmp_path: Path) -> Path:
    """The example copied beside the local model folders it names (`kdpipe demo` and the benchmarks build
    them), created empty: a missing local model is refused, and the test is about the job file itself."""
    import shutil
    import tomllib

    from kdpipe.pipeline.config import looks_like_path

    data = tomllib.loads(path.read_text())
    models = [data["teacher"]["model"], *(s.get("model", "") for s in data.get("students", []))]
    copy = tmp_path / "jobs" / "examples" / path.name
    copy.parent.mkdir(parents=True)
    shutil.copy(path, copy)
    for m in models:
        if isinstance(m, str) and looks_like_path(m):
            (copy.parent / m).mkdir(parents=True, exist_ok=True)
    return copy
