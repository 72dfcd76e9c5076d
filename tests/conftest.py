"""Shared fixtures: tiny models built at run time, and the CI rule that nothing is skipped.

In CI (`CI=true`) a missing vLLM or Slurm is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdtest import IN_CI, require  # noqa: F401  (re-exported for fixtures below)

# vLLM on CPU: a small KV cache, and the thread binding TP=2 needs on 2-core machines.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    from kdpipe.pipeline.tiny import DEFAULT_CORPUS

    return [DEFAULT_CORPUS] * 4


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_corpus) -> Path:
    """A 2-layer Llama (vocab ~512) with a locally trained tokenizer and chat template."""
    from kdpipe.pipeline.tiny import TinyModelConfig, build_tiny

    return build_tiny(tmp_path_factory.mktemp("teacher"), tiny_corpus, TinyModelConfig(seed=0))


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tiny_teacher) -> Path:
    """A smaller student sharing the teacher's tokenizer (head_dim 32: vLLM's CPU attention needs >= 32)."""
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model

    out = tmp_path_factory.mktemp("student")
    build_model(out, tiny_teacher, TinyModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, seed=1))
    return out
