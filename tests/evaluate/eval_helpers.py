"""Helpers shared by the evaluation tests."""

from __future__ import annotations


def build_nli(path, id2label):
    """A tiny BERT sequence classifier with a locally built tokenizer and the given label names."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from kdpipe.pipeline.tiny import DEFAULT_CORPUS, build_tokenizer

    tok = build_tokenizer(path, [DEFAULT_CORPUS] * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, num_labels=len(id2label), id2label=id2label,
        label2id={v: k for k, v in id2label.items()}, pad_token_id=tok.pad_token_id,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path
