"""pipeline/lm_train.py: the one loop that pretrains bases and trains teachers (length-grouped batches,
packing, resume after a kill with the same loss curve and weights, atomic output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.pipeline.lm_train import length_batches, packed_examples, perplexity, pretrain_base, train_teacher


def test_batches_cover_each_example_once_per_epoch_grouped_by_length():
    examples = [([1] * (3 + i % 17) + [2] * (1 + i % 5), 3 + i % 17) for i in range(1000)]
    batches = length_batches(examples, 8, steps=250, seed=0)
    assert len(batches) == 250 and all(len(b) == 8 for b in batches)
    first_epoch = [id(p) for b in batches[:125] for p in b]  # 1000 examples / 8 = 125 batches per epoch
    assert len(set(first_epoch)) == 1000  # every example once, none repeated
    # Grouped by length: a batch's lengths spread far less than random batches' would (17 x 5 lengths).
    spread = [max(len(p[0]) for p in b) - min(len(p[0]) for p in b) for b in batches]
    assert sum(spread) / len(spread) < 3
    assert length_batches(examples, 8, 250, seed=0) == batches and length_batches(examples, 8, 250, seed=1) != batches
    assert len(length_batches(examples[:3], 8, steps=4, seed=0)) == 4  # fewer examples than a batch: one batch of all


def test_packing_keeps_every_token_in_order_with_eos_between_texts(tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    texts = ["the city council approved a budget", "officials expect work to begin", "a similar plan for buses"]
    ex = packed_examples(tok, texts, 8)
    stream = [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in list(ids) + [tok.eos_token_id]]
    assert all(len(s) == 8 and n == 0 for s, n in ex)
    assert [t for s, _ in ex for t in s] == stream[: 8 * (len(stream) // 8)]
    with pytest.raises(ValueError, match="seq_len"):
        packed_examples(tok, texts, 1)


def _curve(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


def test_a_killed_pretraining_resumes_with_the_same_weights_and_loss_curve(tmp_path, tiny_teacher, tiny_corpus):
    import torch
    from safetensors.torch import load_file

    texts = [line for doc in tiny_corpus for line in doc.split(". ")] * 3
    args = dict(steps=12, lr=3e-3, batch_size=2, seed=0, seq_len=16, save_every=5, log=lambda s: None)
    whole = pretrain_base(tiny_teacher, tmp_path / "whole", texts, key="k", **args)

    class Killed(Exception):
        pass

    def kill_at_8(step: int, loss: float) -> None:
        if step == 8:
            raise Killed

    out = tmp_path / "base"
    with pytest.raises(Killed):
        pretrain_base(tiny_teacher, out, texts, key="k", progress=kill_at_8, **args)
    assert not out.exists()  # no half-written model where a finished one is expected
    assert json.loads((tmp_path / "base.partial" / "ckpt" / "state.json").read_text())["step"] == 5
    said: list[str] = []
    pretrain_base(tiny_teacher, out, texts, key="k", **{**args, "log": said.append})
    assert any("resuming at step 5/12" in s for s in said)
    assert not (tmp_path / "base.partial").exists()
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curve(out) == _curve(whole) and [s for s, *_ in _curve(out)] == [10, 12]

    # A checkpoint of other settings (another key) is not resumed: the run starts over.
    with pytest.raises(Killed):
        pretrain_base(tiny_teacher, out, texts, key="k", progress=kill_at_8, **args)
    said.clear()
    pretrain_base(tiny_teacher, out, texts, key="other", **{**args, "log": said.append})
    assert not any("resuming" in s for s in said)


def test_teacher_loop_trains_the_answer_and_lowers_perplexity(tmp_path, tiny_teacher, tiny_corpus):
    rows = [{"document": d, "summary": d.split(".")[0]} for d in (tiny_corpus[0].split(". ") * 2)]
    texts = [r["document"] for r in rows]
    before = perplexity(tiny_teacher, texts, seq_len=16)
    losses: list[float] = []
    out = train_teacher(tiny_teacher, tmp_path / "t", rows, steps=20, lr=3e-3, batch_size=4, seed=0, log=lambda s: None,
                        progress=lambda step, loss: losses.append(loss), doc_loss_weight=1.0)
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert perplexity(out, texts, seq_len=16) < before
    assert (out / "tokenizer.json").is_file() and (out / "train_log.jsonl").is_file()
