"""Job files: every shipped example parses and plans; each kind of bad input gets a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdpipe.jobs.plan import describe, make_plan
from kdpipe.jobs.spec import load_job
from kdpipe.storage.errors import ConfigError

from jobs_helpers import EXAMPLES, with_local_models

SHIPPED = sorted(EXAMPLES.glob("*.toml"))
REFERENCE_PAIRS = {
    "llama-3.1-70b-to-8b.toml": ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    "qwen2.5-72b-to-7b.toml": ("Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
    "gemma-2-27b-to-2b.toml": ("google/gemma-2-27b-it", "google/gemma-2-2b-it"),
    "falcon-40b-to-7b.toml": ("tiiuae/falcon-40b-instruct", "tiiuae/falcon-7b-instruct"),
}
# bf16 weights (GB) of each teacher: TP x 80 GB must hold them with room for the KV cache.
TEACHER_GB = {"meta-llama/Llama-3.1-70B-Instruct": 141, "Qwen/Qwen2.5-72B-Instruct": 145,
              "google/gemma-2-27b-it": 55, "tiiuae/falcon-40b-instruct": 84}


def test_examples_are_shipped():
    names = {p.name for p in SHIPPED}
    assert set(REFERENCE_PAIRS) <= names
    assert "basic-reading.toml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_example_parses_and_plans(path, tmp_path):
    job = load_job(with_local_models(path, tmp_path), run_dir=tmp_path / "run")
    plan = make_plan(job)
    text = describe(plan)
    assert job.name in text
    kinds = [s.kind for s in plan.steps]
    # one train step per [[students]] run, plus one per on-policy round
    assert kinds.count("train") == len(plan.runs) + len(plan.rounds) >= 1
    assert [s.name for s in plan.steps if s.kind == "train"][len(plan.runs):] == [f"onpolicy-r{r.index}-train" for r in plan.rounds]
    if plan.store.status == "new":
        gen = plan.step("generate")
        assert gen.tasks == tuple(range(job.generation.num_tasks))
        assert plan.step("finalize").after == ("generate",)
    for run in plan.runs:
        assert plan.step(f"train-{run.name}").config_text  # the phase config was built and rendered


@pytest.mark.parametrize("name", sorted(REFERENCE_PAIRS))
def test_reference_pairs_fit_80gb_gpus(name):
    job = load_job(EXAMPLES / name)
    teacher, student = REFERENCE_PAIRS[name]
    assert job.teacher.model == teacher
    assert {s.values["model"] for s in job.students} == {student}
    tp = job.teacher.tensor_parallel_size
    assert tp * 80 > TEACHER_GB[teacher] * 1.15, f"{name}: TP {tp} leaves no KV-cache room"
    assert tp <= job.slurm.gpus_per_node
    assert job.data["dataset"] == "EdinburghNLP/xsum" and job.data["text_field"] == "document"


def test_sweep_expands_to_one_run_per_combination(tmp_path):
    plan = make_plan(load_job(EXAMPLES / "llama-3.1-70b-to-8b.toml", run_dir=tmp_path))
    assert [r.swept["alpha"] for r in plan.runs] == [0.3, 0.5, 0.7]
    assert len({r.name for r in plan.runs}) == 3
    for r in plan.runs:
        assert f"alpha = {r.swept['alpha']}" in plan.step(f"train-{r.name}").config_text


# -- bad input --------------------------------------------------------------------------------------

BASE = """\
name = "bad"
[teacher]
model = "org/teacher"
tensor_parallel_size = 2
[data]
dataset = "docs.jsonl"
text_field = "document"
[generation]
k = 8
num_tasks = 2
store = "store"
[[students]]
model = "org/student"
alpha = 0.5
steps = 10
[slurm]
gpus_per_node = 4
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def plan_error(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        make_plan(load_job(p))
    msg = str(e.value)
    assert str(p) in msg, f"the error does not name the file: {msg}"
    return msg


def test_base_is_valid(tmp_path):
    plan = make_plan(load_job(write(tmp_path, BASE)))
    assert plan.step("generate").gpus == 2


@pytest.mark.parametrize(
    "edit, key, suggestion",
    [
        (("[[students]]", "[[studnets]]"), "studnets", "students"),
        (("gpus_per_node = 4", "gpus_per_node = 4\npartiton = \"gpu\""), "partiton", "partition"),
        (("k = 8", "k = 8\nrecipie = \"summarize\""), "recipie", "recipe"),
        (("alpha = 0.5", "alhpa = 0.5"), "alhpa", "alpha"),
        (("tensor_parallel_size = 2", "tensor_paralel_size = 2"), "tensor_paralel_size", "tensor_parallel_size"),
        (("text_field = \"document\"", "text_feild = \"document\""), "text_feild", "text_field"),
    ],
)
def test_unknown_keys_get_did_you_mean(tmp_path, edit, key, suggestion):
    msg = plan_error(tmp_path, BASE.replace(*edit))
    assert f"unknown key '{key}'" in msg and f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize(
    "edit, words",
    [
        (("model = \"org/teacher\"\n", ""), ["missing required key 'model'", "[teacher]"]),
        (("store = \"store\"\n", ""), ["missing required key 'store'", "[generation]"]),
        (("model = \"org/student\"\n", ""), ["missing required key 'model'", "[[students]] #1"]),
        (("name = \"bad\"\n", ""), ["missing required key 'name'"]),
    ],
)
def test_missing_required_keys(tmp_path, edit, words):
    msg = plan_error(tmp_path, BASE.replace(*edit))
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "edit, key, what",
    [
        (("steps = 10", 'steps = "6"'), "[[students]] #1 steps", "an integer, got the string '6'"),
        (("alpha = 0.5", 'alpha = "0.5"'), "[[students]] #1 alpha", "a number, got the string '0.5'"),
        (("alpha = 0.5", 'alpha = 0.5\noptimizer = { lr = "3e-3" }'), "[[students]] #1.optimizer lr", "a number, got the string '3e-3'"),
        (("alpha = 0.5", 'alpha = ["0.5", 0.7]'), "[[students]] #1 alpha", "a number, got the string '0.5'"),
        (("k = 8", 'k = "8"'), "[generation] k", "an integer, got the string '8'"),
    ],
)
def test_quoted_numbers_are_refused_naming_the_key_as_written(tmp_path, edit, key, what):
    """TOML has numbers: "6" where a number goes is a slip, refused under the key the user wrote
    (`[generation] k`, not the phase's `top_k` behind `[teacher]/[data]/[generation]`)."""
    msg = plan_error(tmp_path, BASE.replace(*edit))
    assert f"{tmp_path / 'job.toml'} {key}: expected {what}; write the number without quotes" in msg, msg
    assert "top_k" not in msg and "[teacher]/[data]" not in msg


@pytest.mark.parametrize("edit, key", [
    (('model = "org/teacher"', 'model = "./models/teacher"'), "[teacher] model"),
    (('model = "org/student"', 'model = "../models/student"'), "[[students]] #1 model"),
])
def test_missing_local_model_says_no_such_directory(tmp_path, edit, key):
    msg = plan_error(tmp_path, BASE.replace(*edit))
    path = os.path.normpath(tmp_path / edit[1].split('"')[1])
    assert f"{tmp_path / 'job.toml'} {key}: no such directory: {path}" in msg and "Repo id" not in msg, msg


def test_no_students(tmp_path):
    text = BASE[: BASE.index("[[students]]")] + "[slurm]\ngpus_per_node = 4\n"
    assert "[[students]]" in plan_error(tmp_path, text)


def test_tensor_parallel_larger_than_gpus_per_node(tmp_path):
    msg = plan_error(tmp_path, BASE.replace("tensor_parallel_size = 2", "tensor_parallel_size = 8"))
    assert "tensor_parallel_size = 8" in msg and "gpus_per_node = 4" in msg


def test_student_gpus_larger_than_node(tmp_path):
    msg = plan_error(tmp_path, BASE.replace("steps = 10", "steps = 10\ngpus = 8"))
    assert "gpus" in msg and "more nodes" in msg


def test_sweep_to_zero_runs(tmp_path):
    msg = plan_error(tmp_path, BASE.replace("alpha = 0.5", "alpha = []"))
    assert "zero runs" in msg and "alpha" in msg


def test_sweep_over_nodes_and_optimizer(tmp_path):
    text = BASE.replace("alpha = 0.5", "alpha = 0.5\nnodes = [1, 2]\ngpus = 4\noptimizer = { lr = [1e-5, 3e-5] }")
    plan = make_plan(load_job(write(tmp_path, text)))
    assert sorted((r.nodes, r.values["lr"]) for r in plan.runs) == [(1, 1e-5), (1, 3e-5), (2, 1e-5), (2, 3e-5)]


def test_phase_validation_names_file_and_key(tmp_path):
    msg = plan_error(tmp_path, BASE.replace("alpha = 0.5", "alpha = 1.5"))
    assert "alpha" in msg and "[0, 1]" in msg
    msg = plan_error(tmp_path, BASE.replace("k = 8", "k = 8\ncodec = \"zip\""))
    assert "codec" in msg and "'topk'" in msg


@pytest.mark.parametrize(
    "edit, words",
    [
        (("gpus_per_node = 4", "gpus_per_node = 4\ntime = { train = \"2 days\" }"), ["time.train", "HH:MM:SS"]),
        (("gpus_per_node = 4", "gpus_per_node = 4\ntime = { trian = \"10\" }"), ["unknown key 'trian'", "train"]),
        (("gpus_per_node = 4", "gpus_per_node = 4\nmem = \"lots\""), ["mem", "64G"]),
        (("gpus_per_node = 4", "gpus_per_node = 4\npartition = \"gpu; rm -rf /\""), ["partition", "not a Slurm name"]),
        (("gpus_per_node = 4", "gpus_per_node = 4\nextra_sbatch = [\"--exclusive\\n#SBATCH --x\"]"), ["extra_sbatch[0]", "one line"]),
        (("gpus_per_node = 4", "gpus_per_node = 4\nextra_sbatch = [\"exclusive\"]"), ["extra_sbatch[0]", "--constraint"]),
        (("name = \"bad\"", "name = \"bad name/..\""), ["name", "letters, digits"]),
        (("num_tasks = 2", "num_tasks = 0"), ["num_tasks", ">= 1"]),
        (("store = \"store\"", "store = \"store\"\nout = \"elsewhere\""), ["out", "generation.store"]),
    ],
)
def test_bad_values(tmp_path, edit, words):
    msg = plan_error(tmp_path, BASE.replace(*edit))
    for w in words:
        assert w in msg, msg


def test_duplicate_run_names(tmp_path):
    text = BASE + "\n[[students]]\nmodel = \"org/student\"\nalpha = 0.7\n"
    assert "both named 'student'" in plan_error(tmp_path, text)


def test_invalid_toml_names_the_file(tmp_path):
    msg = plan_error(tmp_path, BASE + "\n[slurm\n")
    assert "not valid TOML" in msg


def test_paths_resolve_against_the_job_file(tmp_path, monkeypatch):
    p = write(tmp_path, BASE)
    monkeypatch.chdir("/")
    job = load_job(p)
    assert job.generation.store == tmp_path / "store"
    assert job.run_dir == tmp_path / "runs" / "bad"
    assert f'out = "{tmp_path / "store"}"' in make_plan(job).step("generate").config_text


def test_evaluation_runs_selector(tmp_path):
    text = BASE.replace("alpha = 0.5", "alpha = [0.5, 1.0]") + "\n[evaluation]\ndata = \"held.jsonl\"\nruns = [\"student-a1.0\"]\n"
    plan = make_plan(load_job(write(tmp_path, text)))
    assert [s.name for s in plan.steps if s.kind == "evaluate"] == ["evaluate-student-a1.0"]
    cfg = plan.step("evaluate-student-a1.0").config_text
    import tomllib

    doc = tomllib.loads(cfg)
    assert "runs" not in doc and doc["models"][1] == str(tmp_path / "runs" / "bad" / "runs" / "student-a1.0")
    msg = plan_error(tmp_path, text.replace('runs = ["student-a1.0"]', 'runs = ["student-a1.O"]'))
    assert "did you mean 'student-a1.0'" in msg
