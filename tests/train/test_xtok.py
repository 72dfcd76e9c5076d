"""Cross-tokenizer KD (issue 13): alignment properties, the chain rule against dense forwards, identity
with today's same-tokenizer KD, and every bad input refused before or at the first step.

Two real tokenizers built here: A = byte-level BPE (the tiny teacher's), B = Unigram with byte
fallback and a Metaspace prefix space (`kdpipe.pipeline.tiny.build_unigram_tokenizer`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdpipe.pipeline.train.chunked import LossSpec, chunked_loss_parts
from kdpipe.pipeline.train.xtok.align import Aligner, align, byte_ends, strip_prefix, text_encoder
from kdpipe.pipeline.train.xtok.bytes import token_bytes, vocab_map
from kdpipe.pipeline.train.xtok.collate import XCollate
from kdpipe.pipeline.train.xtok.losses import span_divergence, uld_distance, xtok_chunked_loss_parts, xtok_dense_loss_parts
from kdpipe.storage import Record, collate
from kdpipe.storage.errors import ConfigError, DataError, StoreError

from train_stores import build_store, topk_store  # noqa: F401 (fixtures)

OTHER_TEXTS = ["Le conseil municipal a voté un budget pour les écoles. Les chercheurs à Paris ont mesuré la rivière.",
               "データ 変換 😀 👍🏽 naïve café — résumé, 1234 + 5678 = 6912."] * 3


@pytest.fixture(scope="module")
def tok_a(tiny_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def tok_b(tmp_path_factory):
    from kdpipe.pipeline.tiny import build_unigram_tokenizer

    # a different algorithm and size, trained on other text
    return build_unigram_tokenizer(tmp_path_factory.mktemp("tok_b"), OTHER_TEXTS, vocab_size=360)


@pytest.fixture(scope="module")
def student_b(tmp_path_factory, tok_b):
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model

    out = tmp_path_factory.mktemp("student_b")
    tok_b.save_pretrained(out)
    build_model(out, out, TinyModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, seed=1))
    return out


# ---------------------------------------------------------------- alignment properties

TEXT = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="▁"),  # ▁ is SentencePiece's space
        st.sampled_from(list(" \n\t  \n\n") + ["😀", "👍", "\U0001F3FD", "日", "本", "語", "é", "\u0301", "\u0308", "ß", "ﬁ"]),
    ),
    min_size=1, max_size=60,
).filter(lambda t: "<unk>" not in t)  # B reads a literal "<unk>" as its unk token: a refused sample, not text


def ends_of(tok, tb, text):
    ids = np.asarray(text_encoder(tok)([text], False)[0], np.int64)  # special-token strings in text are text
    drop = strip_prefix(tb, tb.concat(ids.tolist()), text.encode("utf-8"))
    assert drop is not None, "the tokenizer must reproduce the text byte for byte"
    return byte_ends(tb, ids, drop)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_groups_cover_every_byte_once_at_common_boundaries(tok_a, tok_b, text):
    ta, tb = token_bytes(tok_a), token_bytes(tok_b)
    te, se = ends_of(tok_a, ta, text), ends_of(tok_b, tb, text)
    B = len(text.encode("utf-8"))
    assert te[-1] == se[-1] == B
    tg, sg, G = align(te, se)
    assert np.all(np.diff(tg) >= 0) and np.all(np.diff(sg) >= 0)  # groups are contiguous runs
    assert set(tg.tolist()) == set(sg.tolist()) == set(range(G))  # every group has tokens on both sides
    # a group's end is the end of its last token on either side: a common boundary of both tokenizations
    t_end = np.array([te[tg == g].max() for g in range(G)])
    s_end = np.array([se[sg == g].max() for g in range(G)])
    assert np.array_equal(t_end, s_end)
    assert set(t_end.tolist()) <= set(te.tolist()) & set(se.tolist())
    # groups partition [0, B): consecutive, ending at B — each byte in exactly one group
    starts = np.concatenate([[0], t_end[:-1]])
    assert np.all(t_end > starts) and t_end[-1] == B
    # the shortest runs: every common boundary is a group end (no common boundary inside a group)
    common = sorted((set(te.tolist()) & set(se.tolist())) - {0})
    assert t_end.tolist() == common


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_equal_tokenizers_give_only_one_to_one_groups(tok_a, tok_b, text):
    for tok in (tok_a, tok_b):
        tb = token_bytes(tok)
        e = ends_of(tok, tb, text)
        tg, sg, G = align(e, e)
        # tokens with bytes are 1:1; (tokens without bytes would join their predecessor)
        assert np.array_equal(tg, sg)
        assert G == len(np.unique(e[e > 0]))


def test_vocab_map_is_injective_and_by_bytes(tok_a, tok_b):
    ta, tb = token_bytes(tok_a), token_bytes(tok_b)
    m = vocab_map(ta, tb)
    hit = m[m >= 0]
    assert len(hit) == len(set(hit.tolist()))
    for i in np.flatnonzero(m >= 0)[:200]:
        if i != ta.eos_id:
            assert ta.table[i] == tb.table[m[i]]
    assert m[ta.eos_id] == tb.eos_id
    assert (m >= 0).sum() > 50  # single bytes and common words map


# ---------------------------------------------------------------- the losses against dense forwards


def dense_record(teacher_dir, tok_a, prompt: str, text: str, sample_id="d0", eos=False):
    """A record as phase one writes it, from a dense teacher forward, keeping every id (K = V: tail 0)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    p = [tok_a.bos_token_id] + tok_a(prompt, add_special_tokens=False)["input_ids"]
    c = tok_a(text, add_special_tokens=False)["input_ids"] + ([tok_a.eos_token_id] if eos else [])
    ids = p + c
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # [L, V]
    pos = np.arange(len(p), len(ids))
    vals, top = lp[pos - 1].sort(-1, descending=True)
    rec = Record(sample_id=sample_id, input_ids=np.asarray(ids, np.int32), target_positions=pos.astype(np.int32),
                 ids=top.numpy().astype(np.int32), logprobs=vals.numpy().astype(np.float32),
                 tail=np.zeros(len(pos), np.float32), text=text)
    return rec, lp[pos - 1], np.asarray(c)


def test_span_follows_the_chain_rule_of_dense_teacher_and_student(tiny_teacher, tok_a, tok_b, student_b):
    from transformers import AutoModelForCausalLM

    rec, t_lp, t_actual = dense_record(tiny_teacher, tok_a, "Summarize:", " The city council approved 😀 a budget.")
    xc = XCollate(Aligner(tok_b, tok_a, identical=False), "span", temperature=1.0, min_mapped_mass=0.9, pad_id=0)
    xb = xc([rec])
    x = xb.xtok
    student = AutoModelForCausalLM.from_pretrained(student_b, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = student(xb.input_ids).logits.reshape(-1, student.config.vocab_size)[xb.pred_index]  # [N, V_s]
    s_lq = torch.log_softmax(logits, -1).gather(-1, xb.target_ids[:, None])[:, 0]  # [N]
    t_la = t_lp.gather(-1, torch.as_tensor(t_actual)[:, None])[:, 0]  # [P_t] teacher log p(actual), dense
    al = xc.aligner(rec)
    G = al.num_groups
    log_P = torch.zeros(G, dtype=torch.float64).index_add(0, torch.as_tensor(al.teacher_group), t_la)
    log_Q = torch.zeros(G, dtype=torch.float64).index_add(0, x["s_group"], s_lq)
    # the collate's teacher chain rule is the dense one
    torch.testing.assert_close(x["g_teacher_logp"].double(), log_P, rtol=1e-5, atol=1e-5)
    # span: KL(Bernoulli(P) || Bernoulli(Q)) on every group the map does not cover exactly
    other = x["g_other"]
    assert other.any()
    P, Q = log_P.exp(), log_Q.exp()
    bern = P * (log_P - log_Q) + (1 - P) * (torch.log1p(-P) - torch.log1p(-Q))
    parts = xtok_dense_loss_parts(logits, xb.target_ids, x, LossSpec(alpha=0.0), "span")
    # mapped 1:1 groups add the mapped KL; check the span share alone
    want_span = bern[other].sum()
    got_span = span_divergence(x["g_teacher_logp"][other].double(), log_Q[other]).sum()
    torch.testing.assert_close(got_span, want_span, rtol=1e-4, atol=1e-6)
    assert parts["kd"] >= got_span.float() - 1e-5 and torch.isfinite(parts["kd"])
    # CE is the student's own CE over its target tokens
    torch.testing.assert_close(parts["ce"].double(), -s_lq.sum(), rtol=1e-6, atol=1e-6)


def test_uld_is_w1_between_sorted_probabilities():
    torch.manual_seed(0)
    t_lp = torch.log_softmax(torch.randn(5, 6), -1).sort(-1, descending=True).values  # [U, K]
    t_lp[:, 4:] = -math.inf  # K = 4 kept, the rest is the tail
    tail = 1 - t_lp.exp().sum(-1)
    s_top = torch.log_softmax(torch.randn(5, 9), -1).sort(-1, descending=True).values[:, :4]
    got = uld_distance(t_lp, tail, s_top)
    p, q = t_lp.exp()[:, :4], s_top.exp()
    want = (p - q).abs().sum(-1) + (tail - (1 - q.sum(-1))).abs()
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- identity with same-tokenizer KD


@pytest.mark.parametrize("option", ["span", "uld", "hybrid"])
def test_every_option_equals_same_tokenizer_kd_with_identical_tokenizers(option, tok_a, topk_store):
    from kdpipe.storage import StoreReader

    recs = list(StoreReader(str(topk_store), shuffle=False))[:6]
    std = collate(recs, pad_id=0)
    xc = XCollate(Aligner(tok_a, tok_a, identical=True), option, temperature=1.0, min_mapped_mass=0.9, pad_id=0)
    xb = xc(recs)
    assert torch.equal(xb.input_ids, std.input_ids) and torch.equal(xb.target_ids, std.target_ids)
    assert xb.xtok["kd_row"].all() and not xb.xtok["g_other"].any()
    torch.manual_seed(0)
    N, H, V = std.num_targets, 16, len(tok_a)
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    for T in (1.0, 2.0):
        for div in ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation"):
            for tail_mode in ("bucket", "renormalize"):
                spec = LossSpec(alpha=0.3, temperature=T, divergence=div, tail_mode=tail_mode, chunk_size=37)
                want = chunked_loss_parts(hidden, weight, V, std.target_ids, std.teacher_ids, std.teacher_logprobs,
                                          std.teacher_tail, spec)
                # the temperature also enters the collate (teacher chain rule); rebuild at T
                xb = XCollate(Aligner(tok_a, tok_a, identical=True), option, T, 0.9, 0)(recs)
                got = xtok_chunked_loss_parts(hidden, weight, V, xb.target_ids, xb.xtok, spec, option)
                for k in ("ce", "kd", "loss"):
                    assert torch.equal(got[k], want[k]), (T, div, tail_mode, k, got[k], want[k])


# ---------------------------------------------------------------- bad input


def _cfg(student, store, out, **kw):
    from kdpipe.pipeline.train.config import TrainConfig

    v = dict(student=str(student), stores=(str(store),), out=str(out), steps=2, tokens_per_batch=200, lr=1e-3,
             save_every=0, alpha=0.5, cross_tokenizer="span", shuffle_buffer=4)
    v.update(kw)
    return TrainConfig(**v)


@pytest.fixture(scope="module")
def store_without_files(tmp_path_factory, tiny_teacher):
    return build_store(tiny_teacher, tmp_path_factory.mktemp("xstore") / "plain", top_k=8, n_seqs=6)


@pytest.fixture(scope="module")
def store_with_files(tmp_path_factory, tiny_teacher, tok_a):
    from kdpipe.storage.tokenizer_files import save_teacher_tokenizer

    out = tmp_path_factory.mktemp("xstore") / "with"
    save_teacher_tokenizer(out, tok_a)
    return build_store(tiny_teacher, out, top_k=8, n_seqs=6)


def test_differing_tokenizers_without_an_option_name_the_options_and_the_fallback(student_b, store_with_files, tmp_path):
    from kdpipe.pipeline.train.trainer import train

    with pytest.raises(ConfigError) as e:
        train(_cfg(student_b, store_with_files, tmp_path / "r", cross_tokenizer="none"))
    msg = str(e.value)
    assert all(w in msg for w in ("--cross-tokenizer", "span", "uld", "hybrid", "--alpha 1.0"))


def test_store_without_tokenizer_files_and_no_flag(student_b, store_without_files, tiny_teacher, tmp_path):
    from kdpipe.pipeline.train.trainer import train

    with pytest.raises(ConfigError, match="teacher_tokenizer/.*--teacher-tokenizer"):
        train(_cfg(student_b, store_without_files, tmp_path / "r"))
    # --teacher-tokenizer supplies them (checked against the fingerprint): two steps run, validation aligned too
    r = train(_cfg(student_b, store_without_files, tmp_path / "r2", teacher_tokenizer=str(tiny_teacher), val_fraction=0.3))
    assert r.steps == 2 and math.isfinite(r.last["loss_kd"]) and r.last["loss_kd"] > 0
    import json

    val = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines() if '"validation"' in x]
    assert val and val[-1]["loss_kd"] > 0 and math.isfinite(val[-1]["loss"])


def test_tokenizer_files_that_do_not_match_the_fingerprint(student_b, store_without_files, store_with_files, tmp_path):
    from kdpipe.pipeline.train.trainer import train
    from kdpipe.storage import inspect_store

    with pytest.raises(StoreError, match="not the one that wrote"):
        train(_cfg(student_b, store_without_files, tmp_path / "r", teacher_tokenizer=str(student_b)))
    # files inside the store are checked by inspect --verify against the manifest's checksums
    assert inspect_store(store_with_files, verify=True)["ok"]
    f = store_with_files / "teacher_tokenizer" / "tokenizer.json"
    saved = f.read_bytes()
    try:
        f.write_bytes(saved.replace(b'"the"', b'"thx"', 1) if b'"the"' in saved else saved + b" ")
        report = inspect_store(store_with_files, verify=True)
        assert not report["ok"] and any(p["shard"] == "teacher_tokenizer" for p in report["problems"])
    finally:
        f.write_bytes(saved)


def test_tokenizer_that_cannot_give_byte_offsets(tmp_path, store_with_files):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdpipe.pipeline.tiny import DEFAULT_CORPUS

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator([DEFAULT_CORPUS], trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    with pytest.raises(ConfigError, match="cannot compute byte offsets"):
        token_bytes(tok, "student tokenizer")


def test_sample_whose_decode_does_not_reproduce_its_text(tok_a, tok_b, tiny_teacher):
    rec, _, _ = dense_record(tiny_teacher, tok_a, "Summarize:", " The city council approved a budget.", sample_id="bad-7")
    rec.text = rec.text.strip().upper()  # what a normalizer or a .strip() in a recipe does
    xc = XCollate(Aligner(tok_b, tok_a, identical=False, store="STORE"), "span", 1.0, 0.9, 0)
    with pytest.raises(DataError, match=r"STORE: sample 'bad-7'.*do not reproduce the stored text byte for byte"):
        xc([rec])


def test_check_shows_the_plan_measured_on_the_store(student_b, store_with_files, tiny_teacher, tmp_path):
    from kdpipe.pipeline.train.xtok.hooks import cross_tokenizer_plan

    text = "\n".join(cross_tokenizer_plan(_cfg(student_b, store_with_files, tmp_path / "r", cross_tokenizer="hybrid")))
    assert "cross-tokenizer hybrid" in text and ">= 0.9 of the kept mass" in text
    assert "byte offsets (teacher byte_level, student metaspace)" in text
    assert "measured on 6 sequences" in text and "1:1" in text and "teacher's mass mapped" in text
    # the same tokenizer: nothing to align
    same = "\n".join(cross_tokenizer_plan(_cfg(tiny_teacher, store_with_files, tmp_path / "r")))
    assert "shares the teacher's tokenizer" in same
    # another tokenizer without the option: check warns that training would refuse it
    warn = "\n".join(cross_tokenizer_plan(_cfg(student_b, store_with_files, tmp_path / "r", cross_tokenizer="none")))
    assert "WARNING" in warn and "cross_tokenizer" in warn and "alpha = 1.0" in warn
    assert cross_tokenizer_plan(_cfg(tiny_teacher, store_with_files, tmp_path / "r", cross_tokenizer="none")) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT | st.just(""), min_size=1, max_size=5), eos=st.lists(st.booleans(), min_size=5, max_size=5))
def test_batched_alignment_equals_per_record_alignment(tok_a, tok_b, texts, eos):
    """The collate stage aligns a whole micro-batch at once; per record it must give `align`'s groups."""
    enc_a = text_encoder(tok_a)
    recs = []
    for i, t in enumerate(texts):
        ids = enc_a([t], False)[0] + ([tok_a.eos_token_id] if eos[i] else [])
        if not ids:
            continue
        full = [tok_a.bos_token_id] + ids
        P = len(ids)
        recs.append(Record(sample_id=f"r{i}", input_ids=np.asarray(full, np.int32),
                           target_positions=np.arange(1, len(full), dtype=np.int32),
                           ids=np.zeros((P, 1), np.int32), logprobs=np.zeros((P, 1), np.float32),
                           tail=np.zeros(P, np.float32), text=t))
    if not recs:
        return
    aligner = Aligner(tok_b, tok_a, identical=False)
    ta, tb = aligner.tb_t, aligner.tb_s
    for rec, a in zip(recs, aligner.batch(recs)):
        body = rec.input_ids[1:].astype(np.int64)
        fin = rec.input_ids[-1] == tok_a.eos_token_id
        if fin:
            body = body[:-1]
        c = np.asarray(text_encoder(tok_b)([rec.text], False)[0], np.int64)
        te = ends_of(tok_a, ta, rec.text) if len(body) else np.zeros(0, np.int64)
        se = byte_ends(tb, c, strip_prefix(tb, tb.concat(c.tolist()), rec.text.encode()))
        tg, sg, G = align(te, se) if len(body) else (np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
        if fin:
            tg, sg, G = np.append(tg, G), np.append(sg, G), G + 1
        assert a.num_groups == G and np.array_equal(a.teacher_group, tg) and np.array_equal(a.student_group, sg), rec.text
        assert np.array_equal(a.input_ids[a.target_positions], np.append(c, tok_b.eos_token_id) if fin else c)
