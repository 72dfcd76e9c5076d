"""Cross-tokenizer alignment on real tokenizers (issue 20 §5): Llama-3, Qwen2.5 and DeepSeek-V4, loaded offline
through transformers from the small packages of the `realtok` extra (benchmarks/realtok.py), on messy text.

Each record's target groups must cover every byte of its text exactly once, with the same bytes on the teacher's
and the student's side, and together reconstruct the text; the batched aligner must agree with the per-row
definition (`align`) and give the same result from its memo on a second pass."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import realtok  # noqa: E402

from kdpipe.pipeline.train.xtok.align import Aligner, align, byte_ends, text_encoder  # noqa: E402
from kdpipe.pipeline.train.xtok.collate import XCollate  # noqa: E402
from kdpipe.storage.reader import Record  # noqa: E402

MESSY = [
    "日本語のテキストと中文混合，标点符号！한국어 문장도 있습니다。",
    "Emoji: 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇩🇪 keycap 1️⃣ and text after.",
    "def f(x):\n    return {'a': [x**2, x // 3]}  # comment\n\tif x != 0: print(f\"{x=}\")\r\n",
    "Long numbers: 3.14159265358979323846264338327950288, 1,234,567,890 and 0xDEADBEEF; IBAN DE89370400440532013000.",
    "Combining marks: e\u0301te\u0301 (decomposed), ñ vs n\u0303, Zalgo z\u0335\u0321a\u0336l\u0337g\u0338o, "
    "हिन्दी, العربية مع تشكيل: مُحَمَّد.",
    "Whitespace runs:   three spaces,\t\ttabs,\n\n\nnewlines,\u00a0nbsp,\u3000ideographic space, trailing   ",
    "A literal special token in the text: <|end_of_text|> <|endoftext|> <｜end▁of▁sentence｜> stays text.",
    " leading space, then ​zero-width and soft­hyphen; end.",
]
PAIRS = [("llama3", "deepseek-v4"), ("deepseek-v4", "qwen2.5"), ("qwen2.5", "llama3")]


@pytest.fixture(scope="module")
def toks():
    return {n: realtok.load(n) for n in ("llama3", "qwen2.5", "deepseek-v4")}


def records(tok, texts: list[str]) -> list[Record]:
    """Teacher records in `tok`: a prompt, the text's tokens as targets (literal special strings as text), EOS."""
    enc = text_encoder(tok)
    prompts = enc([f"Write item {i}:" for i in range(len(texts))], False)
    targets = enc(texts, False)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    out = []
    for i, (p, t, text) in enumerate(zip(prompts, targets, texts)):
        seq = np.asarray(bos + p + t + [tok.eos_token_id], np.int32)
        P = len(t) + 1
        pos = np.arange(len(seq) - P, len(seq), dtype=np.int32)
        K = 3
        ids = np.stack([seq[pos], (seq[pos] + 1) % len(tok), (seq[pos] + 7) % len(tok)], 1).astype(np.int32)
        lp = np.log(np.full((P, K), [0.6, 0.2, 0.1], np.float32))
        out.append(Record(f"messy-{i}", seq, pos, ids, lp, np.full(P, 0.1, np.float32), text=text))
    return out


@pytest.mark.parametrize("name", ["llama3", "qwen2.5"])
def test_converted_tokenizer_matches_tiktoken_on_its_own_table(toks, name):
    ref = realtok.reference_encoder(name)
    for text in MESSY[:-2]:  # (the last two carry special-token strings that tiktoken's ordinary encoder splits alike)
        assert toks[name].encode(text, add_special_tokens=False) == ref(text), text
    assert toks[name].decode(ref(MESSY[4])) == MESSY[4]


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_real_pair_groups_cover_every_byte_once_and_rebuild_the_text(toks, teacher, student):
    tok_t, tok_s = toks[teacher], toks[student]
    aligner = Aligner(tok_s, tok_t, identical=False, store="messy")
    tb_t, tb_s = aligner.tb_t, aligner.tb_s
    assert (tb_t.scheme, tb_s.scheme) == ("byte_level", "byte_level")
    recs = records(tok_t, MESSY)
    first = aligner.batch(recs)
    again = aligner.batch(recs)  # the memoized pass (prompts and completions from the memo)
    one_to_one = groups = 0
    for rec, a, b in zip(recs, first, again):
        text = rec.text.encode("utf-8")
        s_ids = a.input_ids[a.target_positions]  # [P_s] the student's target tokens (+ its EOS last)
        assert s_ids[-1] == tok_s.eos_token_id and a.teacher_actual[-1] == tok_t.eos_token_id
        # the student's tokens are its own tokenization of the text
        assert tb_s.concat(s_ids[:-1].tolist()) == text
        t_end = byte_ends(tb_t, a.teacher_actual[:-1])  # [P_t - 1] (the final EOS has no bytes)
        s_end = byte_ends(tb_s, s_ids[:-1])
        # the batched groups are the per-row definition, plus the final EOS group
        tg, sg, G = align(t_end, s_end)
        assert a.num_groups == G + 1
        np.testing.assert_array_equal(a.teacher_group[:-1], tg)
        np.testing.assert_array_equal(a.student_group[:-1], sg)
        assert a.teacher_group[-1] == a.student_group[-1] == G
        # every byte in exactly one group, the same bytes on both sides, and the groups rebuild the text
        t_start = np.concatenate(([0], t_end[:-1]))
        s_start = np.concatenate(([0], s_end[:-1]))
        pieces, cursor = [], 0
        for g in range(G):
            ts, ss = np.flatnonzero(tg == g), np.flatnonzero(sg == g)
            assert len(ts) and len(ss), (rec.sample_id, g)
            lo, hi = int(t_start[ts[0]]), int(t_end[ts[-1]])
            assert (lo, hi) == (int(s_start[ss[0]]), int(s_end[ss[-1]])) and lo == cursor < hi
            t_bytes = tb_t.concat(a.teacher_actual[ts].tolist())
            assert t_bytes == tb_s.concat(s_ids[ss].tolist()) == text[lo:hi]
            pieces.append(t_bytes)
            cursor = hi
            one_to_one += len(ts) == len(ss) == 1
        assert cursor == len(text)
        assert b"".join(pieces).decode("utf-8") == rec.text
        groups += G
        for f in ("input_ids", "target_positions", "teacher_group", "student_group", "teacher_ids"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert 0 < one_to_one < groups  # real pairs disagree somewhere on this text, and agree mostly
    # the collate stage runs on the same records (the path train-student takes)
    xb = XCollate(aligner, "hybrid", 1.0, 0.9, 0)(recs)
    assert xb.stats["groups"] == groups + len(recs)


def test_concat_rows_is_concat_per_row(toks):
    """The batch byte gather (the aligner's fast path) equals the per-token join, empty rows and specials included."""
    from kdpipe.pipeline.train.xtok.bytes import token_bytes

    tb = token_bytes(toks["llama3"])
    rng = np.random.default_rng(0)
    counts = np.array([0, 5, 300, 0, 1, 194])
    ids = rng.integers(0, len(tb.table), int(counts.sum()))
    ids[:3] = [toks["llama3"].eos_token_id, 0, toks["llama3"].bos_token_id]  # special tokens carry no bytes
    data, off = tb.concat_rows(ids, counts)
    starts = np.concatenate(([0], np.cumsum(counts)))
    assert len(off) == len(counts) + 1 and off[-1] == len(data)
    for r in range(len(counts)):
        assert data[off[r]:off[r + 1]] == tb.concat(ids[starts[r]:starts[r + 1]].tolist())
    empty, off0 = tb.concat_rows(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert empty == b"" and off0.tolist() == [0]
