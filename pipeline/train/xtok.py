"""Cross-tokenizer alignment in the data path: byte offsets, aligned groups, the vocabulary map.

A store written by a teacher with tokenizer A trains a student with tokenizer B. Each record is
retokenized for the student and both target token sequences are cut into **aligned groups**;
`xtok_losses.py` compares teacher and student on those groups. Everything here is numpy, runs
in the collate stage (the data thread), and never touches the training loop.

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

The exact-bytes rule
--------------------
A row's target bytes are the concatenation of its target tokens' bytes. They must equal the
row's stored text (`Record.text`, UTF-8) exactly, with one allowance: a tokenizer that adds a
prefix space (Metaspace `prepend_scheme`, ByteLevel `add_prefix_space`, a `Strip` decoder) may
have one leading space byte more than the text; that byte is the tokenizer's, not the text's, and
is dropped from the first token. The student's tokens of the text must reproduce the text by
the same rule. Anything else — a normalizer that lowercases or NFKC-folds, a recipe that
stripped the text, an `<unk>`, bytes that are not UTF-8 — is refused with DataError naming the
store and sample: alignment never runs on altered text.

Aligned groups
--------------
Let e_t and e_s be the cumulative byte ends of the teacher's and the student's target tokens (the
same byte string, so both end at B). The common boundaries are C = {e_t} ∩ {e_s} minus 0. A
token with end e belongs to group g = the index of the first c ∈ C with c ≥ e; so a group is the
shortest run of teacher tokens and the shortest run of student tokens ending at the same byte
offset (1:1, n:1, 1:m or n:m), and groups cover every target byte exactly once. A token with no
bytes (a special token inside the targets) joins the group of the token before it (the first
group when it comes first). The one exception is the end: when the teacher's last target is its
EOS and the student has an EOS, the teacher's trailing special tokens (end-of-turn marker, EOS)
form a last group with the student's EOS (1:1, mapped EOS -> EOS, when EOS trails alone). The
literal string of a special token inside the text is text (read as characters by the student's
encoder). Only target positions take part; the prompt is retokenized like the sequence-level path
does (decoded without special tokens, encoded with the student's) and carries no group.

With the same tokenizer on both sides (equal fingerprints) the student's sequence *is* the
teacher's: no retokenization, group i = token i, the map is the identity.

Vocabulary map
--------------
Teacher id → the student id with the same byte string (−1 where no single student token has
those bytes, and for special tokens except EOS → EOS). It is injective: where several teacher ids
share a byte string (a SentencePiece piece and its byte-fallback twin), only the first maps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch

from kdpipe.storage.batch import Batch
from kdpipe.storage.errors import ConfigError, DataError
from kdpipe.storage.reader import Record

CROSS_TOKENIZER_OPTIONS: tuple[str, ...] = ("span", "uld", "hybrid")
PROMPT_CACHE_ROWS = 20_000  # student prompts memoized per teacher prompt (cleared when full)


# ------------------------------------------------------------------------------- bytes of tokens


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


def strip_prefix(tb: TokenBytes, got: bytes, text: bytes) -> int | None:
    """0 if `got` is `text`, 1 if it is the tokenizer's prefix space + `text`, None otherwise."""
    if got == text:
        return 0
    if tb.prefix_space and got[:1] == b" " and got[1:] == text:
        return 1
    return None


def _first_diff(a: bytes, b: bytes) -> str:
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    return f"first difference at byte {i}: {a[max(0, i - 12):i + 12]!r} vs {b[max(0, i - 12):i + 12]!r}"


# ------------------------------------------------------------------------------- alignment


def byte_ends(tb: TokenBytes, ids: np.ndarray, drop_prefix: int = 0) -> np.ndarray:
    """[P] int64 cumulative byte end of each token; `drop_prefix` leading bytes belong to no token."""
    ends = np.cumsum(tb.lengths[ids]) if len(ids) else np.zeros(0, np.int64)
    return np.maximum(ends - drop_prefix, 0) if drop_prefix else ends


def align(teacher_ends: np.ndarray, student_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Aligned groups of two tokenizations of one byte string (module doc).

    teacher_ends [P_t], student_ends [P_s]: nondecreasing cumulative byte ends.
    -> (teacher group [P_t] int64, student group [P_s] int64, number of groups G).
    """
    if len(teacher_ends) and len(student_ends) and teacher_ends[-1] != student_ends[-1]:
        raise ValueError(f"the two tokenizations cover {teacher_ends[-1]} and {student_ends[-1]} bytes")
    # Common boundaries by a sorted merge (both are sorted): the teacher ends found among the student's.
    idx = np.searchsorted(student_ends, teacher_ends)
    hit = idx < len(student_ends)
    hit[hit] = student_ends[idx[hit]] == teacher_ends[hit]
    common = teacher_ends[hit & (teacher_ends > 0)]
    if len(common) > 1:
        common = common[np.concatenate(([True], common[1:] != common[:-1]))]  # zero-byte tokens repeat an end
    if len(common) == 0:  # no bytes at all: everything is one group (if anything)
        g = 1 if (len(teacher_ends) or len(student_ends)) else 0
        return np.zeros(len(teacher_ends), np.int64), np.zeros(len(student_ends), np.int64), g
    return (np.searchsorted(common, teacher_ends, "left").astype(np.int64),
            np.searchsorted(common, student_ends, "left").astype(np.int64), len(common))


@dataclass
class Aligned:
    """One record, retokenized for the student and aligned (numpy, target positions only)."""

    sample_id: str
    input_ids: np.ndarray  # [L_s] int64 the student's sequence
    target_positions: np.ndarray  # [P_s] int64
    teacher_ids: np.ndarray  # [P_t, K] int64 the stored kept ids (-1 padding)
    teacher_logprobs: np.ndarray  # [P_t, K] float32 (-inf padding)
    teacher_tail: np.ndarray  # [P_t] float32
    teacher_actual: np.ndarray  # [P_t] int64 the teacher's target tokens
    teacher_group: np.ndarray  # [P_t] int64
    student_group: np.ndarray  # [P_s] int64
    num_groups: int


@dataclass
class _TeacherSide:
    rec: Record
    pos: np.ndarray
    actual: np.ndarray
    n_body: int  # teacher targets before the final special run
    final: bool  # the targets end with the teacher's EOS: the trailing specials form the last group
    text: bytes
    drop: int


def _fast(tok):
    """The tokenizers.Tokenizer behind a HF fast tokenizer, when calling it directly is equivalent."""
    return getattr(tok, "backend_tokenizer", None)


def text_encoder(tok):
    """texts, add_special_tokens -> token id lists, reading special-token strings in the text as text.

    A document or summary may contain the literal string of a special token ("<|assistant|>"); as
    text it has bytes, so it must not become the zero-byte special token. A private copy of the
    Rust tokenizer gets `encode_special_tokens` (the caller's tokenizer is left as it is).
    """
    fast = _fast(tok)
    if fast is None:
        return lambda texts, add_special_tokens: tok(texts, add_special_tokens=add_special_tokens,
                                                     split_special_tokens=True)["input_ids"]
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(fast.to_str())
    own.encode_special_tokens = True
    return lambda texts, add_special_tokens: [e.ids for e in own.encode_batch(texts, add_special_tokens=add_special_tokens)]


class Aligner:
    """Records (teacher tokens) -> Aligned (student tokens + groups); see the module doc.

    `batch` tokenizes all records' prompts and completions in one call each (the Rust tokenizer's
    batch encode); everything per record after that is a few numpy calls.
    """

    def __init__(self, student_tok, teacher_tok, identical: bool, store: str = "store") -> None:
        self.student_tok, self.teacher_tok, self.identical, self.store = student_tok, teacher_tok, identical, store
        self.tb_t = token_bytes(teacher_tok, "teacher tokenizer")
        self.tb_s = self.tb_t if identical else token_bytes(student_tok, "student tokenizer")
        self.map = np.arange(len(self.tb_t.table), dtype=np.int64) if identical else vocab_map(self.tb_t, self.tb_s)
        self._t_special = np.zeros(len(self.tb_t.table), bool)
        self._t_special[[i for i in self.tb_t.special_ids if 0 <= i < len(self.tb_t.table)]] = True
        start = next((x for x in (student_tok.bos_token_id, student_tok.eos_token_id, student_tok.pad_token_id)
                      if x is not None), None)
        self._start = start
        self._encoder = None if identical else text_encoder(student_tok)
        self._prompt_cache: dict[bytes, np.ndarray] = {}

    def _where(self, rec: Record) -> str:
        return f"{self.store}: sample {rec.sample_id!r}"

    def __call__(self, rec: Record) -> Aligned:
        return self.batch([rec])[0]

    def batch(self, records: Sequence[Record]) -> list[Aligned]:
        if self.identical:
            return [self._identical(r) for r in records]
        sides = [self._teacher_side(r) for r in records]
        p_ids = self._prompts(records, sides)
        c_lists = self._encode([s.text.decode("utf-8") for s in sides], add_special_tokens=False)
        drops = [self._student_drop(s, c) for s, c in zip(sides, c_lists)]
        return self._align_batch(sides, p_ids, c_lists, drops)

    def _prompts(self, records: Sequence[Record], sides: Sequence["_TeacherSide"]) -> list[list[int]]:
        """The student's prompts (the sequence-level rule: decoded without special tokens, re-encoded),
        memoized by the teacher's prompt ids: later epochs re-read the same rows."""
        keys = [r.input_ids[: int(s.pos[0])].tobytes() for r, s in zip(records, sides)]
        todo = [i for i, k in enumerate(keys) if k not in self._prompt_cache]
        if todo:
            texts = self._decode([records[i].input_ids[: int(sides[i].pos[0])].tolist() for i in todo])
            if len(self._prompt_cache) + len(todo) > PROMPT_CACHE_ROWS:
                self._prompt_cache.clear()
            for i, p in zip(todo, self._encode(texts, add_special_tokens=True)):
                if not p:
                    if self._start is None:
                        raise DataError(f"{self._where(records[i])}: the prompt is empty and the student tokenizer has "
                                        "no BOS/EOS/PAD token to start the sequence with")
                    p = [self._start]
                self._prompt_cache[keys[i]] = np.asarray(p, np.int64)
        return [self._prompt_cache[k] for k in keys]

    def _student_drop(self, s: "_TeacherSide", c: list[int]) -> int:
        s_got = self.tb_s.concat(c)
        drop = strip_prefix(self.tb_s, s_got, s.text)
        if drop is None:
            raise DataError(
                f"{self._where(s.rec)}: the student tokenizer does not reproduce the text byte for byte "
                f"({_first_diff(s_got, s.text)}); its normalizer alters the text or it lacks byte fallback (<unk>), "
                "so the two tokenizations cannot be aligned. Use a student tokenizer with byte fallback and no "
                "normalizer, or drop the sample"
            )
        return drop

    def _align_batch(self, sides, p_ids, c_lists, drops_s) -> list[Aligned]:
        """`align` for every record at once: the records' bytes laid end to end (row r from base_r), so one
        sorted merge finds every common boundary, and one searchsorted every token's group.

        Ends are doubled; a token with no bytes before it in its row gets 2·base_r + 1 (odd, never a
        boundary), so it joins its row's first group. Final tokens (the teacher's trailing specials,
        the student's EOS) get their row's last group id."""
        R = len(sides)
        eos = self.tb_s.eos_id
        final = np.fromiter((s.final for s in sides), bool, R)
        c_arrs = [np.asarray(c + [eos] if s.final else c, np.int64) for s, c in zip(sides, c_lists)]
        nt = np.fromiter((len(s.actual) for s in sides), np.int64, R)
        ns = np.fromiter((len(c) for c in c_arrs), np.int64, R)
        nb = np.fromiter((s.n_body for s in sides), np.int64, R)
        B = np.fromiter((len(s.text) for s in sides), np.int64, R)
        base = np.cumsum(B) - B
        t_ids = np.concatenate([s.actual for s in sides]) if R else np.zeros(0, np.int64)
        s_ids = np.concatenate(c_arrs) if R else np.zeros(0, np.int64)
        t_row, s_row = np.repeat(np.arange(R), nt), np.repeat(np.arange(R), ns)
        t_start, s_start = np.cumsum(nt) - nt, np.cumsum(ns) - ns
        t_idx, s_idx = np.arange(len(t_ids)) - t_start[t_row], np.arange(len(s_ids)) - s_start[s_row]  # index in row
        t_len = np.where(t_idx < nb[t_row], self.tb_t.lengths[t_ids], 0)  # final specials: no bytes
        s_len = self.tb_s.lengths[s_ids].copy()
        if R and final.any():
            s_len[(s_start + ns - 1)[final]] = 0  # the appended EOS
        for lens, start, n, drop in ((t_len, t_start, nt, [s.drop for s in sides]), (s_len, s_start, ns, drops_s)):
            drop = np.asarray(drop, np.int64)
            rows = np.flatnonzero(drop > 0)
            if len(rows):  # the prefix space: off the first token that has bytes (it starts with it)
                nz = np.flatnonzero(lens > 0)
                first = nz[np.searchsorted(nz, start[rows])]
                lens[first] -= drop[rows]

        def doubled(lens, row):
            e = np.cumsum(lens)  # [P] global byte ends
            local0 = e == base[row]  # no bytes yet in this row
            return np.where(local0, 2 * base[row] + 1, 2 * e), local0

        e_t, z_t = doubled(t_len, t_row)
        e_s, z_s = doubled(s_len, s_row)
        idx = np.searchsorted(e_s, e_t)
        hit = idx < len(e_s)
        hit[hit] = e_s[idx[hit]] == e_t[hit]
        common = e_t[hit & (e_t % 2 == 0)]
        if len(common) > 1:
            common = common[np.concatenate(([True], common[1:] != common[:-1]))]
        lo = np.searchsorted(common, 2 * base, "right")
        n_text = np.searchsorted(common, 2 * (base + B), "right") - lo  # [R] text groups per row
        G = n_text + final
        tg = np.searchsorted(common, e_t, "left") - lo[t_row]
        sg = np.searchsorted(common, e_s, "left") - lo[s_row]
        # rows without bytes: their zero-byte tokens belong to the final group (or to none)
        tg = np.where(z_t & (B[t_row] == 0), 0, tg)
        sg = np.where(z_s & (B[s_row] == 0), 0, sg)
        tg = np.where(t_idx >= nb[t_row], n_text[t_row], tg)  # the final group
        if R and final.any():
            sg[(s_start + ns - 1)[final]] = n_text[final]
        out = []
        tgs, sgs = np.split(tg, t_start[1:]), np.split(sg, s_start[1:])
        for r, s in enumerate(sides):
            rec, p, c = s.rec, p_ids[r], c_arrs[r]
            t_grp, t_sel = tgs[r], None
            if G[r] == 0 and len(t_grp):  # no bytes and no final group: nothing to align these teacher tokens to
                t_sel = np.zeros(len(t_grp), bool)
            ids, lp, tail, act = rec.ids.astype(np.int64), rec.logprobs, rec.tail, s.actual
            if t_sel is not None:
                ids, lp, tail, act, t_grp = ids[t_sel], lp[t_sel], tail[t_sel], act[t_sel], t_grp[t_sel]
            s_full = np.concatenate([p, c])
            out.append(Aligned(rec.sample_id, s_full, np.arange(len(p), len(s_full), dtype=np.int64), ids, lp, tail,
                               act, t_grp, sgs[r], int(G[r])))
        return out

    # ---- tokenizer calls, batched
    def _decode(self, seqs: list[list[int]]) -> list[str]:
        fast = _fast(self.teacher_tok)
        if fast is not None and not getattr(self.teacher_tok, "clean_up_tokenization_spaces", False):
            return fast.decode_batch(seqs, skip_special_tokens=True)
        return self.teacher_tok.batch_decode(seqs, skip_special_tokens=True)

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return self._encoder(texts, add_special_tokens)

    # ---- per record
    def _check_positions(self, rec: Record) -> np.ndarray:
        pos = rec.target_positions.astype(np.int64)
        P = len(pos)
        if P == 0:
            raise DataError(f"{self._where(rec)} has no target positions; cross-tokenizer distillation needs targets")
        t0 = int(pos[0])
        if t0 < 1 or int(pos[-1]) - t0 + 1 != P:
            raise DataError(
                f"{self._where(rec)}: its target positions are not one contiguous run after a prompt (first {t0}, "
                f"{P} targets up to {int(pos[-1])}); cross-tokenizer alignment needs a contiguous completion"
            )
        return pos

    def _identical(self, rec: Record) -> Aligned:
        pos = self._check_positions(rec)
        ids = rec.input_ids.astype(np.int64)
        P = len(pos)
        ar = np.arange(P, dtype=np.int64)
        return Aligned(rec.sample_id, ids[: int(pos[-1]) + 1], pos, rec.ids.astype(np.int64), rec.logprobs, rec.tail,
                       ids[pos], ar, ar, P)

    def _teacher_side(self, rec: Record) -> _TeacherSide:
        pos = self._check_positions(rec)
        actual = rec.input_ids[pos].astype(np.int64)  # [P_t]
        n_body = len(actual)
        final = (self.tb_t.eos_id is not None and int(actual[-1]) == self.tb_t.eos_id and self.tb_s.eos_id is not None)
        if final:  # the trailing special tokens (end-of-turn marker, EOS) form the last group
            while n_body and self._t_special[actual[n_body - 1]]:
                n_body -= 1
        got = self.tb_t.concat(actual[:n_body].tolist())
        if rec.text is not None:
            text = rec.text.encode("utf-8")
            drop = strip_prefix(self.tb_t, got, text)
            if drop is None:
                raise DataError(
                    f"{self._where(rec)}: the teacher's target tokens do not reproduce the stored text byte for byte "
                    f"({_first_diff(got, text)}); the teacher tokenizer's normalizer or the recipe altered the text, so "
                    "the student cannot be aligned to it. Regenerate the store without the alteration, or drop the sample"
                )
        else:
            drop = 1 if (self.tb_t.prefix_space and got[:1] == b" ") else 0
            text = got[drop:]
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self._where(rec)}: the teacher's target tokens are not valid UTF-8 ({e.reason} at byte {e.start}), "
                "so no student can tokenize them exactly; drop the sample or regenerate it with a longer max_new_tokens"
            ) from None
        return _TeacherSide(rec, pos, actual, n_body, final, text, drop)


# ------------------------------------------------------------------------------- collate


@dataclass
class XBatch(Batch):
    """A student Batch (target_ids etc. over the student's N target tokens) + the cross-tokenizer tensors.

    `xtok` holds (N = student target tokens, G = groups, M = 1:1 mapped groups, U = unmapped groups):
      s_group [N] long              group of each student target token
      kd_row [N] bool               the token is the whole student side of a mapped 1:1 group
      kd_ids [N, K] long            student ids of the teacher's kept ids (0 where unmapped / not a kd row)
      kd_logprobs [N, K] float32    the teacher's kept log-probs of that group (-inf padding)
      kd_mapped [N, K] bool         the kept id maps onto a student id
      kd_tail [N] float32           the teacher's stored tail
      g_other [G] bool              the group is scored by span / uld (not mapped; tokens on both sides)
      g_teacher_logp [G] float32    log P_T(group's bytes) by the teacher's chain rule at temperature T
      u_srow [U] long               first student target token of each unmapped group
      u_logprobs [U, K] float32     the teacher's kept log-probs at the group's first teacher token
      u_tail [U] float32
    `stats` (plain floats): groups, one_to_one, mapped_groups, teacher_rows, mapped_mass, unknown_actual.
    """

    xtok: dict = None  # type: ignore[assignment]
    stats: dict = None  # type: ignore[assignment]

    def to(self, device, non_blocking: bool = False) -> "XBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif f.name == "xtok":
                v = {k: t.to(device, non_blocking=non_blocking) for k, t in v.items()}
            out[f.name] = v
        return XBatch(**out)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


class XCollate:
    """Records -> XBatch: align each record (`Aligner`), pad the student side, build the group tensors.

    option: 'span' | 'uld' | 'hybrid'; a 1:1 group is scored by the vocabulary-mapped KL when every
    kept teacher id maps (span, uld) or when the mapped ids hold >= min_mapped_mass of the kept mass
    (hybrid). temperature: for the teacher's chain-rule log-probabilities.
    """

    def __init__(self, aligner: Aligner, option: str, temperature: float, min_mapped_mass: float, pad_id: int,
                 max_len: int | None = None, truncate: bool = False) -> None:
        if option not in CROSS_TOKENIZER_OPTIONS:
            raise ConfigError(f"cross_tokenizer: {option!r} is not one of {', '.join(CROSS_TOKENIZER_OPTIONS)}")
        self.aligner, self.option, self.T = aligner, option, float(temperature)
        self.min_mass = 1.0 if option != "hybrid" else float(min_mapped_mass)
        self.pad_id, self.max_len, self.truncate = pad_id, max_len, truncate
        self.truncated = 0

    def __call__(self, records: Sequence[Record]) -> XBatch:
        al = [self._fit(a) for a in self.aligner.batch(records)]
        return self.collate(al)

    def _fit(self, a: Aligned) -> Aligned:
        """Refuse or cut a student sequence longer than max_len (whole groups only)."""
        if self.max_len is None or len(a.input_ids) <= self.max_len:
            return a
        if not self.truncate:
            raise DataError(
                f"{self.aligner.store}: sample {a.sample_id!r} has {len(a.input_ids)} student tokens, more than the "
                f"student's context of {self.max_len}; pass --truncate to cut such sequences, or a longer context"
            )
        self.truncated += 1
        keep_s = a.target_positions < self.max_len
        last = int(a.student_group[keep_s].max()) if keep_s.any() else -1
        # keep only groups whose student tokens all fit
        if keep_s.any() and not keep_s[a.student_group == last].all():
            last -= 1
        ks = a.student_group <= last
        kt = a.teacher_group <= last
        L = int(a.target_positions[ks][-1]) + 1 if ks.any() else int(a.target_positions[0])
        return Aligned(a.sample_id, a.input_ids[:L], a.target_positions[ks], a.teacher_ids[kt], a.teacher_logprobs[kt],
                       a.teacher_tail[kt], a.teacher_actual[kt], a.teacher_group[kt], a.student_group[ks], last + 1)

    def collate(self, al: Sequence[Aligned]) -> XBatch:
        B = len(al)
        T = max(len(a.input_ids) for a in al) if al else 0
        K = max((a.teacher_ids.shape[1] for a in al), default=0)
        lens = np.fromiter((len(a.input_ids) for a in al), np.int64, B)
        N = sum(len(a.target_positions) for a in al)
        Nt = sum(len(a.teacher_actual) for a in al)
        input_ids = np.full((B, T), self.pad_id, np.int64)
        mask = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)  # [B, T]
        # One preallocated array per field, filled record by record (no per-record temporaries).
        pred_index, sg = np.empty(N, np.int64), np.empty(N, np.int64)
        ids, lp = np.full((Nt, K), -1, np.int64), np.full((Nt, K), -np.inf, np.float32)
        tail, act, tg = np.empty(Nt, np.float32), np.empty(Nt, np.int64), np.empty(Nt, np.int64)
        s0 = n0 = goff = 0
        for b, a in enumerate(al):
            input_ids[b, : lens[b]] = a.input_ids
            s1, n1 = s0 + len(a.target_positions), n0 + len(a.teacher_actual)
            pred_index[s0:s1] = a.target_positions
            pred_index[s0:s1] += b * T - 1
            sg[s0:s1] = a.student_group
            sg[s0:s1] += goff
            tg[n0:n1] = a.teacher_group
            tg[n0:n1] += goff
            k = a.teacher_ids.shape[1]
            ids[n0:n1, :k] = a.teacher_ids
            lp[n0:n1, :k] = a.teacher_logprobs
            tail[n0:n1] = a.teacher_tail
            act[n0:n1] = a.teacher_actual
            goff += a.num_groups
            s0, n0 = s1, n1
        G = goff
        target_ids = input_ids.reshape(-1)[pred_index + 1] if N else np.zeros(0, np.int64)

        # ---- group shapes: sizes, and the single row of each side of a 1:1 group
        n_t = np.bincount(tg, minlength=G)
        n_s = np.bincount(sg, minlength=G)
        first_t = np.full(G, -1, np.int64)
        first_s = np.full(G, -1, np.int64)
        first_t[tg[::-1]] = np.arange(Nt - 1, -1, -1)  # the smallest row index wins
        first_s[sg[::-1]] = np.arange(N - 1, -1, -1)
        one = (n_t == 1) & (n_s == 1)

        # ---- vocabulary map on 1:1 groups
        valid = lp > -np.inf  # [Nt, K]
        m_ids = np.where(ids >= 0, self.aligner.map[np.maximum(ids, 0)], -1)  # [Nt, K] student ids
        mapped = valid & (m_ids >= 0)
        p = np.where(valid, np.exp(lp.astype(np.float64)), 0.0)  # [Nt, K]
        kept = p.sum(1)
        share = np.where(kept > 0, (p * mapped).sum(1) / np.where(kept > 0, kept, 1.0), 0.0)  # [Nt]
        full = (mapped == valid).all(1)
        ok_row = full if self.min_mass >= 1.0 else share >= self.min_mass  # [Nt]
        g_mapped = one.copy()
        g_mapped[one] = ok_row[first_t[one]]
        m_groups = np.flatnonzero(g_mapped)
        tr, sr = first_t[m_groups], first_s[m_groups]
        kd_row = np.zeros(N, bool)
        kd_row[sr] = True
        kd_ids = np.zeros((N, K), np.int64)
        kd_lp = np.full((N, K), -np.inf, np.float32)
        kd_mapped = np.zeros((N, K), bool)
        kd_tail = np.zeros(N, np.float32)
        kd_ids[sr] = np.where(mapped[tr], m_ids[tr], 0)
        kd_lp[sr] = lp[tr]
        kd_mapped[sr] = mapped[tr]
        kd_tail[sr] = tail[tr]

        # ---- the teacher's chain rule: log p_T(actual) per teacher row, summed per group
        eq = ids == act[:, None]
        found = eq.any(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            la = np.where(eq, lp, -np.inf).max(1).astype(np.float64) if K else np.full(Nt, -np.inf)
            p_min = np.where(valid, lp, np.inf).min(1) if K else np.full(Nt, np.inf)
            log_tail = np.log(np.maximum(tail.astype(np.float64), 0.0))
            # an actual token outside the kept ids: at most min(tail, smallest kept p) — its upper bound
            la = np.where(found, la, np.minimum(log_tail, p_min))
            lpT = np.concatenate([np.where(valid, lp / self.T, -np.inf), (log_tail / self.T)[:, None]], 1)
            logZ = _logsumexp(lpT, 1)
            laT = la / self.T - logZ
        g_logp = np.bincount(tg, weights=laT, minlength=G) if G else np.zeros(0)

        # ---- unmapped groups: ULD at the groups' first tokens
        g_other = ~g_mapped & (n_t > 0) & (n_s > 0)  # (a group without tokens on one side has nothing to score)
        u = np.flatnonzero(g_other)
        x = {
            "s_group": torch.from_numpy(sg), "kd_row": torch.from_numpy(kd_row), "kd_ids": torch.from_numpy(kd_ids),
            "kd_logprobs": torch.from_numpy(kd_lp), "kd_mapped": torch.from_numpy(kd_mapped),
            "kd_tail": torch.from_numpy(kd_tail), "g_other": torch.from_numpy(g_other),
            "g_teacher_logp": torch.from_numpy(g_logp.astype(np.float32)),
            "u_srow": torch.from_numpy(first_s[u]), "u_logprobs": torch.from_numpy(lp[first_t[u]]),
            "u_tail": torch.from_numpy(tail[first_t[u]]),
        }
        r1 = first_t[one]  # the teacher rows of 1:1 groups: the share of the teacher's mass the map covers there
        mass_mapped = float((p[r1] * mapped[r1]).sum())
        stats = {"groups": float(G), "one_to_one": float(one.sum()), "mapped_groups": float(len(m_groups)),
                 "teacher_rows": float(Nt), "teacher_mass": float(kept.sum() + tail.astype(np.float64).sum()),
                 "mapped_mass": mass_mapped, "unknown_actual": float((~found).sum())}
        input_t = torch.from_numpy(input_ids)
        return XBatch(
            input_ids=input_t, attention_mask=torch.from_numpy(mask), pred_index=torch.from_numpy(pred_index),
            target_ids=torch.from_numpy(np.asarray(target_ids, np.int64)),
            teacher_ids=torch.zeros((N, 0), dtype=torch.long), teacher_logprobs=torch.zeros((N, 0)),
            teacher_tail=torch.zeros(N), num_targets=N, sample_ids=[a.sample_id for a in al], xtok=x, stats=stats,
        )


def alignment_summary(batches_stats: Sequence[dict]) -> dict[str, float]:
    """Shares over collated batches: 1:1 groups of all groups, mapped groups, mapped teacher mass."""
    tot = {k: sum(s[k] for s in batches_stats) for k in (batches_stats[0] if batches_stats else {})}
    g = max(tot.get("groups", 0.0), 1.0)
    return {
        "groups": int(tot.get("groups", 0)), "teacher_rows": int(tot.get("teacher_rows", 0)),
        "one_to_one_share": tot.get("one_to_one", 0.0) / g, "mapped_group_share": tot.get("mapped_groups", 0.0) / g,
        "mapped_mass": tot.get("mapped_mass", 0.0) / max(tot.get("teacher_mass", 0.0), 1e-12),
        "unknown_actual": int(tot.get("unknown_actual", 0)),
    }


def check_min_mapped_mass(v: float) -> None:
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise ConfigError(f"xtok_min_mapped_mass: {v} must be in (0, 1]")


# ------------------------------------------------------------------------------- train-student hooks


def load_teacher_tokenizer(cfg, manifest):
    """The teacher's tokenizer: --teacher-tokenizer, else STORE/teacher_tokenizer; checked against the fingerprint."""
    from transformers import AutoTokenizer

    from kdpipe.storage.errors import StoreError
    from kdpipe.storage.manifest import tokenizer_fingerprint
    from kdpipe.storage.tokenizer_files import TEACHER_TOKENIZER_DIR, check_tokenizer_folder, teacher_tokenizer_dir

    path = cfg.teacher_tokenizer or teacher_tokenizer_dir(manifest.store_dir)
    if path is None:
        raise ConfigError(
            f"{manifest.store_dir}: the store carries no {TEACHER_TOKENIZER_DIR}/ (written by a kdpipe before phase one "
            "saved the teacher's tokenizer) and no --teacher-tokenizer was given; pass --teacher-tokenizer PATH, the "
            f"folder of the tokenizer of {manifest.meta.teacher!r}"
        )
    path = check_tokenizer_folder(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher_tokenizer: cannot load a tokenizer from {str(path)!r} ({e})") from None
    fp = tokenizer_fingerprint(tok)
    if fp != manifest.meta.tokenizer_fingerprint:
        raise StoreError(
            f"{path}: this tokenizer is not the one that wrote {manifest.store_dir} (fingerprint {fp[:12]}… vs the "
            f"store's {manifest.meta.tokenizer_fingerprint[:12]}…); pass --teacher-tokenizer with the tokenizer of "
            f"{manifest.meta.teacher!r}"
        )
    return tok


def check_cross_tokenizer(cfg, manifests, student_tok) -> None:
    """Every refusal specific to cross-tokenizer KD, before training (train-student's check_inputs)."""
    codecs = {m.meta.codec.name for m in manifests}
    if codecs != {"topk"}:
        raise ConfigError(
            f"cross_tokenizer: {cfg.cross_tokenizer!r} needs 'topk' stores (the teacher's log-probs of its kept ids); "
            f"{', '.join(str(m.store_dir) for m in manifests)} use {', '.join(sorted(codecs))}"
        )
    teacher = load_teacher_tokenizer(cfg, manifests[0])
    token_bytes(teacher, f"teacher tokenizer of {manifests[0].store_dir}")
    token_bytes(student_tok, f"student tokenizer of {cfg.student!r}")


def cross_tokenizer_collate(cfg, plan, student_tok) -> XCollate:
    """The collate stage of train-student for a student with another tokenizer (DataSpec.collate)."""
    from kdpipe.storage.manifest import open_store

    m = open_store(cfg.stores[0])
    aligner = Aligner(student_tok, load_teacher_tokenizer(cfg, m), identical=False, store=", ".join(cfg.stores))
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else 0
    return XCollate(aligner, plan.cross_tokenizer, cfg.temperature, cfg.xtok_min_mapped_mass, pad,
                    max_len=plan.max_len, truncate=cfg.truncate)


LOSS_LINES = {
    "span": "vocabulary-mapped KL on fully mapped 1:1 groups, span (chain-rule string probabilities, Bernoulli D) elsewhere",
    "uld": "vocabulary-mapped KL on fully mapped 1:1 groups, ULD (W1 of sorted probabilities) elsewhere",
    "hybrid": "vocabulary-mapped KL on 1:1 groups whose mapped ids hold >= {m:g} of the kept mass, span elsewhere",
}


def cross_tokenizer_plan(cfg, sample_rows: int = 64) -> list[str]:
    """`kdpipe check`: the cross-tokenizer plan of one run config, measured on a sample of its store.

    A run without cross_tokenizer gets one warning line when its student's tokenizer differs from the
    (finalized) store's and alpha < 1: train-student would refuse it."""
    from transformers import AutoTokenizer

    if getattr(cfg, "cross_tokenizer", "none") == "none":
        if cfg.alpha >= 1.0:
            return []
        from kdpipe.storage.errors import KdpipeError
        from kdpipe.storage.manifest import open_store, tokenizer_fingerprint

        try:
            m = open_store(cfg.stores[0])
            student = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
        except (KdpipeError, OSError, ValueError):
            return []
        if tokenizer_fingerprint(student) == m.meta.tokenizer_fingerprint:
            return []
        return ["    WARNING: the student's tokenizer differs from the teacher's: train-student refuses logit KD; set "
                "cross_tokenizer = \"span\" | \"uld\" | \"hybrid\" (docs/cross-tokenizer.md), or alpha = 1.0 (sequence-level)"]

    from kdpipe.storage import StoreReader
    from kdpipe.storage.errors import KdpipeError
    from kdpipe.storage.manifest import open_store, tokenizer_fingerprint

    lines = [f"    cross-tokenizer {cfg.cross_tokenizer}: "
             + LOSS_LINES[cfg.cross_tokenizer].format(m=cfg.xtok_min_mapped_mass)]
    try:
        student = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        return lines + [f"      student tokenizer {cfg.student!r} not loadable here ({str(e)[:120]}); checked when training starts"]
    try:
        m = open_store(cfg.stores[0])
    except KdpipeError:
        return lines + ["      alignment: measured here once the store is finalized (train-student checks it again)"]
    if tokenizer_fingerprint(student) == m.meta.tokenizer_fingerprint:
        return lines + ["      the student shares the teacher's tokenizer: same-tokenizer KD (cross_tokenizer has no effect)"]
    try:
        teacher = load_teacher_tokenizer(cfg, m)
        aligner = Aligner(student, teacher, identical=False, store=str(m.store_dir))
        xc = XCollate(aligner, cfg.cross_tokenizer, cfg.temperature, cfg.xtok_min_mapped_mass, 0)
        recs = []
        for rec in StoreReader(str(m.store_dir), shuffle=False):
            recs.append(rec)
            if len(recs) >= sample_rows:
                break
        stats = [xc(recs[i:i + 16]).stats for i in range(0, len(recs), 16)]
    except KdpipeError as e:
        return lines + [f"      REFUSED: {e}"]
    s = alignment_summary(stats)
    return lines + [
        f"      alignment: byte offsets (teacher {aligner.tb_t.scheme}, student {aligner.tb_s.scheme}); groups = the "
        "shortest token runs of both ending at the same byte offset (docs/cross-tokenizer.md)",
        f"      measured on {len(recs)} sequences: {s['groups']} groups, {s['one_to_one_share']:.1%} 1:1, "
        f"{s['mapped_group_share']:.1%} scored by the mapped KL, {s['mapped_mass']:.1%} of the teacher's mass mapped",
    ]
