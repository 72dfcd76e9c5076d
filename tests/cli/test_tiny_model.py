"""`kdpipe tiny-model`: a tokenizer and a tiny Llama trained briefly on a JSONL, without the demo (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kdpipe.pipeline.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "pipeline" / "data" / "summarization.jsonl"


def test_tiny_model_trains_a_loadable_model_and_refuses_bad_input(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:8]))
    r = CliRunner().invoke(main, ["tiny-model", str(tmp_path / "m"), "--train-on", str(docs), "--text-field", "document",
                                  "--steps", "3", "--layers", "1", "--vocab", "400", "--context", "256"])
    assert r.exit_code == 0, r.output
    cfg = AutoConfig.from_pretrained(tmp_path / "m")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.max_position_embeddings) == (1, 64, 256)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "m")) <= 400
    assert [json.loads(x)["step"] for x in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()] == [3]
    assert not (tmp_path / "m.init").exists() and not (tmp_path / "m.partial").exists()

    for args, message in [
        (["--steps", "1"], f"out: {tmp_path / 'm'} already exists"),
        (["--hidden", "48"], "hidden: 48 is not a multiple of 32"),
    ]:
        out = tmp_path / "m" if "already" in message else tmp_path / "n"
        r = CliRunner().invoke(main, ["tiny-model", str(out), "--train-on", str(docs), "--text-field", "document", *args])
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["tiny-model", str(tmp_path / "n"), "--train-on", str(docs)])
    assert r.exit_code != 0 and "line 1 has no text in field 'text'" in r.output and "--text-field" in r.output, r.output
    assert not (tmp_path / "n").exists()
