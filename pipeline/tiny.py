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


# --------------------------------------------------------------------------- `kdpipe tiny-model`
@dataclasses.dataclass(frozen=True)
class TinyTeacherConfig:
    """A small local model for trying the pipeline on CPU: a tokenizer and a Llama trained briefly on your documents.

    out: the model folder to write (Hugging Face format: vLLM and transformers load it).
    train_on: a JSONL file of documents and their summaries (the same fields phase one and evaluate read).
    """

    out: str  # the model folder to write (must not exist yet)
    train_on: str  # JSONL file: one document and its summary per line (the tokenizer is trained on them too)
    text_field: str = "text"  # field with the document (as phase one's and evaluate's --text-field)
    target_field: str = "summary"  # field with the summary the model learns to write
    layers: int = 2  # decoder layers
    hidden: int = 64  # hidden size, a multiple of 32 (heads of 32 dimensions: vLLM's CPU attention needs >= 32)
    vocab: int = 512  # tokenizer vocabulary (byte-level BPE trained on the file)
    context: int = 512  # context length (max_position_embeddings; phase one and evaluate default to it)
    steps: int = 200  # training steps (summarize prompt -> summary); 0 = an untrained model (e.g. a student's start)
    lr: float = 3e-3  # peak learning rate (linear warmup, linear decay)
    batch_size: int = 16  # examples per step
    seed: int = 0  # initialization and batch order

    def __post_init__(self) -> None:
        from kdpipe.storage.errors import ConfigError

        if not self.out:
            raise ConfigError("out: give the model folder to write (kdpipe tiny-model OUT --train-on FILE)")
        if not self.train_on:
            raise ConfigError("train_on: give the JSONL file of documents and summaries (--train-on FILE)")
        for key in ("layers", "hidden", "vocab", "context", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: {getattr(self, key)} must be >= 1")
        if self.hidden % 32:
            raise ConfigError(f"hidden: {self.hidden} is not a multiple of 32 (heads of 32 dimensions); use e.g. 64 or 128")
        if self.vocab < 300:
            raise ConfigError(f"vocab: {self.vocab} is too small; the byte alphabet and special tokens need >= 300")
        if self.context < 64:
            raise ConfigError(f"context: {self.context} is too small for a prompt and a summary (>= 64)")
        if self.steps < 0:
            raise ConfigError(f"steps: {self.steps} must be >= 0 (0 = untrained)")
        if not self.lr > 0:
            raise ConfigError(f"lr: {self.lr} must be > 0")


def read_pairs(path: str, text_field: str, target_field: str) -> list[dict]:
    """(document, summary) rows of a JSONL file, every line checked; errors name the file and line."""
    import json

    from kdpipe.storage.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found (a JSONL file with one document and its summary per line)")
    rows = []
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no} is not valid JSON ({e}); fix that line") from None
            for field, flag in ((text_field, "--text-field"), (target_field, "--target-field")):
                if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field].strip():
                    have = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{path}: line {line_no} has no text in field '{field}' (fields: {have}); "
                                    f"pass {flag} with the right name")
            rows.append({"document": row[text_field], "summary": row[target_field]})
    if not rows:
        raise DataError(f"{path} is empty (no rows); pass a JSONL file with one document and its summary per line")
    return rows


def train_tiny_model(cfg: TinyTeacherConfig, log=print) -> Path:
    """Build a tokenizer and a Llama of `cfg` and train it on the file's summaries (kdpipe.pipeline.lm_train)."""
    import shutil

    from kdpipe.pipeline.config import write_resolved
    from kdpipe.pipeline.lm_train import train_teacher
    from kdpipe.storage.errors import ConfigError

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars for a 1 MB model: noise between kdpipe's lines
    out = Path(cfg.out)
    if out.exists():
        raise ConfigError(f"out: {out} already exists; choose a new folder (or delete it)")
    rows = read_pairs(cfg.train_on, cfg.text_field, cfg.target_field)
    init = out.with_name(out.name + ".init")  # the untrained model; train_teacher writes OUT whole or not at all
    if init.exists():
        shutil.rmtree(init)
    heads = cfg.hidden // 32
    build_tokenizer(init, [t for r in rows for t in (r["document"], r["summary"])], vocab_size=cfg.vocab)
    build_model(init, init, TinyModelConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=cfg.context, seed=cfg.seed))
    if cfg.steps == 0:
        os.replace(init, out)
    else:
        train_teacher(init, out, rows, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed, log=log,
                      doc_loss_weight=0.1, save_every=0, what="tiny-model")
        shutil.rmtree(init)
    write_resolved(cfg, out / "tiny_model_config.toml")
    return out
