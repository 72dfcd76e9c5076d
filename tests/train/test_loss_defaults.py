"""Issue 22: loss_backward and loss_chunk_size resolve per device (config.loss_defaults), once, in TrainConfig, and
the resolved values are what RUN/train_config.toml records."""

from __future__ import annotations

import pytest

from kdpipe.pipeline.config import load_config, read_toml, write_resolved
from kdpipe.pipeline.train.config import TrainConfig, loss_defaults, resolved_device
from kdpipe.storage.errors import ConfigError


def test_loss_defaults_per_device():
    assert loss_defaults("cuda") == {"loss_backward": "in_forward", "loss_chunk_size": 4096}
    assert loss_defaults("cpu") == {"loss_backward": "in_forward", "loss_chunk_size": 1024}


@pytest.mark.parametrize("device, want", [("cpu", ("in_forward", 1024)), ("cuda", ("in_forward", 4096)),
                                          ("auto", None)])
def test_auto_resolves_in_the_config_and_is_written(tmp_path, device, want):
    cfg = TrainConfig(student="s", stores=("a",), out="o", device=device)
    if want is None:  # auto: whatever this machine has
        want = tuple(loss_defaults(resolved_device("auto")).values())
    assert (cfg.loss_backward, cfg.loss_chunk_size) == want
    path = tmp_path / "train_config.toml"
    write_resolved(cfg, path)
    saved = read_toml(path)
    assert (saved["loss_backward"], saved["loss_chunk_size"]) == want
    assert load_config(TrainConfig, path) == cfg  # the written file reproduces the run, on any machine


def test_explicit_values_are_kept_and_bad_ones_refused():
    cfg = TrainConfig(student="s", stores=("a",), out="o", device="cuda", loss_backward="recompute", loss_chunk_size=512)
    assert (cfg.loss_backward, cfg.loss_chunk_size) == ("recompute", 512)
    cfg = TrainConfig(student="s", stores=("a",), out="o", device="cpu", loss_backward="recompute")
    assert (cfg.loss_backward, cfg.loss_chunk_size) == ("recompute", 1024)
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        TrainConfig(student="s", stores=("a",), out="o", loss_chunk_size=-1)
    with pytest.raises(ConfigError, match="loss_backward"):
        TrainConfig(student="s", stores=("a",), out="o", loss_backward="later")
