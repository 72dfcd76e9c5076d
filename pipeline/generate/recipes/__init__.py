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

from collections import Counter

from kdpipe.pipeline.generate.recipes.base import Job, Recipe, Result, request_seed
from kdpipe.pipeline.generate.recipes.onpolicy import OnPolicy
from kdpipe.pipeline.generate.recipes.reading import BasicReading
from kdpipe.pipeline.generate.recipes.summarize import Score, Summarize

# on-policy: two engines per task (its sampler first, recipes/onpolicy.py).
RECIPE_CLASSES = {r.name: r for r in (Summarize, Score, BasicReading, OnPolicy)}


def make_recipe(cfg, tokenizer, max_model_len: int, stats: Counter) -> Recipe:
    return RECIPE_CLASSES[cfg.recipe](cfg, tokenizer, max_model_len, stats)


__all__ = ["RECIPE_CLASSES", "BasicReading", "Job", "OnPolicy", "Recipe", "Result", "Score", "Summarize", "make_recipe",
           "request_seed"]
