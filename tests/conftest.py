"""Shared fixtures: tiny models built at run time, and the CI rule that nothing is skipped.

In CI (`CI=true`) a missing vLLM or Slurm is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdtest import DEMO_KEY, IN_CI, BackgroundDemo, require  # noqa: F401  (re-exported for fixtures below)

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


# The shared scoring engine: K log-probs, 512-token context, 32-token KV blocks and a 48-block KV
# cache (1,536 tokens), small enough that prefilled prefixes can be evicted (test_score_prefix_cache).
SHARED_K = 8
SHARED_MAX_LEN = 512
SHARED_BLOCK = 32
SHARED_BLOCKS = 48


@pytest.fixture(scope="session")
def shared_vllm_engine(tiny_teacher):
    """One in-process VllmEngine for every test that only needs the tiny teacher's scores (prefix caching on):
    test_matrix_e2e, test_score_prefix_cache, test_validation_e2e, test_xtok_e2e (one engine start costs
    ~20-40 s on 2 cores)."""
    require("vllm", "phase one's default teacher engine")
    from transformers import AutoTokenizer

    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.engines import VllmEngine

    cfg = GenerateConfig(teacher=str(tiny_teacher), data="-", out="-", top_k=SHARED_K, max_model_len=SHARED_MAX_LEN,
                         dtype="float32", enforce_eager=True, score_mode="prefix-cache")
    eng = VllmEngine.from_config(cfg, SHARED_MAX_LEN, len(AutoTokenizer.from_pretrained(tiny_teacher)),
                                 block_size=SHARED_BLOCK, num_gpu_blocks_override=SHARED_BLOCKS)
    yield eng
    eng.close()


# ------------------------------------------------------------------ the demo, started early (kdtest.BackgroundDemo)

DEMO_TESTS = "evaluate/test_demo.py"


def _is_demo(item) -> bool:
    return item.nodeid.replace("\\", "/").split("::")[0].endswith(DEMO_TESTS)


def pytest_collection_modifyitems(config, items):
    """The demo's tests run last: they wait for the demo started when collection ended."""
    items[:] = [i for i in items if not _is_demo(i)] + [i for i in items if _is_demo(i)]


def pytest_collection_finish(session):
    import importlib.util

    if session.config.option.collectonly or not any(_is_demo(i) for i in session.items):
        return
    if importlib.util.find_spec("vllm") is None:
        return  # the demo fixture's require() skips (or fails in CI) as before
    factory = getattr(session.config, "_tmp_path_factory", None)
    root = factory.mktemp("demo") if factory is not None else Path(__import__("tempfile").mkdtemp(prefix="kd-demo-"))
    session.config.stash[DEMO_KEY] = BackgroundDemo(root / "demo-output")


def pytest_sessionfinish(session):
    demo = session.config.stash.get(DEMO_KEY, None)
    if demo is not None:
        demo.stop()
