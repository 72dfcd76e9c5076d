"""The demo's data plan on the shipped Debian corpus: short documents, a small seeded transfer set
inside the teacher's training split, held-out documents from the held-out groups only."""

from __future__ import annotations

import pytest

from kdpipe.pipeline.demo import BUDGETS, DemoConfig, corpus_path, read_corpus, split_rows
from kdpipe.storage.errors import ConfigError


@pytest.fixture(scope="module")
def rows():
    return read_corpus(corpus_path(DemoConfig()), DemoConfig().max_doc_chars)


def test_split_rows_is_a_seeded_subset_and_never_leaks(rows):
    cfg = DemoConfig()
    data = split_rows(cfg, rows)
    assert all(len(r["document"]) <= cfg.max_doc_chars for r in data["train"] + data["heldout"])
    train_ids = {r["id"] for r in data["train"]}
    assert {r["id"] for r in data["transfer"]} <= train_ids
    assert len(data["transfer"]) == BUDGETS["default"]["transfer_docs"]
    assert len(data["transfer"]) * 10 <= len(data["train"])  # the teacher sees far more than the students
    assert len(data["heldout"]) == BUDGETS["default"]["eval_samples"]
    train_groups = {r["group"] for r in data["train"]}
    assert not any(r["group"] in train_groups for r in data["heldout"])
    # Same seed, same subsets; another seed, other ones.
    assert split_rows(cfg, list(reversed(rows)))["transfer"] == data["transfer"]
    other = split_rows(DemoConfig(seed=1), rows)
    assert {r["id"] for r in other["transfer"]} != {r["id"] for r in data["transfer"]}


def test_refusals_say_what_to_change(rows):
    with pytest.raises(ConfigError, match="transfer_docs"):
        split_rows(DemoConfig(transfer_docs=10**6), rows)
    with pytest.raises(ConfigError, match="teacher must be larger"):
        DemoConfig(teacher_hidden=64, teacher_layers=2)
    with pytest.raises(ConfigError, match="alpha"):
        DemoConfig(alpha=1.0)
