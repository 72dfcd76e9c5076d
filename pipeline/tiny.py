"""Tiny models and tokenizers built locally from a config: no hub download, ever.

Tests, the demo and the benchmarks need a real teacher and student that vLLM and
transformers both load. They are built here from a `LlamaConfig` with a byte-level BPE
tokenizer trained on a small corpus, and saved in Hugging Face format.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable

# A chat template in the Hugging Face (Jinja) convention, so recipes exercise the
# "apply the teacher's chat template" path exactly as with a real instruct model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<sep>"]

DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Summarize the following text in one sentence. "
    "The city council approved a new budget for parks and schools on Monday. "
    "Researchers in Paris reported that the river reached its highest level in ten years. "
    "Question: who approved the budget? Answer: the city council. "
    "Entities: Paris (LOCATION), Monday (DATE), city council (ORGANIZATION). "
)


@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    vocab_size: int = 512  # tokenizer vocabulary (the model's may be padded beyond it)
    model_vocab_size: int | None = None  # None = same as the tokenizer's
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0


def build_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts` and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else [DEFAULT_CORPUS] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<sep>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, cfg: TinyModelConfig = TinyModelConfig()):
    """A randomly initialised Llama of `cfg` saved (safetensors) with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=cfg.model_vocab_size or len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return model


def build_tiny(out_dir: str | os.PathLike, texts: Iterable[str] | None = None, cfg: TinyModelConfig = TinyModelConfig()) -> Path:
    """Tokenizer + model in one folder; returns the folder (loadable by transformers and vLLM)."""
    out = Path(out_dir)
    build_tokenizer(out, texts, vocab_size=cfg.vocab_size)
    build_model(out, out, cfg)
    return out


def build_unigram_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] | None = None, vocab_size: int = 400):
    """Train a Unigram (SentencePiece-style) tokenizer with byte fallback and save it as a PreTrainedTokenizerFast.

    A different algorithm from `build_tokenizer`'s byte-level BPE, for cross-tokenizer tests: a
    Metaspace pre-tokenizer (`▁` = space, prepended to the first word), the 256 `<0xNN>` byte
    pieces for anything the pieces do not cover, and a Llama-2-style decoder.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else [DEFAULT_CORPUS] * 4
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base = Tokenizer(models.Unigram())
    base.pre_tokenizer = pre
    trainer = trainers.UnigramTrainer(vocab_size=max(vocab_size - 256, 64), special_tokens=SPECIAL_TOKENS,
                                      unk_token="<unk>", show_progress=False)
    base.train_from_iterator(texts, trainer=trainer)
    model = json.loads(base.to_str())["model"]
    low = min(s for _, s in model["vocab"]) - 1.0
    # Special tokens are control tokens (added below), not pieces text can produce; <unk> stays a piece
    # (the model needs one) with a score no text prefers over its bytes.
    vocab = [("<unk>", low - 100.0)] + [tuple(v) for v in model["vocab"] if v[0] not in SPECIAL_TOKENS]
    have = {p for p, _ in vocab}
    vocab += [(f"<0x{b:02X}>", low) for b in range(256) if f"<0x{b:02X}>" not in have]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<sep>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
