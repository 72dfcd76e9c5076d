"""Shared fixtures: tiny models built at run time, and the CI rule that nothing is skipped.

In CI (`CI=true`) a missing vLLM or Slurm is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdtest import IN_CI, LANE_KEY, TINY_TEACHER_SEED, BackgroundLane, require  # noqa: F401  (re-exported for fixtures below)

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

    return build_tiny(tmp_path_factory.mktemp("teacher"), tiny_corpus, TinyModelConfig(seed=TINY_TEACHER_SEED))


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


# ------------------------------------------------------------------ the background lane (kdtest.BackgroundLane)


def _job_module(item):
    return item.module if getattr(item.module, "BACKGROUND_JOB", None) is not None else None


def pytest_collection_modifyitems(config, items):
    """Tests of modules with a BACKGROUND_JOB run last: they wait for jobs started when collection ended."""
    items[:] = [i for i in items if _job_module(i) is None] + [i for i in items if _job_module(i) is not None]


def pytest_collection_finish(session):
    """Start the lane with every selected module's BACKGROUND_JOB, in the order their tests will run."""
    import importlib.util

    if session.config.option.collectonly:
        return
    modules = list(dict.fromkeys(m for m in map(_job_module, session.items) if m is not None))
    if not modules or importlib.util.find_spec("vllm") is None:
        return  # each job's fixture require()s vLLM (a skip, or a failure in CI) as before
    import kdtest

    lane = BackgroundLane()
    kdtest._LANE[:] = [lane]
    session.config.stash[LANE_KEY] = lane
    factory = session.config._tmp_path_factory
    for m in modules:
        lane.submit(m.__name__, m.BACKGROUND_JOB, factory.mktemp(m.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(scope="module")
def background_job(request, tmp_path_factory):
    """The result of this module's BACKGROUND_JOB: from the lane, or run here when the session started none."""
    m = request.module
    lane = request.config.stash.get(LANE_KEY, None)
    if lane is None or not lane.has(m.__name__):
        return m.BACKGROUND_JOB(tmp_path_factory.mktemp(m.__name__.rsplit(".", 1)[-1]))
    return lane.result(m.__name__)


def pytest_sessionfinish(session):
    lane = session.config.stash.get(LANE_KEY, None)
    if lane is not None:
        lane.stop()
