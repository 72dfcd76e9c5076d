"""Recipes: what the teacher is asked per document, and which tokens become targets.

A recipe turns one `Sample` into a job: a generator that yields lists of engine `Request`s,
receives their `TeacherOutput`s, and finally returns a `Result` (one store row) or None (skipped,
counted in `stats`). The run loop drives many jobs at once, so multi-stage recipes
(basic-reading: readings per sentence, then scoring the assembled paragraph) keep the engine
as busy as single-request ones.

  summarize      prompt(doc) -> teacher generates; targets = the generated tokens.
  score          prompt(doc) + given target; targets = the target tokens (teacher forcing).
  basic-reading  split the doc into sentences (pysbd); per sentence the teacher (few-shot) lists
                 named entities with types and asks + answers questions; the paragraph is
                 reassembled as `s1 <sep> reading(s1) <sep> s2 <sep> reading(s2) <sep> ...` and
                 scored (teacher forcing); targets = each reading and the separator closing it,
                 so the stored targets align exactly with what the student reads.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from kdpipe.pipeline.generate.data import Sample, row_names
from kdpipe.pipeline.generate.engines import Request, TeacherOutput
from kdpipe.pipeline.prompts import Prompter
from kdpipe.storage.errors import DataError

Job = Generator[list[Request], list[TeacherOutput], "Result | None"]


@dataclass
class Result:
    sample_id: str
    input_ids: list[int]
    target_positions: list[int]  # t: the entries describe p(input_ids[t] | input_ids[:t])
    top_ids: np.ndarray  # [P, K] int32
    top_logprobs: np.ndarray  # [P, K] float32
    text: str | None = None


def request_seed(base: int, sample_id: str, j: int) -> int:
    """A per-request sampling seed from (run seed, sample id, request index): reruns resample identically."""
    d = hashlib.sha256(f"{base}\x00{sample_id}\x00{j}".encode()).digest()
    return int.from_bytes(d[:4], "little") & 0x7FFFFFFF


class Recipe:
    name = ""
    needs_target = False

    def __init__(self, cfg, tokenizer, max_model_len: int, stats: Counter) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.max_model_len = max_model_len
        self.stats = stats
        self.prompter = Prompter(tokenizer, cfg.chat_template, cfg.system_prompt)

    def params(self) -> dict:
        """Recipe settings that determine the store's contents (StoreMeta.recipe_params)."""
        return {"chat_template": self.prompter.chat, "system_prompt": self.cfg.system_prompt or ""}

    def check(self, samples: list[Sample]) -> None:
        """Per-sample checks that need the tokenizer; run before the engine starts."""

    def job(self, sample: Sample) -> Job:
        raise NotImplementedError

    # -- shared helpers

    def fit(self, doc: str, build: Callable[[str], list[int]], budget: int) -> tuple[list[int], str] | None:
        """Prompt ids for `doc` within `budget` tokens: truncate the document or skip (cfg.too_long).

        -> (ids, the document text actually used), or None when the sample is skipped.
        """
        ids = build(doc)
        if len(ids) <= budget:
            return ids, doc
        if self.cfg.too_long == "skip":
            self.stats["skipped_too_long"] += 1
            return None
        doc_ids = self.tok(doc, add_special_tokens=False)["input_ids"]
        keep = budget - len(build(""))
        for _ in range(6):  # token boundaries move a little when re-tokenizing the cut text
            if keep <= 0:
                break
            cut = self.tok.decode(doc_ids[:keep])
            ids = build(cut)
            if len(ids) <= budget:
                self.stats["truncated"] += 1
                return ids, cut
            keep -= len(ids) - budget + 1
        self.stats["skipped_too_long"] += 1  # even an empty document does not fit
        return None

    def cut_untokenizable(self, out: TeacherOutput) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Generated ids stop before the first id the tokenizer does not define (padded model rows)."""
        gen = out.token_ids
        for i, t in enumerate(gen):
            if t >= self.vocab_size:
                self.stats["cut_at_padded_id"] += 1
                return gen[:i], out.top_ids[:i], out.top_logprobs[:i]
        return gen, out.top_ids, out.top_logprobs

    def seed(self, sample: Sample, j: int) -> int | None:
        return request_seed(self.cfg.seed, sample.id, j) if self.cfg.temperature > 0 else None


class Summarize(Recipe):
    name = "summarize"

    def params(self) -> dict:
        return {**super().params(), "prompt_template": self.cfg.template}

    def build(self, doc: str) -> list[int]:
        return self.prompter.ids(self.cfg.template.replace("{text}", doc))

    def job(self, sample: Sample) -> Job:
        fitted = self.fit(sample.text, self.build, self.max_model_len - self.cfg.max_new_tokens)
        if fitted is None:
            return None
        prompt, _ = fitted
        (out,) = yield [Request("generate", prompt, max_new_tokens=self.cfg.max_new_tokens, seed=self.seed(sample, 0))]
        gen, top_ids, top_lps = self.cut_untokenizable(out)
        if not gen:
            self.stats["skipped_empty_output"] += 1
            return None
        text = self.tok.decode(gen, skip_special_tokens=True) if self.cfg.store_text else None
        L = len(prompt)
        return Result(sample.id, prompt + gen, list(range(L, L + len(gen))), top_ids, top_lps, text)


class Score(Summarize):
    name = "score"
    needs_target = True

    def check(self, samples: list[Sample]) -> None:
        for s in samples:
            if isinstance(s.target, list):
                bad = [t for t in s.target if not 0 <= t < self.vocab_size]
                if bad:
                    raise DataError(
                        f"{self.cfg.data}: {row_names(self.cfg.data, s.row)} (id {s.id!r}): target token id {bad[0]} "
                        f"is outside the teacher's vocabulary [0, {self.vocab_size}); pre-tokenized targets must use "
                        f"the teacher's tokenizer"
                    )

    def job(self, sample: Sample) -> Job:
        if isinstance(sample.target, list):
            target = list(sample.target)  # pre-tokenized: used exactly as given
        else:
            target = self.prompter.target_ids(self.cfg.template.replace("{text}", sample.text), sample.target)
        # The scored sequence is prompt + target; vLLM needs room for one generated token.
        fitted = self.fit(sample.text, self.build, self.max_model_len - 1 - len(target))
        if fitted is None:
            return None
        prompt, _ = fitted
        seq = prompt + target
        positions = list(range(len(prompt), len(seq)))
        (out,) = yield [Request("score", seq, positions=positions)]
        return Result(sample.id, seq, positions, out.top_ids, out.top_logprobs, None)


class BasicReading(Recipe):
    name = "basic-reading"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        import pysbd

        try:
            self.segmenter = pysbd.Segmenter(language=self.cfg.sentence_language, clean=False)
        except ValueError as e:
            from kdpipe.storage.errors import ConfigError

            raise ConfigError(f"sentence_language: {e}") from None
        # Plain text (no chat template): the student reads the paragraph, not a conversation.
        self.prefix = list(self.tok("", add_special_tokens=True)["input_ids"])  # BOS if the tokenizer adds one
        self.sep_ids = list(self.tok(" " + self.cfg.separator, add_special_tokens=False)["input_ids"])

    def params(self) -> dict:
        return {
            **super().params(),
            "reading_template": self.cfg.reading,
            "separator": self.cfg.separator,
            "sentence_language": self.cfg.sentence_language,
            "splitter": "pysbd",
        }

    def sentences(self, text: str) -> list[str]:
        return [s.strip() for s in self.segmenter.segment(text) if s.strip()]

    def build_reading(self, sentence: str) -> list[int]:
        return self.prompter.ids(self.cfg.reading.replace("{sentence}", sentence))

    def job(self, sample: Sample) -> Job:
        budget = self.max_model_len - 1  # the scored paragraph, plus one generated token
        sents = self.sentences(sample.text)
        sent_ids = [list(self.tok((" " if i else "") + s, add_special_tokens=False)["input_ids"]) for i, s in enumerate(sents)]
        # Sentences that can fit with (at least empty) readings; readings are generated for these only.
        total, n = len(self.prefix), 0
        for ids in sent_ids:
            if total + len(ids) + 2 * len(self.sep_ids) > budget:
                break
            total += len(ids) + 2 * len(self.sep_ids)
            n += 1
        truncated = n < len(sents)
        if truncated and self.cfg.too_long == "skip":
            self.stats["skipped_too_long"] += 1
            return None
        if n == 0:  # a single sentence longer than the context: cut it
            room = budget - len(self.prefix) - 2 * len(self.sep_ids)
            if room < 1:
                self.stats["skipped_too_long"] += 1
                return None
            sent_ids = [sent_ids[0][:room]]
            sents = [self.tok.decode(sent_ids[0])]
            n = 1
        prompts = []
        for s in sents[:n]:
            fitted = self.fit(s, self.build_reading, self.max_model_len - self.cfg.max_new_tokens)
            if fitted is None:
                return None
            prompts.append(fitted[0])
        outs = yield [
            Request("generate", p, max_new_tokens=self.cfg.max_new_tokens, seed=self.seed(sample, j))
            for j, p in enumerate(prompts)
        ]
        readings = []
        for o in outs:
            gen, _, _ = self.cut_untokenizable(o)
            readings.append(self.tok.decode(gen, skip_special_tokens=True).strip())

        # Assemble `s1 <sep> r1 <sep> s2 <sep> r2 <sep> ...` from separately tokenized pieces, so
        # every reading span's positions are known exactly.
        ids = list(self.prefix)
        positions: list[int] = []
        texts: list[str] = []
        for i in range(n):
            r_ids = list(self.tok(" " + readings[i], add_special_tokens=False)["input_ids"]) if readings[i] else []
            piece = sent_ids[i] + self.sep_ids + r_ids + self.sep_ids
            if len(ids) + len(piece) > budget:
                truncated = True
                if self.cfg.too_long == "skip":
                    self.stats["skipped_too_long"] += 1
                    return None
                break
            start = len(ids) + len(sent_ids[i]) + len(self.sep_ids)
            ids += piece
            positions += range(start, len(ids))  # the reading and the separator that closes it
            texts.append(f"{sents[i]} {self.cfg.separator}" + (f" {readings[i]}" if readings[i] else "") + f" {self.cfg.separator}")
        if not positions:
            self.stats["skipped_too_long"] += 1
            return None
        if truncated:
            self.stats["truncated"] += 1
        self.stats["readings"] += len(texts)
        (out,) = yield [Request("score", ids, positions=positions)]
        text = " ".join(texts) if self.cfg.store_text else None
        return Result(sample.id, ids, positions, out.top_ids, out.top_logprobs, text)


RECIPE_CLASSES = {r.name: r for r in (Summarize, Score, BasicReading)}


def make_recipe(cfg, tokenizer, max_model_len: int, stats: Counter) -> Recipe:
    if cfg.recipe == "on-policy":  # two engines per task: its own module (onpolicy.py)
        from kdpipe.pipeline.generate.onpolicy import OnPolicy

        return OnPolicy(cfg, tokenizer, max_model_len, stats)
    return RECIPE_CLASSES[cfg.recipe](cfg, tokenizer, max_model_len, stats)
