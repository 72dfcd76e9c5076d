"""Cross-tokenizer KD, record level: retokenize each record for the student and cut both target
token sequences into aligned groups.

A store written by a teacher with tokenizer A trains a student with tokenizer B. `Aligner` turns
each stored record (teacher tokens) into an `Aligned` one (student tokens + the group of every
target token on both sides), using the byte tables of `xtok/bytes.py`; `xtok/collate.py` pads
aligned records into a batch. Everything is numpy and runs in the collate stage (the data thread).

The exact-bytes rule
--------------------
A row's target bytes are the concatenation of its target tokens' bytes. They must equal the
row's stored text (`Record.text`, UTF-8) exactly, with one allowance: a tokenizer that adds a
prefix space (Metaspace `prepend_scheme`, ByteLevel `add_prefix_space`, a `Strip` decoder) may
have one leading space byte more than the text; that byte is the tokenizer's, not the text's, and
is dropped from the first token (`strip_prefix`). The student's tokens of the text must reproduce
the text by the same rule. Anything else — a normalizer that lowercases or NFKC-folds, a recipe
that stripped the text, an `<unk>`, bytes that are not UTF-8 — is refused with DataError naming
the store and sample: alignment never runs on altered text.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np

from kdpipe.pipeline.train.xtok.bytes import TokenBytes, token_bytes, vocab_map
from kdpipe.storage.errors import DataError
from kdpipe.storage.reader import Record

PROMPT_CACHE_ROWS = 20_000  # student prompts (per teacher prompt) and completions (per text) memoized; cleared when full


# ------------------------------------------------------------------------------- the exact-bytes rule


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
    string: str  # text as str (what the student's encoder reads)


def _rows(a: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """`a` cut into consecutive rows of `counts` entries (views; np.split's per-row overhead is larger)."""
    ends = np.cumsum(counts).tolist()
    return [a[s:e] for s, e in zip([0] + ends[:-1], ends)]


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
    # encode_batch_fast: the same ids without character offsets (which alignment never reads), where available
    encode = getattr(own, "encode_batch_fast", own.encode_batch)
    return lambda texts, add_special_tokens: [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]


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
        self._completion_cache: dict[bytes, tuple[np.ndarray, int]] = {}  # text -> (student ids, dropped bytes)

    def _where(self, rec: Record) -> str:
        return f"{self.store}: sample {rec.sample_id!r}"

    def __call__(self, rec: Record) -> Aligned:
        return self.batch([rec])[0]

    def batch(self, records: Sequence[Record]) -> list[Aligned]:
        if self.identical:
            return [self._identical(r) for r in records]
        sides = self._teacher_sides(records)
        p_ids = self._prompts(records, sides)
        c_arrs, drops = self._completions(sides)
        return self._align_batch(sides, p_ids, c_arrs, drops)

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

    def _completions(self, sides: Sequence["_TeacherSide"]) -> tuple[list[np.ndarray], list[int]]:
        """The student's tokens of each row's text and its dropped prefix bytes (the exact-bytes rule), memoized by
        the text like the prompts: one batched encode and one numpy byte gather for the rows not seen yet."""
        cache = self._completion_cache
        todo = [i for i, s in enumerate(sides) if s.text not in cache]
        if todo:
            enc = self._encode([sides[i].string for i in todo], add_special_tokens=False)
            lens = np.fromiter((len(c) for c in enc), np.int64, len(enc))
            ids = np.fromiter(chain.from_iterable(enc), np.int64, int(lens.sum()))
            got, off = self.tb_s.concat_rows(ids, lens)
            if len(cache) + len(todo) > PROMPT_CACHE_ROWS:
                cache.clear()
            for j, (i, c) in enumerate(zip(todo, _rows(ids, lens))):
                s = sides[i]
                s_got = got[off[j]:off[j + 1]]
                drop = strip_prefix(self.tb_s, s_got, s.text)
                if drop is None:
                    raise DataError(
                        f"{self._where(s.rec)}: the student tokenizer does not reproduce the text byte for byte "
                        f"({_first_diff(s_got, s.text)}); its normalizer alters the text or it lacks byte fallback "
                        "(<unk>), so the two tokenizations cannot be aligned. Use a student tokenizer with byte "
                        "fallback and no normalizer, or drop the sample"
                    )
                cache[s.text] = (c, drop)
        out = [cache[s.text] for s in sides]
        return [c for c, _ in out], [d for _, d in out]

    def _align_batch(self, sides, p_ids, c_lists, drops_s) -> list[Aligned]:
        """`align` for every record at once: the records' bytes laid end to end (row r from base_r), so one
        sorted merge finds every common boundary, and one searchsorted every token's group.

        Ends are doubled; a token with no bytes before it in its row gets 2·base_r + 1 (odd, never a
        boundary), so it joins its row's first group. Final tokens (the teacher's trailing specials,
        the student's EOS) get their row's last group id."""
        R = len(sides)
        eos = self.tb_s.eos_id
        final = np.fromiter((s.final for s in sides), bool, R)
        eos_arr = np.asarray([eos if eos is not None else 0], np.int64)
        pieces = []  # each row's student tokens, then the appended EOS where the teacher's targets end with its EOS
        for s, c in zip(sides, c_lists):
            pieces += (c, eos_arr) if s.final else (c,)
        nt = np.fromiter((len(s.actual) for s in sides), np.int64, R)
        ns = np.fromiter((len(c) for c in c_lists), np.int64, R) + final
        nb = np.fromiter((s.n_body for s in sides), np.int64, R)
        B = np.fromiter((len(s.text) for s in sides), np.int64, R)
        base = np.cumsum(B) - B
        t_ids = np.concatenate([s.actual for s in sides]) if R else np.zeros(0, np.int64)
        s_ids = np.concatenate(pieces) if R else np.zeros(0, np.int64)
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
        tgs, sgs, c_arrs = _rows(tg, nt), _rows(sg, ns), _rows(s_ids, ns)
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

    def _teacher_sides(self, records: Sequence[Record]) -> list[_TeacherSide]:
        """Each record's teacher targets and text (the exact-bytes rule); the target bytes of all records come
        from one numpy gather (`TokenBytes.concat_rows`), not one bytes object per token."""
        heads = []
        for rec in records:
            pos = self._check_positions(rec)
            actual = rec.input_ids[pos].astype(np.int64)  # [P_t]
            n_body = len(actual)
            final = (self.tb_t.eos_id is not None and int(actual[-1]) == self.tb_t.eos_id
                     and self.tb_s.eos_id is not None)
            if final:  # the trailing special tokens (end-of-turn marker, EOS) form the last group
                while n_body and self._t_special[actual[n_body - 1]]:
                    n_body -= 1
            heads.append((rec, pos, actual, n_body, final))
        nb = np.fromiter((h[3] for h in heads), np.int64, len(heads))
        ids = np.concatenate([h[2][:h[3]] for h in heads]) if heads else np.zeros(0, np.int64)
        got, off = self.tb_t.concat_rows(ids, nb)
        return [self._teacher_text(*h, got[off[r]:off[r + 1]]) for r, h in enumerate(heads)]

    def _teacher_text(self, rec: Record, pos, actual, n_body: int, final: bool, got: bytes) -> _TeacherSide:
        if rec.text is not None:
            string, text = rec.text, rec.text.encode("utf-8")
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
                string = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{self._where(rec)}: the teacher's target tokens are not valid UTF-8 ({e.reason} at byte {e.start}), "
                    "so no student can tokenize them exactly; drop the sample or regenerate it with a longer "
                    "max_new_tokens"
                ) from None
        return _TeacherSide(rec, pos, actual, n_body, final, text, drop, string)
