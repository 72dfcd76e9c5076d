"""--report-to: a real train-student run (then resumed) logs to TensorBoard, W&B (offline), MLflow
(file store) and trackio (local db); each is read back with the library's own reader and compared
with metrics.jsonl: scalar names, steps and values. Plus the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.storage.errors import ConfigError

from eco_helpers import build_store, expected_scalars, metrics, topk_store, tracker_env  # noqa: F401
from kdtest import require

import readers

ALL = ("tensorboard", "wandb", "mlflow", "trackio")


def cfg_for(student, store, out, **kw) -> TrainConfig:
    values = dict(student=str(student), stores=(str(store),), out=str(out), steps=4, tokens_per_batch=160, lr=2e-3,
                  save_every=2, shuffle_buffer=4, alpha=0.5, temperature=2.0, seed=3, report_to=ALL,
                  val_fraction=0.25, eval_every=2)
    values.update(kw)
    return TrainConfig(**values)


def _same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], what: str) -> None:
    assert set(got) == set(want), f"{what}: scalar names {sorted(got)} != metrics.jsonl {sorted(want)}"
    for name, steps in want.items():
        assert sorted(got[name]) == sorted(steps), f"{what}: {name} steps {sorted(got[name])} != {sorted(steps)}"
        for s, v in steps.items():
            assert math.isclose(got[name][s], v, rel_tol=1e-6, abs_tol=1e-6), f"{what}: {name}@{s} {got[name][s]} != {v}"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_student, topk_store):
    """4 steps with checkpoints every 2, then --resume to 6 steps: the same tracker runs continue."""
    for m in ALL:
        require(m, "--report-to tests read back with each tracker's own library")
    from kdpipe.pipeline.train.trainer import train

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("trackers")
    tracker_env(mp, root)
    out = root / "run"
    try:
        first = train(cfg_for(tiny_student, topk_store, out))
        state_first = json.loads((out / "trackers" / "state.json").read_text())
        second = train(cfg_for(tiny_student, topk_store, out, steps=6, resume=True))
    finally:
        mp.undo()
    assert first.steps == 4 and second.steps == 6
    return out, state_first, json.loads((out / "trackers" / "state.json").read_text()), root


def test_every_tracker_holds_metrics_jsonl(tracked_run, monkeypatch):
    out, first, state, root = tracked_run
    want = expected_scalars(out)
    assert "validation/loss" in want and "train/grad_norm" in want and max(want["train/loss"]) == 6
    # a resumed run continues the same tracker runs: ids / log dir kept in RUN/trackers/state.json
    assert first["trackers"] == state["trackers"]
    t = state["trackers"]

    _same(readers.tensorboard_scalars(Path(t["tensorboard"]["logdir"])), want, "tensorboard")

    got, params, tags, _ = readers.mlflow_run(t["mlflow"]["tracking_uri"], t["mlflow"]["run_id"])
    _same(got, want, "mlflow")
    assert params["alpha"] == "0.5" and params["stores"] == str(out.parent.parent / "store" / "topk") or params["stores"]
    assert len(tags["kdpipe.store.cache_key"]) == 64 and tags["kdpipe.store.teacher"]

    hist, config = readers.wandb_history(Path(t["wandb"]["dir"]), t["wandb"]["id"])
    _same(hist, want, "wandb")
    assert config["temperature"] == 2.0 and len(config["kdpipe.store.cache_key"]) == 64

    monkeypatch.setenv("TRACKIO_DIR", str(root / "trackio"))
    logs, tconfig = readers.trackio_logs(t["trackio"]["project"], t["trackio"]["name"])
    _same(logs, want, "trackio")


def test_evaluate_report_to_reaches_the_run_and_its_card(tracked_run, tiny_teacher, tmp_path, monkeypatch):
    """kdpipe evaluate --report-to (engine hf: no engine start): the evaluated run's own tracker runs get
    the headline at its last step and the report's plots as images; its model card gets the headline."""
    from kdpipe.pipeline.evaluate import EvalConfig, evaluate

    out, _, state, root = tracked_run
    tracker_env(monkeypatch, root)
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "document": d, "summary": s}) + "\n" for i, (d, s) in enumerate([
        ("The city council approved a new budget for parks.", "Council approves park budget."),
        ("Researchers in Paris reported that the river rose.", "Paris river rose."),
    ])))
    fields = set(EvalConfig.__dataclass_fields__)
    names = {"text_field": "document", "target_field": "summary"} if "text_field" in fields else {}
    report = evaluate(EvalConfig(models=(str(tiny_teacher), str(out)), names=("teacher", "kd"), data=str(data),
                                 out=str(tmp_path / "report"), split="", engine="hf", similarity_model="none",
                                 max_new_tokens=4, max_model_len=256, bootstrap_samples=100, warmup_requests=1,
                                 report_to=ALL, **names))
    kd = next(m for m in report["models"] if m["name"] == "kd")
    rouge = kd["quality"]["rougeL"]["mean"]
    plots = [p.rsplit(".", 1)[0] for p in report["plots"]]
    assert plots, "the report wrote no plots"
    t = state["trackers"]
    tb = readers.tensorboard_scalars(Path(t["tensorboard"]["logdir"]))
    assert tb["eval/rougeL"] == {6: pytest.approx(rouge, abs=1e-6)}
    assert set(readers.tensorboard_images(Path(t["tensorboard"]["logdir"]))) == {f"eval/{p}" for p in plots}
    got, _, _, artifacts = readers.mlflow_run(t["mlflow"]["tracking_uri"], t["mlflow"]["run_id"])
    assert got["eval/rougeL"] == {6: pytest.approx(rouge)} and sorted(artifacts) == sorted(f"plots/{p}" for p in report["plots"])
    hist, _ = readers.wandb_history(Path(t["wandb"]["dir"]), t["wandb"]["id"])
    assert hist["eval/rougeL"] == {6: pytest.approx(rouge)} and hist[f"eval/{plots[0]}"][6]["_type"] == "image-file"
    logs, _ = readers.trackio_logs(t["trackio"]["project"], t["trackio"]["name"])
    assert logs["eval/rougeL"] == {6: pytest.approx(rouge)} and f"eval/{plots[0]}" in logs
    # the training metrics are untouched by the evaluation
    _same({k: v for k, v in tb.items() if not k.startswith("eval/")}, expected_scalars(out), "tensorboard after eval")
    card = (out / "final" / "README.md").read_text()
    r1 = kd["quality"]["rouge1"]["mean"]  # the card's first headline column
    assert "Evaluated with `kdpipe evaluate` on 2 examples" in card and f"| kd | student | {r1:.3f} |" in card


def test_closed_trackio_run_is_not_finished_again_at_exit(tmp_path, monkeypatch, capfd):
    """A closed trackio run is no longer trackio's current run: its atexit hook has nothing left to
    finish, so no "Run finished. Uploading logs to Trackio" line prints when the process exits."""
    require("trackio", "the tracker under test")
    import trackio

    from kdpipe.pipeline.trackers import open_trackers

    tracker_env(monkeypatch, tmp_path)
    t = open_trackers(("trackio",), tmp_path / "trackers", "run", {"lr": 1e-3})
    t.log_metrics({"step": 1, "loss": 2.0})
    t.close()
    capfd.readouterr()
    trackio._cleanup_current_run()  # what trackio registered with atexit
    assert "Run finished" not in capfd.readouterr().out
    logs, _ = readers.trackio_logs(t.state["trackers"]["trackio"]["project"], t.state["trackers"]["trackio"]["name"])
    assert logs["train/loss"] == {1: 2.0}  # closing still flushed the run's logs


# ------------------------------------------------------------------------------------ refusals


def test_unknown_tracker_name_suggests(monkeypatch):
    from kdpipe.pipeline.trackers import parse_report_to

    with pytest.raises(ConfigError, match=r"report_to: unknown tracker 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        TrainConfig(student="s", stores=("x",), out="o", report_to=("tensorbord",))
    monkeypatch.setenv("KDPIPE_REPORT_TO", "wandb,mlfow")
    with pytest.raises(ConfigError, match=r"KDPIPE_REPORT_TO.*'mlfow' \(did you mean 'mlflow'\?\)"):
        TrainConfig(student="s", stores=("x",), out="o")
    monkeypatch.setenv("KDPIPE_REPORT_TO", "tensorboard, wandb")
    assert TrainConfig(student="s", stores=("x",), out="o").report_to == ("tensorboard", "wandb")
    assert TrainConfig(student="s", stores=("x",), out="o", report_to=("none",)).report_to == ()
    assert parse_report_to("all") == ALL


def test_missing_library_names_the_extra_before_training(monkeypatch, tmp_path, tiny_student, topk_store):
    from kdpipe.pipeline import trackers
    from kdpipe.pipeline.train.trainer import train

    monkeypatch.setitem(trackers.TRACKERS, "wandb", ("kdpipe_no_such_module", "wandb"))
    with pytest.raises(ConfigError, match=r"wandb requested but not installed; pip install 'kdpipe\[wandb\]'"):
        train(cfg_for(tiny_student, topk_store, tmp_path / "run", report_to=("wandb",)))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything ran


def test_tracker_dir_of_another_run_is_refused(tracked_run, tmp_path, tiny_student, topk_store):
    import shutil

    from kdpipe.pipeline.train.trainer import train

    out = tmp_path / "reuse"
    out.mkdir()
    shutil.copytree(tracked_run[0] / "trackers", out / "trackers")  # trackers, but no checkpoint to resume
    with pytest.raises(ConfigError, match=r"reuse/trackers: holds the tracker runs of another run \(.*wandb [0-9a-f]+"):
        train(cfg_for(tiny_student, topk_store, out, report_to=("tensorboard",)))


def test_only_rank_0_logs_under_torchrun(tmp_path, tiny_student, topk_store, monkeypatch):
    """2 DDP ranks: one TensorBoard event file and one MLflow run, holding rank 0's metrics.jsonl."""
    import os
    import subprocess
    import sys

    from kdpipe.pipeline.config import write_resolved

    require("tensorboard", "read back the event file")
    require("mlflow", "read back the file store")
    tracker_env(monkeypatch, tmp_path)
    out = tmp_path / "ddp"
    cfg = cfg_for(tiny_student, topk_store, out, steps=3, save_every=0, report_to=("tensorboard", "mlflow"),
                  val_fraction=0.0, eval_every=0)
    write_resolved(cfg, tmp_path / "cfg.toml")
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200),
                        "-m", "kdpipe.pipeline.cli", "train-student", "--config", str(tmp_path / "cfg.toml")],
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads((out / "trackers" / "state.json").read_text())["trackers"]
    assert len(list(Path(state["tensorboard"]["logdir"]).glob("events.out.tfevents.*"))) == 1
    runs = [d for d in (out / "trackers" / "mlruns").glob("*/*") if d.is_dir() and (d / "meta.yaml").exists()]
    assert [d.name for d in runs] == [state["mlflow"]["run_id"]]
    want = expected_scalars(out)
    _same(readers.tensorboard_scalars(Path(state["tensorboard"]["logdir"])), want, "tensorboard (ddp)")
    _same(readers.mlflow_run(state["mlflow"]["tracking_uri"], state["mlflow"]["run_id"])[0], want, "mlflow (ddp)")


def test_evaluation_of_plain_models_gets_its_own_runs_once(tmp_path, monkeypatch):
    from kdpipe.pipeline.trackers import evaluation_to_trackers

    require("tensorboard", "read back the event file")
    tracker_env(monkeypatch, tmp_path)
    report = {"plots": [], "models": [{"name": "a", "role": "teacher", "run": None, "quality": {"rougeL": {"mean": 0.5}}},
                                      {"name": "b", "role": "student", "run": None, "quality": {"rougeL": {"mean": 0.3}}}]}
    evaluation_to_trackers(("tensorboard",), report, tmp_path / "report", {})
    tb = readers.tensorboard_scalars(tmp_path / "report" / "trackers" / "tensorboard")
    assert tb["eval/a/rougeL"] == {0: pytest.approx(0.5)} and tb["eval/b/rougeL"] == {0: pytest.approx(0.3)}
    with pytest.raises(ConfigError, match=r"report/trackers: holds the tracker runs of another run .*choose a new --out"):
        evaluation_to_trackers(("tensorboard",), report, tmp_path / "report", {})


def test_tracker_state_holds_absolute_paths(tmp_path, monkeypatch):
    """RUN/trackers/state.json is read back from anywhere (docs/ecosystem.md): no path relative to the cwd."""
    require("tensorboard", "the TensorBoard tracker")
    from kdpipe.pipeline.trackers import open_trackers

    monkeypatch.chdir(tmp_path)
    t = open_trackers(("tensorboard",), Path("run") / "trackers", "run", {"lr": 1.0})
    t.close()
    state = json.loads((tmp_path / "run" / "trackers" / "state.json").read_text())
    assert state["trackers"]["tensorboard"]["logdir"] == str(tmp_path / "run" / "trackers" / "tensorboard")
