"""The student train-student saves (RUN/final) loads in vLLM and generates what transformers generates."""

from __future__ import annotations

import pytest
import torch

from kdtest import require
from train_stores import topk_store  # noqa: F401 (fixture)


@pytest.mark.vllm
def test_final_student_loads_with_vllm(tiny_teacher, topk_store, tmp_path):
    require("vllm", "the trained student must load in vLLM for evaluation and phase-one reuse")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.pipeline.tiny import TinyModelConfig, build_model
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train

    # A model vocabulary padded beyond the tokenizer's, as in Qwen2.5; head_dim 32 (vLLM's CPU
    # attention has no kernel for the head_dim 16 of the tiny_student fixture).
    student = tmp_path / "student"
    build_model(student, tiny_teacher, TinyModelConfig(model_vocab_size=576, hidden_size=64, intermediate_size=64,
                                                       num_attention_heads=2, num_key_value_heads=1, seed=1))
    r = train(TrainConfig(student=str(student), stores=(str(topk_store),), out=str(tmp_path / "run"), steps=3,
                          tokens_per_batch=160, lr=5e-3, save_every=0, alpha=0.5, temperature=2.0))

    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(r.final)
    prompt = tok("The city council approved", add_special_tokens=True).input_ids
    llm = LLM(model=str(r.final), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    try:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=6, temperature=0.0, detokenize=False))
        got = list(out[0].outputs[0].token_ids)
    finally:
        del llm
    hf = AutoModelForCausalLM.from_pretrained(r.final, dtype=torch.float32)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert len(got) == 6 and all(t < len(tok) for t in got[:1])
    assert got == want
