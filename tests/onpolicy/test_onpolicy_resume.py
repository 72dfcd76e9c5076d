"""The on-policy task as the unit of resume, and phase one's bad inputs (HF reference engine).

kill -9 while the teacher scores the sampled completions, then rerun: every row is stored exactly
once, the rows are the completions drawn before the kill (the samples file is reused, nothing is
drawn again), and the rerun's rows equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onpolicy_helpers import completions, onpolicy_cfg, read_records, write_docs

from kdpipe.pipeline.generate.config import GenerateConfig
from kdpipe.pipeline.generate.run import generate_logits
from kdpipe.storage.errors import ConfigError, StoreError

DOCS = 60


def cli(cfg: GenerateConfig) -> list[str]:
    import dataclasses

    args = [sys.executable, "-m", "kdpipe.pipeline.cli", "generate-logits"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None or v == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        args += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return args


def test_kill_9_while_scoring_then_rerun(tiny_teacher, tiny_student, tmp_path):
    data = write_docs(tmp_path / "p.jsonl", DOCS, seed=11)
    out = tmp_path / "store"
    cfg = onpolicy_cfg(tiny_teacher, tiny_student, data, out, engine="hf", shard_mb=0.0005, max_new_tokens=8)
    proc = subprocess.Popen(cli(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples = out / "samples" / "task-00000.json"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if samples.exists() and len(list(out.glob("shard-*.arrow"))) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "generate finished before it could be killed:\n" + (proc.stdout.read() if proc.stdout else "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    task = json.loads((out / "tasks" / "task-00000.json").read_text())
    assert not task["complete"]
    drawn_before = samples.read_bytes()

    s = generate_logits(cfg)  # the rerun, in-process
    assert not s.interrupted and s.already_done >= 1 and s.written == DOCS * 2 - s.already_done
    assert "sampled_completions" not in s.stats  # nothing was drawn again
    assert samples.read_bytes() == drawn_before
    recs = read_records(out)  # asserts every row exactly once
    assert len(recs) == DOCS * 2
    drawn = json.loads(drawn_before)["samples"]
    want = {f"{sid}#{j}": (p, c) for sid, v in drawn.items() for j, (p, c) in enumerate(v)}
    assert completions(recs) == want

    # an uninterrupted run from scratch draws and stores the same rows
    ref = generate_logits(onpolicy_cfg(tiny_teacher, tiny_student, data, tmp_path / "ref", engine="hf", max_new_tokens=8))
    assert ref.written == DOCS * 2
    ref_recs = read_records(tmp_path / "ref")
    assert completions(ref_recs) == want
    for k in want:
        assert (ref_recs[k].ids == recs[k].ids).all() and np.allclose(ref_recs[k].logprobs, recs[k].logprobs, atol=1e-5)


def test_rows_without_their_samples_file_are_refused(tiny_teacher, tiny_student, tmp_path):
    data = write_docs(tmp_path / "p.jsonl", 3, seed=1)
    cfg = onpolicy_cfg(tiny_teacher, tiny_student, data, tmp_path / "s", engine="hf", samples_per_prompt=1, max_new_tokens=4)
    generate_logits(cfg)
    (tmp_path / "s" / "samples" / "task-00000.json").unlink()
    t = tmp_path / "s" / "tasks" / "task-00000.json"
    doc = json.loads(t.read_text())
    doc["complete"] = False  # as if killed after its shards
    t.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="no samples/task-00000.json"):
        generate_logits(cfg)


def test_bad_inputs(tiny_teacher, tiny_student, tmp_path):
    from kdpipe.pipeline.tiny import TinyModelConfig, build_tiny

    data = write_docs(tmp_path / "p.jsonl", 2)
    with pytest.raises(ConfigError, match="samples_per_prompt: 0 must be >= 1"):
        onpolicy_cfg(tiny_teacher, tiny_student, data, tmp_path / "a", samples_per_prompt=0)
    with pytest.raises(ConfigError, match="sampler is not set"):
        onpolicy_cfg(tiny_teacher, None, data, tmp_path / "b")
    other = build_tiny(tmp_path / "other", ["a completely different corpus of words, for another tokenizer"] * 4,
                       TinyModelConfig(vocab_size=300, seed=4))
    with pytest.raises(ConfigError, match="its tokenizer differs from the teacher's"):
        generate_logits(onpolicy_cfg(tiny_teacher, other, data, tmp_path / "c", engine="hf"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.toml").write_text('student = "x"\n')
    with pytest.raises(ConfigError, match="training run without final/"):
        generate_logits(onpolicy_cfg(tiny_teacher, run, data, tmp_path / "d", engine="hf"))
    assert not (tmp_path / "c" / "meta.json").exists() and not (tmp_path / "d" / "meta.json").exists()
    # a finished run means its final/
    from kdpipe.pipeline.generate.recipes.onpolicy import resolve_sampler

    (run / "final").symlink_to(tiny_student, target_is_directory=True)
    assert resolve_sampler(str(run)) == str((run / "final").resolve())
