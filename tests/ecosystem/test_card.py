"""RUN/final/README.md is a Hub model card; --push-to-hub prepares huggingface_hub's upload of RUN/final."""

from __future__ import annotations

import json

import pytest

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.storage.errors import KdpipeError

from eco_helpers import metrics, topk_store  # noqa: F401


def _front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def carded_run(tmp_path_factory, tiny_student, topk_store):
    from kdpipe.pipeline.train.trainer import train

    out = tmp_path_factory.mktemp("card") / "kd-run"
    cfg = TrainConfig(student=str(tiny_student), stores=(str(topk_store),), out=str(out), steps=3, tokens_per_batch=160,
                      lr=2e-3, save_every=0, alpha=0.4, temperature=2.0, tail_mode="bucket", val_fraction=0.25)
    train(cfg)
    return out


def test_model_card_front_matter_and_body(carded_run, topk_store):
    from kdpipe.storage import open_store

    text = (carded_run / "final" / "README.md").read_text()
    fm = _front_matter(text)
    assert fm["library_name"] == "transformers" and "knowledge-distillation" in fm["tags"]
    assert "base_model" not in fm  # a local student folder is not a Hub id
    m = open_store(topk_store)
    last = [r for r in metrics(carded_run) if "split" not in r][-1]
    val = [r for r in metrics(carded_run) if r.get("split") == "validation"][-1]
    for piece in (m.cache_key, m.meta.teacher, "topk (k=8)", "α = 0.4", "T = 2.0", "tail mode = bucket",
                  "steps: 3 of 3", f"{last['loss']:.4f}", f"final validation loss: {val['loss']:.4f}", "Not evaluated yet"):
        assert piece in text, piece


def test_card_gains_evaluation_headline(carded_run):
    from kdpipe.pipeline.card import update_run_cards

    report = {"data": {"path": "heldout.jsonl", "num_examples": 8}, "models": [
        {"name": "teacher", "role": "teacher", "run": None, "quality": {"rougeL": {"mean": 0.5}}},
        {"name": "kd", "role": "student", "run": str(carded_run), "quality": {"rougeL": {"mean": 0.25}},
         "retention_vs_teacher_pct": {"rougeL": 50.0}},
    ]}
    assert update_run_cards(report) == [carded_run / "final" / "README.md"]
    text = (carded_run / "final" / "README.md").read_text()
    assert "| kd | student | 0.250 | 50.0 |" in text and "8 examples of `heldout.jsonl`" in text


def test_hub_fields_for_hub_ids(tmp_path):
    from kdpipe.pipeline.card import model_card

    text = model_card(tmp_path / "run", {"student": "meta-llama/Llama-3.1-8B-Instruct", "stores": []})
    assert _front_matter(text)["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_push_to_hub_prepares_upload_of_final(carded_run, monkeypatch):
    """The real upload needs the network: the test stops at the prepared upload_folder call, then
    checks that a failed upload (offline here) keeps RUN/final and says how to retry."""
    from kdpipe.pipeline.card import prepare_upload, push_to_hub

    up = prepare_upload(carded_run / "final", "me/kd-run")
    assert up.fn.__name__ == "upload_folder" and up.kwargs["repo_id"] == "me/kd-run"
    assert up.kwargs["folder_path"] == str(carded_run / "final") and up.kwargs["repo_type"] == "model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KdpipeError, match=r"--push-to-hub me/kd-run: uploading .*final failed .*hf upload me/kd-run"):
        push_to_hub(carded_run / "final", "me/kd-run")
    assert (carded_run / "final" / "model.safetensors").is_file()
    with pytest.raises(KdpipeError, match="has no README.md"):
        prepare_upload(carded_run, "me/kd-run")
