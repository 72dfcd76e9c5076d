"""summarize (the teacher generates; targets = its tokens) and score (teacher forcing on a given target)."""

from __future__ import annotations

from kdpipe.pipeline.generate.data import Sample, row_names
from kdpipe.pipeline.generate.engines import Request
from kdpipe.pipeline.generate.recipes.base import Job, Recipe, Result
from kdpipe.storage.errors import DataError


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
