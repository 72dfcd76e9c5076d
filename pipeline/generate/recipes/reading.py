"""basic-reading: per sentence the teacher lists entities and asks and answers questions; the reassembled
paragraph is scored (see recipes/__init__.py)."""

from __future__ import annotations

from kdpipe.pipeline.generate.data import Sample
from kdpipe.pipeline.generate.engines import Request
from kdpipe.pipeline.generate.recipes.base import Job, Recipe, Result


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
