"""The recipe base: what every recipe shares (Result, Job, request_seed, Recipe). The recipes and the
registry: recipes/__init__.py."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from kdpipe.pipeline.generate.data import Sample
from kdpipe.pipeline.generate.engines import Request, TeacherOutput
from kdpipe.pipeline.prompts import Prompter

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

    def prepare(self, samples: list[Sample], done: set[str], meta, task_index: int, sampler_engine=None) -> list[Sample]:
        """Work a recipe does on its task's samples before the teacher engine starts (the rows it then
        scores); `done`: ids already in finished shards, `meta`: the store's StoreMeta. Most recipes
        need none."""
        return samples
