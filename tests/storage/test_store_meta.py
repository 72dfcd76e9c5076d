"""Cache key and tokenizer fingerprint: stable for equal inputs, different when contents would differ."""

from __future__ import annotations

import dataclasses

from kdstore_testutil import make_meta

from kdpipe.storage import CodecConfig, FORMAT_VERSION, cache_key, tokenizer_fingerprint


def test_cache_key_covers_everything_that_determines_contents():
    base = make_meta()
    assert cache_key(base) == cache_key(make_meta())
    variants = [
        dataclasses.replace(base, teacher="other"),
        dataclasses.replace(base, teacher_revision="abc"),
        dataclasses.replace(base, tokenizer_fingerprint="x"),
        dataclasses.replace(base, vocab_size=base.vocab_size + 1),
        dataclasses.replace(base, recipe="other"),
        dataclasses.replace(base, recipe_params={"n": 2}),
        dataclasses.replace(base, codec=CodecConfig(top_k=9)),
        dataclasses.replace(base, codec=CodecConfig(name="sampled", top_k=8)),
        dataclasses.replace(base, dataset_fingerprint="other"),
        dataclasses.replace(base, generation_params={"temperature": 0.5}),
    ]
    keys = {cache_key(v) for v in variants}
    assert len(keys) == len(variants) and cache_key(base) not in keys
    assert FORMAT_VERSION == 1


def test_tokenizer_fingerprint(tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    fp = tokenizer_fingerprint(tok)
    assert fp == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_teacher)) and len(fp) == 64
    tok.chat_template = (tok.chat_template or "") + "{# changed #}"
    assert tokenizer_fingerprint(tok) != fp
    tok2 = AutoTokenizer.from_pretrained(tiny_teacher)
    tok2.add_tokens(["<brand-new-token>"])
    assert tokenizer_fingerprint(tok2) != fp
