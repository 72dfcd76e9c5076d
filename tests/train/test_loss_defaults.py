"""Issue 22: loss_backward and loss_chunk_size resolve per device (config.loss_defaults) in the trainer, on the
device that trains, and RUN/train_config.toml records the resolved values; a config built elsewhere (a job
planned on a machine without a GPU) keeps "auto"."""

from __future__ import annotations

import pytest

from kdpipe.pipeline.config import config_to_dict, load_config, read_toml, write_resolved
from kdpipe.pipeline.train.config import TrainConfig, loss_defaults
from kdpipe.storage.errors import ConfigError

from train_stores import topk_store  # noqa: F401 (fixture)


def test_loss_defaults_per_device():
    assert loss_defaults("cuda") == {"loss_backward": "in_forward", "loss_chunk_size": 4096}
    assert loss_defaults("cpu") == {"loss_backward": "in_forward", "loss_chunk_size": 1024}


@pytest.mark.parametrize("device, want", [("cpu", ("in_forward", 1024)), ("cuda", ("in_forward", 4096))])
def test_auto_resolves_per_device_and_the_resolved_config_is_written(tmp_path, device, want):
    cfg = TrainConfig(student="s", stores=("a",), out="o")
    assert config_to_dict(cfg)["loss_backward"] == "auto" and config_to_dict(cfg)["loss_chunk_size"] == 0
    run = cfg.with_loss_defaults(device)
    assert (run.loss_backward, run.loss_chunk_size) == want
    path = tmp_path / "train_config.toml"
    write_resolved(run, path)
    saved = read_toml(path)
    assert (saved["loss_backward"], saved["loss_chunk_size"]) == want
    assert load_config(TrainConfig, path) == run  # the written file reproduces the run, on any machine


def test_explicit_values_are_kept_and_bad_ones_refused():
    cfg = TrainConfig(student="s", stores=("a",), out="o", loss_backward="recompute", loss_chunk_size=512)
    assert cfg.with_loss_defaults("cuda") == cfg
    cfg = TrainConfig(student="s", stores=("a",), out="o", loss_backward="recompute").with_loss_defaults("cpu")
    assert (cfg.loss_backward, cfg.loss_chunk_size) == ("recompute", 1024)
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        TrainConfig(student="s", stores=("a",), out="o", loss_chunk_size=-1)
    with pytest.raises(ConfigError, match="loss_backward"):
        TrainConfig(student="s", stores=("a",), out="o", loss_backward="later")


def test_train_student_writes_the_resolved_loss_settings(tiny_student, topk_store, tmp_path):
    from kdpipe.pipeline.train.trainer import train

    cfg = TrainConfig(student=str(tiny_student), stores=(str(topk_store),), out=str(tmp_path / "run"), steps=2,
                      tokens_per_batch=160, save_every=0, shuffle_buffer=4, seed=1)
    result = train(cfg)
    for f in (result.run / "train_config.toml", result.final / "train_config.toml"):
        saved = read_toml(f)
        assert (saved["loss_backward"], saved["loss_chunk_size"]) == ("in_forward", 1024), f


def test_the_benchmarks_reuse_a_finished_run_of_the_same_config(tiny_student, topk_store, tmp_path):
    """bench_quality and bench_xtok reuse RUN/final when it holds their config (qualitylib.finished_run_is). The run's
    saved config holds the resolved loss fields and theirs "auto": compared as they were, every finished run looked
    stale ("saved config differs, retraining") and was trained again."""
    import dataclasses
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from kdpipe.pipeline.train.trainer import train

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_quality
    from qualitylib import finished_run_is

    args = SimpleNamespace(student_lr=3e-3, student_steps=2, tokens_per_batch=160)
    cfg = bench_quality.run_config(tmp_path / "run", tiny_student, topk_store, 1, args, alpha=0.5)
    assert cfg.loss_backward == "auto" and not bench_quality.is_done(cfg)
    train(cfg)
    assert bench_quality.is_done(cfg) and finished_run_is(tmp_path / "run", cfg)
    assert not finished_run_is(tmp_path / "run", dataclasses.replace(cfg, alpha=0.2))
    assert not finished_run_is(tmp_path / "run", dataclasses.replace(cfg, loss_chunk_size=256))


def test_stores_given_as_a_list_or_one_path_are_that_tuple(tmp_path, monkeypatch):
    """TrainConfig(stores=["store"]) is a natural library call: it made one path named "/cwd/['store']"."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    want = TrainConfig(student="s", stores=("store",), out="run", val_stores=("val",))
    for stores, val in ((["store"], ["val"]), ("store", "val"), (Path("store"), Path("val"))):
        got = TrainConfig(student="s", stores=stores, out="run", val_stores=val)
        assert got == want and got.stores == (str(tmp_path / "store"),), got.stores
    assert TrainConfig(student="s", stores=("a", "b"), out="run").stores == (str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="stores"):
        TrainConfig(student="s", stores=[], out="run")
