"""Small stores for the train tests, written with ShardWriter from a transformers forward of the tiny
teacher (no vLLM). Test modules import the fixtures from here (not a conftest.py, so that
`from conftest import require` keeps meaning tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def build_store(teacher_dir, out, codec_name="topk", top_k=8, n_seqs=24, min_len=12, max_len=40, seed=0,
                prompt_len=4, num_tasks=1, finalize=True, text=True):
    """A store of `n_seqs` sequences of corpus tokens; targets = every position after a short prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.pipeline.tiny import DEFAULT_CORPUS
    from kdpipe.storage import CodecConfig, ShardWriter, StoreMeta, finalize_store, tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    corpus = tok(DEFAULT_CORPUS * 3, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    codec = CodecConfig(name=codec_name, top_k=top_k)
    meta = StoreMeta(
        teacher=str(teacher_dir), teacher_revision=None, tokenizer_fingerprint=tokenizer_fingerprint(tok),
        vocab_size=len(tok), recipe="test", recipe_params={}, codec=codec, dataset_fingerprint=f"test-{seed}-{n_seqs}",
        generation_params={},
    )
    per_task = [list(range(n_seqs))[t::num_tasks] for t in range(num_tasks)]
    for t, rows in enumerate(per_task):
        with ShardWriter(out, meta, task_index=t, num_tasks=num_tasks, shard_bytes=4096) as w:
            for i in rows:
                L = int(rng.integers(min_len, max_len + 1))
                start = int(rng.integers(0, len(corpus) - L))
                ids = [tok.bos_token_id] + corpus[start:start + L - 1]
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [L, V]
                pos = np.arange(prompt_len, L)
                vals, top = lp[pos - 1].topk(top_k, -1)
                w.add(f"s{i:04d}", ids, pos, top.numpy(), vals.numpy(),
                      text=tok.decode(ids[prompt_len:]) if text else None)
    if finalize:
        finalize_store(out)
    return Path(out)


@pytest.fixture(scope="session")
def topk_store(tmp_path_factory, tiny_teacher) -> Path:
    return build_store(tiny_teacher, tmp_path_factory.mktemp("store") / "topk", top_k=8)


@pytest.fixture(scope="session")
def sampled_store(tmp_path_factory, tiny_teacher) -> Path:
    return build_store(tiny_teacher, tmp_path_factory.mktemp("store") / "sampled", codec_name="sampled", top_k=8, n_seqs=8)
