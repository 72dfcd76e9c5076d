"""Phase one's on-policy recipe on real vLLM (sampler and teacher engines shared by the module),
then finalize -> inspect --verify -> train-student on the store it wrote.

Tolerance of the stored teacher log-prob at each sampled token: the codec's per-entry bound
(CodecConfig.logprob_error_bound) + 1e-4 (vLLM CPU vs transformers fp32 numerics).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kdtest import require
from onpolicy_helpers import K, MAX_LEN, NEW, completions, onpolicy_cfg, read_records, write_docs

from kdpipe.pipeline.generate.recipes import request_seed
from kdpipe.pipeline.generate.run import generate_logits
from kdpipe.storage import CodecConfig, open_store

pytestmark = pytest.mark.vllm
DOCS = 10
N = 2


@pytest.fixture(scope="module")
def engines(tiny_teacher, tiny_student):
    require("vllm", "the on-policy recipe's sampler and teacher engines")
    from transformers import AutoTokenizer

    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.engines import VllmEngine

    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    tcfg = GenerateConfig(teacher=str(tiny_teacher), data="-", out="-", top_k=K, max_model_len=MAX_LEN, dtype="float32",
                          enforce_eager=True, seed=5)
    scfg = GenerateConfig(teacher=str(tiny_student), data="-", out="-", top_k=1, max_model_len=MAX_LEN, dtype="float32",
                          enforce_eager=True, seed=5, temperature=1.0)
    teacher = VllmEngine.from_config(tcfg, MAX_LEN, vocab)
    sampler = VllmEngine.from_config(scfg, MAX_LEN, vocab)
    yield teacher, sampler
    sampler.close()
    teacher.close()


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp("data") / "docs.jsonl", DOCS, seed=3)


@pytest.fixture(scope="module")
def topk_store(engines, tiny_teacher, tiny_student, docs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("op") / "topk"
    s = generate_logits(onpolicy_cfg(tiny_teacher, tiny_student, docs, out), engine=engines[0], sampler_engine=engines[1])
    assert s.written == DOCS * N and not s.interrupted and s.stats["sampled_completions"] == DOCS * N
    return out


def test_targets_are_the_samplers_seeded_completions(engines, topk_store):
    """Independently of the recipe: vLLM generate with request_seed(seed, id, j) gives the stored targets."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    recs = completions(read_records(topk_store))
    assert len(recs) == DOCS * N
    keys = sorted(recs)
    prompts = [TokensPrompt(prompt_token_ids=recs[k][0]) for k in keys]
    params = []
    for k in keys:
        sid, j = k.rsplit("#", 1)
        params.append(SamplingParams(max_tokens=NEW, temperature=1.0, seed=request_seed(5, sid, int(j)), detokenize=False))
    outs = engines[1].llm.generate(prompts, params, use_tqdm=False)
    for k, o in zip(keys, outs):
        assert list(o.outputs[0].token_ids) == recs[k][1], k
    # two completions of one prompt are different draws (distinct seeds), the prompt is shared
    assert recs["d0#0"][0] == recs["d0#1"][0]
    assert sum(recs[f"d{i}#0"][1] != recs[f"d{i}#1"][1] for i in range(DOCS)) >= DOCS // 2
    # the samples file is what the rows hold
    drawn = json.loads((topk_store / "samples" / "task-00000.json").read_text())["samples"]
    assert {f"{sid}#{j}": tuple(map(tuple, pc)) for sid, v in drawn.items() for j, pc in enumerate(v)} == \
        {k: (tuple(p), tuple(c)) for k, (p, c) in recs.items()}


def test_stored_teacher_logprobs_at_the_sampled_tokens_match_transformers(topk_store, tiny_teacher):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    m = open_store(topk_store)
    codec = m.meta.codec
    assert codec.top_k == K + 1 and m.meta.recipe == "on-policy"
    outside = 0
    for rec in read_records(topk_store).values():
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([rec.input_ids.tolist()])).logits[0]
        ref = torch.log_softmax(logits[torch.as_tensor(rec.target_positions.astype(np.int64)) - 1].double(), -1).numpy()
        tgt = rec.input_ids[rec.target_positions]
        for p, x in enumerate(tgt):
            hit = rec.ids[p] == x
            assert hit.sum() == 1, f"{rec.sample_id} position {p}: the sampled token {x} is not an entry"
            stored = float(rec.logprobs[p][hit][0])
            bound = float(codec.logprob_error_bound(np.array([ref[p, x]]))[0]) + 1e-4
            assert abs(stored - ref[p, x]) <= bound, (rec.sample_id, p, stored, ref[p, x])
            valid = rec.ids[p] >= 0
            assert valid.sum() in (K, K + 1)
            outside += int(valid.sum() == K + 1)
            top = np.sort(ref[p])[::-1][:K]
            kept_top = np.sort(ref[p, rec.ids[p][valid]])[::-1][:K]
            assert np.abs(kept_top - top).max() < 1e-3  # the first K entries are the teacher's top-K
            assert abs(float(rec.tail[p]) - (1 - np.exp(ref[p, rec.ids[p][valid]]).sum())) <= 1e-4
    assert outside > 0, "no sampled token fell outside the top-K: the extra entry went untested"


def test_sampled_codec_store_draws_the_same_completions(engines, topk_store, tiny_teacher, tiny_student, docs, tmp_path):
    out = tmp_path / "sampled"
    s = generate_logits(onpolicy_cfg(tiny_teacher, tiny_student, docs, out, codec="sampled", draws=20),
                        engine=engines[0], sampler_engine=engines[1])
    assert s.written == DOCS * N
    a, b = completions(read_records(topk_store)), completions(read_records(out))
    assert a == b  # re-drawn in a new store from the same seeds: the same completions
    m = open_store(out)
    assert m.meta.codec.name == "sampled" and m.meta.codec.top_k == K + 1
    for rec in read_records(out).values():
        assert (np.exp(rec.logprobs).sum(1) + rec.tail == pytest.approx(1.0, abs=1e-5))


def test_meta_records_the_sampler_and_sampling(topk_store, tiny_student):
    meta = open_store(topk_store).meta
    rp = meta.recipe_params
    assert rp["sampler"] == str(Path(tiny_student).resolve()) and rp["sampler_revision"].startswith("local:")
    assert rp["samples_per_prompt"] == N and rp["sampling_temperature"] == 1.0 and rp["target_entry"] is True


def test_finalize_inspect_verify_and_train_with_reverse_kl_default(topk_store, tiny_student, tmp_path):
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train

    r = subprocess.run([sys.executable, "-m", "kdpipe.pipeline.cli", "inspect", str(topk_store), "--verify"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    common = dict(student=str(tiny_student), stores=(str(topk_store),), steps=2, tokens_per_batch=256, lr=1e-3,
                  save_every=0, alpha=0.0, seed=1)
    res = train(TrainConfig(out=str(tmp_path / "rkl"), **common))
    head = (tmp_path / "rkl" / "train_config.toml").read_text()
    assert 'resolved to "reverse_kl"' in head and "fresh AdamW state" in head
    assert res.final is not None and np.isfinite(res.last["loss_kd"]) and res.last["loss_kd"] >= 0
    res = train(TrainConfig(out=str(tmp_path / "tok"), divergence="reverse_kl_sampled_token", **common))
    assert res.final is not None and np.isfinite(res.last["loss_kd"])


def test_many_long_seeded_prompts_on_the_cpu_sampler(engines):
    """More seeded prompt tokens than one step's budget (4096 on CPU): without whole-prompt prefills
    vLLM's CPU backend dies rewinding a seeded generator ("CPU Generator does not use offset")."""
    from kdpipe.pipeline.generate.engines import Request

    sampler = engines[1]
    sampler.top_k, sampler.temperature = 1, 1.0
    rng = np.random.default_rng(0)
    reqs = [Request("generate", rng.integers(10, 400, size=150).tolist(), max_new_tokens=3, seed=i) for i in range(48)]
    outs = sampler._run_all(reqs)
    assert len(outs) == 48 and all(len(o.token_ids) >= 1 for o in outs)
