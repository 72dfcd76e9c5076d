"""Cross-tokenizer KD, tokenizer level: the bytes of every token id, and the vocabulary map.

Alignment (`xtok/align.py`) compares two tokenizations of one text by byte offsets, so each
tokenizer must say which bytes each of its ids stands for. This module reads that from the
tokenizer alone (no records); everything is numpy and is built once per run.

Bytes of a token
----------------
Every token id maps to a fixed byte string (`TokenBytes`), read from the tokenizer's decoder:
* byte-level BPE (decoder `ByteLevel`: GPT-2, Llama-3, Qwen): the token's characters map back to
  bytes through the GPT-2 byte alphabet;
* SentencePiece-style (decoder `Metaspace`, or `Replace("▁", " ")` with optional `ByteFallback`,
  `Fuse`, `Strip`: Llama-2, Mistral, Gemma, Unigram with byte fallback): `▁` is a space, a piece
  `<0xNN>` is the byte NN.
Special tokens (BOS, EOS, chat-template markers, padding) carry **no bytes**. A non-special
added token carries its content's UTF-8 bytes. Any other decoder (WordPiece's `##`, BPE with an
end-of-word suffix, CTC) or a slow tokenizer cannot give byte offsets: refused with ConfigError.
`TokenBytes.prefix_space` records whether the tokenizer may add one leading space that is not in
the text (the allowance of the exact-bytes rule, `align.strip_prefix`).

Vocabulary map
--------------
Teacher id → the student id with the same byte string (−1 where no single student token has
those bytes, and for special tokens except EOS → EOS). It is injective: where several teacher ids
share a byte string (a SentencePiece piece and its byte-fallback twin), only the first maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from kdpipe.storage.errors import ConfigError


def _gpt2_byte_decoder() -> dict[str, int]:
    """The GPT-2 byte alphabet inverted: printable character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _flatten(node: Any) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        out = []
        for key in ("decoders", "pretokenizers", "normalizers"):
            for sub in node.get(key, []) or []:
                out += _flatten(sub)
        return out
    return [node]


@dataclass(frozen=True)
class TokenBytes:
    """The byte string of every token id of one tokenizer, and how it treats a prefix space."""

    table: tuple[bytes, ...]  # id -> bytes (b"" for special tokens)
    lengths: np.ndarray  # [V] int64 byte length per id
    prefix_space: bool  # the tokenizer may add one leading space that is not in the text
    scheme: str  # 'byte_level' | 'metaspace'
    special_ids: frozenset[int]
    eos_id: int | None

    def concat(self, ids: Sequence[int]) -> bytes:
        t = self.table
        return b"".join([t[i] for i in ids])

    @cached_property
    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """Every id's bytes end to end ([sum of lengths] uint8) and each id's start in them ([V] int64), built
        once: `concat_rows` gathers a whole batch from them with numpy instead of one bytes object per token."""
        return np.frombuffer(b"".join(self.table), np.uint8), np.cumsum(self.lengths) - self.lengths

    def concat_rows(self, ids: np.ndarray, row_tokens: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The bytes of many rows at once: ids [N] (the rows' tokens end to end), row_tokens [R] tokens per row
        -> (their bytes end to end, [R+1] int64 offset of each row's bytes in them); row r is
        `concat(its ids)` = data[off[r]:off[r+1]]."""
        buf, start = self.flat
        ids = np.asarray(ids, np.int64)
        lens = self.lengths[ids]  # [N]
        ends = np.cumsum(lens)
        idx = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(start[ids] - (ends - lens), lens)
        tok_end = np.concatenate(([0], ends))
        return buf[idx].tobytes(), tok_end[np.concatenate(([0], np.cumsum(row_tokens)))]


def token_bytes(tokenizer, name: str = "tokenizer") -> TokenBytes:
    """The byte table of a Hugging Face fast tokenizer (see the module doc), or ConfigError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{name}: {type(tokenizer).__name__} is a slow (Python) tokenizer, which cannot give byte offsets for "
            "cross-tokenizer alignment; use its fast version (a tokenizer.json, `use_fast=True`)"
        )
    spec = json.loads(backend.to_str())
    dec = _flatten(spec.get("decoder"))
    types = [d.get("type") for d in dec]
    pre = _flatten(spec.get("pre_tokenizer"))
    norm = _flatten(spec.get("normalizer"))
    if "ByteLevel" in types:
        scheme = "byte_level"
        prefix = any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in pre)
    elif "Metaspace" in types or any(d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "▁" for d in dec):
        scheme = "metaspace"
        prefix = (
            any(d.get("type") == "Strip" and int(d.get("start", 0)) > 0 for d in dec)
            or any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in pre + dec)
            or any(n.get("type") == "Prepend" for n in norm)
        )
    else:
        raise ConfigError(
            f"{name}: its decoder ({', '.join(str(t) for t in types) or 'none'}) gives no byte string per token, so "
            "cross-tokenizer alignment cannot compute byte offsets; supported are byte-level BPE (ByteLevel decoder) "
            "and SentencePiece-style tokenizers (Metaspace / Replace('▁') + ByteFallback decoders)"
        )
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    byte_dec = _gpt2_byte_decoder() if scheme == "byte_level" else None
    fallback = "ByteFallback" in types
    table: list[bytes] = []
    for i, p in enumerate(pieces):
        if i in special or p is None:
            table.append(b"")
        elif i in added:
            table.append(str(getattr(added[i], "content", p)).encode("utf-8"))
        elif byte_dec is not None:
            try:
                table.append(bytes(byte_dec[c] for c in p))
            except KeyError:
                table.append(p.encode("utf-8"))  # not byte-level encoded (rare added pieces)
        elif fallback and len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            table.append(bytes([int(p[3:5], 16)]))
        else:
            table.append(p.replace("▁", " ").encode("utf-8"))
    return TokenBytes(
        table=tuple(table), lengths=np.fromiter((len(b) for b in table), np.int64, n), prefix_space=bool(prefix),
        scheme=scheme, special_ids=frozenset(special), eos_id=getattr(tokenizer, "eos_token_id", None),
    )


def vocab_map(teacher: TokenBytes, student: TokenBytes) -> np.ndarray:
    """[V_teacher] int64: the student id with the same byte string, −1 where none (module doc)."""
    by_bytes: dict[bytes, int] = {}
    for j, b in enumerate(student.table):
        if b and j not in student.special_ids and b not in by_bytes:
            by_bytes[b] = j
    out = np.full(len(teacher.table), -1, np.int64)
    taken: set[int] = set()
    for i, b in enumerate(teacher.table):
        j = by_bytes.get(b) if b and i not in teacher.special_ids else None
        if j is not None and j not in taken:
            out[i] = j
            taken.add(j)
    if teacher.eos_id is not None and student.eos_id is not None:
        out[teacher.eos_id] = student.eos_id
    return out
