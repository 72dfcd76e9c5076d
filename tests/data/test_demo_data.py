"""The demo's data plan on the shipped Debian corpus: short documents, a small seeded transfer set
inside the teacher's training split, held-out documents from the held-out groups only."""

from __future__ import annotations

import pytest

from kdpipe.jobs.demo import BUDGETS, DemoConfig, corpus_path, read_corpus, split_rows
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


def test_a_rerun_reuses_only_the_same_settings(rows, tmp_path):
    from kdpipe.jobs import demo

    cfg = DemoConfig(out=str(tmp_path / "o"))
    data = split_rows(cfg, rows)
    h = demo._models_hash(cfg, data)
    assert h == demo._models_hash(cfg, split_rows(cfg, list(reversed(rows))))
    assert h != demo._models_hash(DemoConfig(out=cfg.out, student_steps=7), data)
    assert h == demo._models_hash(DemoConfig(out=str(tmp_path / "elsewhere")), data)  # the folder is not a setting
    out = tmp_path / "o"
    teacher, student = out / "models" / "teacher", out / "models" / "student-init"
    for d in (teacher, student, out / "store", out / "job"):
        d.mkdir(parents=True)
    stamp = out / "models" / "demo-models.json"
    stamp.write_text('{"hash": "%s"}' % h)
    assert not demo._stamp_matches(stamp, h, teacher, student)  # no weights yet
    for d in (teacher, student):
        (d / "model.safetensors").write_bytes(b"x")
    assert demo._stamp_matches(stamp, h, teacher, student)
    assert not demo._stamp_matches(stamp, "other", teacher, student)
    (out / "notes.txt").write_text("mine")
    demo._clear_derived(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only the demo's own folders go


def test_refuses_a_folder_that_is_not_a_demo_output(tmp_path):
    from kdpipe.jobs.demo import run_demo

    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a demo output folder"):
        run_demo(DemoConfig(out=str(tmp_path)), log=lambda s: None)
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_teacher_doc_loss_weight_is_refused_below_0():
    with pytest.raises(ConfigError, match="teacher_doc_loss_weight"):
        DemoConfig(teacher_doc_loss_weight=-0.5)
