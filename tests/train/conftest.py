"""Stores for the train tests, written with ShardWriter from a transformers forward of the tiny teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_stores import build_store


@pytest.fixture(scope="session")
def topk_store(tmp_path_factory, tiny_teacher) -> Path:
    return build_store(tiny_teacher, tmp_path_factory.mktemp("store") / "topk", top_k=8)


@pytest.fixture(scope="session")
def sampled_store(tmp_path_factory, tiny_teacher) -> Path:
    return build_store(tiny_teacher, tmp_path_factory.mktemp("store") / "sampled", codec_name="sampled", top_k=8, n_seqs=8)
