"""Validation during train-student: metrics lines at the right steps, RUN/best, the val_fraction split, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.storage.errors import ConfigError

from train_stores import build_store, topk_store  # noqa: F401 (fixtures)


def lines(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "validation"]


def cfg_of(student, store, out, **kw) -> TrainConfig:
    values = dict(student=str(student), stores=(str(store),), out=str(out), steps=6, tokens_per_batch=160,
                  lr=3e-3, save_every=2, shuffle_buffer=4, alpha=0.5, temperature=2.0, divergence="forward_kl", seed=3,
                  schedule="constant", prefetch=1)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def val_store(tmp_path_factory, tiny_teacher) -> Path:
    return build_store(tiny_teacher, tmp_path_factory.mktemp("valstore") / "val", top_k=8, n_seqs=8, seed=11)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, tiny_student, topk_store, val_store):
    """The CLI with --val-store, --eval-every 2, --save-best: 6 steps, validation at 2, 4, 6."""
    from click.testing import CliRunner

    from kdpipe.pipeline.cli import main as cli

    out = tmp_path_factory.mktemp("runs") / "best"
    cfg = cfg_of(tiny_student, topk_store, out, val_stores=(str(val_store),), eval_every=2, save_best=True)
    args = ["train-student", "--student", cfg.student, "--store", cfg.stores[0], "--out", str(out),
            "--val-store", str(val_store), "--eval-every", "2", "--save-best"]
    for key in ("steps", "tokens_per_batch", "lr", "save_every", "shuffle_buffer", "alpha", "temperature", "divergence",
                "seed", "schedule", "prefetch"):
        args += ["--" + key.replace("_", "-"), str(getattr(cfg, key))]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return cfg, out, res.output


def test_validation_lines_at_the_right_steps(best_run):
    cfg, out, _ = best_run
    train, val = lines(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val] == [2, 4, 6]
    n = val[0]["target_tokens"]
    assert n > 0 and all(r["target_tokens"] == n and r["sequences"] == 8 for r in val)  # the whole val store, each time
    for r in val:
        assert r["loss"] == pytest.approx(cfg.alpha * r["loss_ce"] + (1 - cfg.alpha) * r["loss_kd"], rel=1e-6)
        assert r["loss_kd"] > 0
    # Validation lines come before the checkpoint of their step, in step order.
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in rows][:3] == [(1, None), (2, None), (2, "validation")]


def test_validation_loss_is_the_dense_per_token_loss(best_run, tiny_student, val_store):
    """The logged validation figures = the dense formula over every val target token / their count."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdpipe.pipeline.train.losses import distillation_loss_parts
    from kdpipe.storage.batch import collate
    from kdpipe.storage.reader import StoreReader

    cfg, out, _ = best_run
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    sums, n = {"ce": 0.0, "kd": 0.0}, 0
    with torch.no_grad():
        for rec in StoreReader(str(val_store), shuffle=False):
            b = collate([rec], pad_id=0)
            logits = model(input_ids=b.input_ids).logits.reshape(-1, model.config.vocab_size)[b.pred_index]
            parts = distillation_loss_parts(
                logits, b.target_ids, b.teacher_ids, b.teacher_logprobs, b.teacher_tail, alpha=cfg.alpha,
                temperature=cfg.temperature, divergence=cfg.divergence, tail_mode=cfg.tail_mode)
            sums["ce"] += float(parts["ce"])
            sums["kd"] += float(parts["kd"])
            n += b.num_targets
    last = lines(out)[1][-1]
    assert last["target_tokens"] == n
    assert last["loss_ce"] == pytest.approx(sums["ce"] / n, rel=1e-4)
    assert last["loss_kd"] == pytest.approx(sums["kd"] / n, rel=1e-4)


def test_best_is_the_step_with_the_lowest_validation_loss(best_run, tiny_student):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, out, output = best_run
    _, val = lines(out)
    low = min(val, key=lambda r: r["loss"])
    info = json.loads((out / "best" / "best.json").read_text())
    assert info["step"] == low["step"] and info["metric"] == "loss" and info["value"] == pytest.approx(low["loss"])
    assert f"best: step {low['step']}" in output and str(out / "best") in output
    # The RUN/final layout, loadable by transformers; the weights of the best step's checkpoint.
    assert (out / "best" / "train_config.toml").is_file() and (out / "best" / "tokenizer_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out / "best")
    a = load_file(out / "best" / "model.safetensors")
    b = load_file(out / f"checkpoint-{low['step']}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "best.tmp").exists() and not (out / "best.old").exists()
    state = json.loads((out / "checkpoint-6" / "train_state.json").read_text())
    assert state["best"]["step"] == low["step"]


def test_resume_keeps_the_best_so_far(best_run, tmp_path):
    """4 steps, then --resume to 6: the same validation lines and the same RUN/best as the straight run."""
    from kdpipe.pipeline.train.trainer import train

    cfg, ref, _ = best_run
    out = tmp_path / "resumed"
    first = train(TrainConfig(**{**cfg.__dict__, "out": str(out), "steps": 4}))
    assert first.best is not None and [r["step"] for r in lines(out)[1]] == [2, 4]
    second = train(TrainConfig(**{**cfg.__dict__, "out": str(out), "resume": True}))
    got, want = lines(out), lines(ref)
    assert [r["step"] for r in got[1]] == [2, 4, 6]
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        assert g["step"] == w["step"] and g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    ref_best = json.loads((ref / "best" / "best.json").read_text())
    assert second.best["step"] == ref_best["step"]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == ref_best["step"]


def test_val_fraction_split_is_disjoint_from_training(tiny_student, topk_store, tmp_path):
    from kdpipe.pipeline.train.data import DataSpec, StepData, in_validation
    from kdpipe.pipeline.train.distributed import Dist
    from kdpipe.pipeline.train.trainer import train
    from kdpipe.pipeline.train.validate import ValidationData
    from kdpipe.storage.reader import StoreReader

    all_ids = {r.sample_id for r in StoreReader(str(topk_store), shuffle=False)}
    held = {i for i in all_ids if in_validation(5, i, 0.25)}
    assert 0 < len(held) < len(all_ids)
    assert held == {i for i in all_ids if in_validation(5, i, 0.25)}  # deterministic
    assert held != {i for i in all_ids if in_validation(6, i, 0.25)}  # and seeded

    # Training: two whole epochs of the stream never yield a held-out id, and yield every other one.
    spec = DataSpec(stores=(str(topk_store),), weights=(1.0,), tokens_per_batch=160, max_len=64, truncate=False,
                    pad_id=0, shuffle_buffer=4, seed=5, holdout_fraction=0.25, holdout_seed=5)
    data = StepData(spec, rank=0, world_size=1, grad_accum=2, prefetch=1)
    seen: set[str] = set()
    try:
        for _ in range(20):
            for mb in next(data).micro_batches:
                seen.update(mb.sample_ids)
    finally:
        data.close()
    assert seen == all_ids - held

    # Validation: exactly the held-out ids, split over ranks without overlap.
    cfg = cfg_of(tiny_student, topk_store, tmp_path / "x", val_fraction=0.25, seed=5)
    per_rank = [{i for b in ValidationData(cfg, spec, Dist(r, 2, r, __import__("torch").device("cpu"), None)).batches()
                 for i in b.sample_ids} for r in range(2)]
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == held

    # And the trainer with --val-fraction: validation only after the last step, over the held-out ids.
    r = train(cfg_of(tiny_student, topk_store, tmp_path / "run", val_fraction=0.25, seed=5, steps=2, save_every=0))
    _, val = lines(r.run)
    assert [v["step"] for v in val] == [2] and val[0]["sequences"] == len(held) and r.best is None
    assert not (r.run / "best").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(eval_every=5), "eval_every: 5 needs a validation source"),
    (dict(save_best=True), "save_best"),
    (dict(val_fraction=1.0), r"val_fraction: 1.0 must be in \(0, 1\)"),
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(val_fraction=0.1, val_stores=("v",)), "give one validation source"),
    (dict(val_split_seed=3), "val_split_seed"),
    (dict(val_fraction=0.1, alpha=1.0, best_metric="loss_kd"), "best_metric"),
    (dict(val_fraction=0.1, eval_every=-1), "eval_every"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(student="s", stores=("a",), out="o", **kw)


def test_val_store_of_another_codec_is_refused(tiny_student, topk_store, tmp_path, tiny_teacher):
    from kdpipe.pipeline.train.trainer import train
    from kdpipe.storage.errors import StoreError

    other = build_store(tiny_teacher, tmp_path / "sampled", codec_name="sampled", top_k=4, n_seqs=2)
    with pytest.raises(StoreError, match=f"val_stores: {other}.*codec 'sampled'"):
        train(cfg_of(tiny_student, topk_store, tmp_path / "run", val_stores=(str(other),), steps=1))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_readers_of_metrics_handle_validation_lines(tmp_path):
    from kdpipe.jobs.status import last_metrics
    from kdpipe.pipeline.evaluate.report import plot_all
    from kdpipe.pipeline.evaluate.run import read_run
    from kdpipe.pipeline.train.trainer import MetricsLog

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": 3.0, "loss_ce": 2.0, "loss_kd": 4.0},
            {"step": 2, "loss": 2.5, "loss_ce": 1.5, "loss_kd": 3.5},
            {"step": 2, "split": "validation", "loss": 2.8, "loss_ce": 1.9, "loss_kd": 3.7, "target_tokens": 9},
            {"step": 3, "loss": 2.0, "loss_ce": 1.0, "loss_kd": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = read_run(str(run))
    assert info["curve"]["loss"] == [[1, 3.0], [2, 2.5], [3, 2.0]]
    assert info["curve"]["val_loss"] == [[2, 2.8]] and info["curve"]["val_loss_ce"] == [[2, 1.9]]
    assert last_metrics(run)["step"] == 3 and last_metrics(run, "validation")["loss"] == 2.8
    report = {"models": [], "runs": {"kd": info}}
    assert "loss.png" in plot_all(report, tmp_path)
    MetricsLog(run / "metrics.jsonl", resume_step=2, enabled=True).close()  # resume trims both kinds past its step
    assert [json.loads(x).get("split") for x in (run / "metrics.jsonl").read_text().splitlines()] == [None, None, "validation"]


def test_job_file_student_takes_validation_keys(tmp_path):
    """[[students]] val_stores resolve against the job file's folder; the other keys pass through."""
    from kdpipe.jobs.phases import train_config, train_list_fields
    from kdpipe.jobs.spec import expand_students, parse_job
    from kdpipe.pipeline.config import read_toml

    src = Path(__file__).resolve().parents[2] / "jobs" / "examples" / "llama-3.1-70b-to-8b.toml"
    doc = read_toml(src)
    doc["students"] = [{**doc["students"][0], "val_stores": ["stores/val"], "eval_every": 50, "save_best": True}]
    job = parse_job(doc, tmp_path / "job.toml", run_dir=tmp_path / "run")
    run = expand_students(job, train_list_fields())[0]
    cfg = train_config(job, run, tmp_path / "run" / "runs" / run.name)
    assert cfg.val_stores == (str(tmp_path / "stores" / "val"),) and cfg.eval_every == 50 and cfg.save_best


def test_two_process_fsdp_validation_matches_one_process(best_run, val_store, tmp_path):
    """FSDP2 on 2 ranks (gloo): each rank validates its part, ranks with fewer batches join the collectives with
    a dummy batch; the figures equal the 1-process run with the same global batch (2 micro-batches)."""
    import os
    import subprocess
    import sys

    import torch

    from kdpipe.pipeline.config import write_resolved
    from kdpipe.pipeline.train.distributed import Dist
    from kdpipe.pipeline.train.trainer import train
    from kdpipe.pipeline.train.validate import ValidationData

    from kdpipe.pipeline.train.data import DataSpec

    cfg, _, _ = best_run
    one = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "one"), "grad_accum": 2, "steps": 4, "save_every": 0,
                         "tokens_per_batch": 64})
    spec = DataSpec(stores=one.stores, weights=(1.0,), tokens_per_batch=64, max_len=1024, truncate=False, pad_id=0)
    counts = [sum(1 for _ in ValidationData(one, spec, Dist(r, 2, r, torch.device("cpu"), None)).batches())
              for r in range(2)]
    assert counts[0] != counts[1]  # the ranks run out of validation batches at different times
    train(one)
    toml = tmp_path / "cfg.toml"
    write_resolved(TrainConfig(**{**one.__dict__, "out": str(tmp_path / "fsdp"), "grad_accum": 1, "fsdp": True}), toml)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                        str(29700 + os.getpid() % 200), "-m", "kdpipe.pipeline.cli", "train-student", "--config", str(toml)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = lines(tmp_path / "fsdp")[1], lines(tmp_path / "one")[1]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for g, w in zip(got, want):
        assert g["target_tokens"] == w["target_tokens"] and g["sequences"] == w["sequences"] == 8
        for k in ("loss", "loss_ce", "loss_kd"):
            assert g[k] == pytest.approx(w[k], rel=1e-5)
    assert json.loads((tmp_path / "fsdp" / "best" / "best.json").read_text())["step"] == \
        json.loads((tmp_path / "one" / "best" / "best.json").read_text())["step"]
