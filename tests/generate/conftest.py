"""Fixtures shared by the phase-one test modules (one vLLM engine start costs ~20-40 s on 2 cores)."""

from __future__ import annotations

import pytest
from kdtest import require

# The shared scoring engine: K log-probs, 512-token context, 32-token KV blocks and a 48-block KV
# cache (1,536 tokens), small enough that prefilled prefixes can be evicted (test_score_prefix_cache).
SHARED_K = 8
SHARED_MAX_LEN = 512
SHARED_BLOCK = 32
SHARED_BLOCKS = 48


@pytest.fixture(scope="session")
def shared_vllm_engine(tiny_teacher):
    """One in-process VllmEngine for test_matrix_e2e and test_score_prefix_cache (prefix caching on)."""
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
