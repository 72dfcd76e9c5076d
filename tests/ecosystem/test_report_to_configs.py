"""--report-to is one field of TrainConfig and EvalConfig, so train-student, evaluate and the job file
all take it (a TOML list is the value, not a sweep)."""

from __future__ import annotations

import pytest

from kdpipe.storage.errors import ConfigError

JOB = """
name = "eco"
run_dir = "runs/eco"
[teacher]
model = "org/teacher"
[data]
dataset = "org/data"
[generation]
recipe = "summarize"
codec = "topk"
k = 8
store = "stores/eco"
[[students]]
model = "org/student"
steps = 10
report_to = ["tensorboard", "mlflow"]
[evaluation]
data = "heldout.jsonl"
report_to = "wandb"
"""


def test_job_file_takes_report_to(tmp_path):
    from kdpipe.jobs.phases import eval_config, train_config, train_list_fields
    from kdpipe.jobs.spec import expand_students, load_job

    path = tmp_path / "eco.toml"
    path.write_text(JOB)
    job = load_job(path)
    runs = expand_students(job, train_list_fields())
    assert len(runs) == 1  # the list is the value, not a sweep over trackers
    cfg = train_config(job, runs[0], tmp_path / "runs" / "eco" / "r0")
    assert cfg.report_to == ("tensorboard", "mlflow")
    ev = eval_config(job, runs[0], tmp_path / "runs" / "eco" / "r0")
    assert ev.report_to == ("wandb",)

    path.write_text(JOB.replace('report_to = "wandb"', 'report_to = "tensorbored"'))
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbored' \(did you mean 'tensorboard'\?\)"):
        eval_config(load_job(path), runs[0], tmp_path / "r0")


def test_evaluate_and_train_flags(monkeypatch):
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.evaluate.config import EvalConfig
    from kdpipe.pipeline.train.config import TrainConfig

    monkeypatch.delenv("KDPIPE_REPORT_TO", raising=False)
    ev = load_config(EvalConfig, None, {"models": ["m"], "data": "d.jsonl", "out": "o", "report_to": "trackio,wandb"})
    assert ev.report_to == ("trackio", "wandb")
    tr = load_config(TrainConfig, None, {"student": "s", "stores": ["x"], "out": "o"})
    assert tr.report_to == () and tr.push_to_hub is None
    monkeypatch.setenv("KDPIPE_REPORT_TO", "mlflow")
    assert load_config(TrainConfig, None, {"student": "s", "stores": ["x"], "out": "o"}).report_to == ("mlflow",)
