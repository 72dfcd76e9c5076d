"""train-student end to end on tiny models: normalization, distributed, resume, outputs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdpipe.pipeline.train.config import TrainConfig
from kdpipe.storage.errors import ConfigError, KdpipeError, StoreError

from train_stores import build_store, sampled_store, topk_store  # noqa: F401 (fixtures)

VENV_BIN = Path(sys.executable).parent


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(run: Path) -> list[tuple[float, float, float]]:
    return [(m["loss"], m["loss_ce"], m["loss_kd"]) for m in metrics(run)]


def base_cfg(student, store, out, **kw) -> TrainConfig:
    values = dict(student=str(student), stores=(str(store),), out=str(out), steps=6, tokens_per_batch=160,
                  grad_accum=2, lr=2e-3, save_every=2, shuffle_buffer=4, alpha=0.5, temperature=2.0, seed=3)
    values.update(kw)
    return TrainConfig(**values)


def write_toml(path: Path, cfg: TrainConfig) -> Path:
    from kdpipe.pipeline.config import write_resolved

    write_resolved(cfg, path)
    return path


@pytest.fixture(scope="module")
def padded_student(tmp_path_factory, tiny_teacher) -> Path:
    """The student with its model vocabulary padded beyond the tokenizer's (sliced, not refused)."""
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model

    out = tmp_path_factory.mktemp("padded_student")
    build_model(out, tiny_teacher, TinyModelConfig(model_vocab_size=576, hidden_size=32, intermediate_size=64,
                                                   num_attention_heads=2, num_key_value_heads=1, seed=1))
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, padded_student, topk_store):
    """One process, 2 micro-batches per step, 6 steps, checkpoints every 2: the curve others must match."""
    from kdpipe.pipeline.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "reference"
    cfg = base_cfg(padded_student, topk_store, out)
    result = train(cfg)
    assert result.steps == 6 and not result.interrupted
    return cfg, out


# ------------------------------------------------------------------------------- normalization


def _records(store, n):
    from kdpipe.storage.reader import StoreReader

    it = iter(StoreReader(str(store), shuffle=False))
    return [next(it) for _ in range(n)]


def _loss_module(student, store, alpha=0.5, temperature=2.0):
    from transformers import AutoModelForCausalLM

    from kdpipe.pipeline.train.chunked import LossSpec
    from kdpipe.pipeline.train.student_loss import StudentLoss
    from kdpipe.storage.manifest import open_store

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    spec = LossSpec(alpha=alpha, temperature=temperature, chunk_size=32)
    return StudentLoss(model, open_store(store).meta.vocab_size, spec)


def test_accumulation_over_4_micro_batches_equals_one_batch(tiny_student, topk_store):
    from kdpipe.pipeline.train.distributed import Dist
    from kdpipe.pipeline.train.trainer import forward_backward
    from kdpipe.storage.batch import collate

    recs = _records(topk_store, 8)
    cfg = base_cfg(tiny_student, topk_store, "unused")
    dist = Dist(0, 1, 0, torch.device("cpu"), None)
    module = _loss_module(tiny_student, topk_store)

    def grads(groups):
        module.zero_grad(set_to_none=True)
        sums, n = forward_backward(module, [collate(g, pad_id=0) for g in groups], dist, cfg, with_teacher=True)
        return sums, n, [p.grad.clone() for p in module.parameters()]

    # Uneven micro-batches (1, 2, 2, 3 sequences): a mean of per-micro-batch means would differ.
    s4, n4, g4 = grads([recs[:1], recs[1:3], recs[3:5], recs[5:]])
    s1, n1, g1 = grads([recs])
    assert n4 == n1 > 0
    torch.testing.assert_close(s4, s1, rtol=1e-6, atol=1e-6)
    for a, b in zip(g4, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_alpha_one_equals_the_models_own_cross_entropy(tiny_student, topk_store):
    """α = 1 through the real student: the chunked CE on pred_index equals HF's loss with labels."""
    from transformers import AutoModelForCausalLM

    from kdpipe.storage.batch import collate

    b = collate(_records(topk_store, 5), pad_id=0)
    module = _loss_module(tiny_student, topk_store, alpha=1.0)
    parts = module(b.input_ids, b.attention_mask, b.pred_index, b.target_ids, b.teacher_ids, b.teacher_logprobs, b.teacher_tail)
    labels = torch.full_like(b.input_ids, -100)
    labels.view(-1)[b.pred_index + 1] = b.target_ids  # HF shifts labels by one itself
    hf = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    want = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
    torch.testing.assert_close(parts["loss"] / b.num_targets, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["kd"], torch.zeros(()))


# ------------------------------------------------------------------------------- outputs


def test_run_outputs(reference_run):
    cfg, out = reference_run
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6]
    for m in ms:
        assert set(m) >= {"step", "loss", "loss_ce", "loss_kd", "tokens_per_s", "lr", "grad_norm", "step_s", "data_wait_s"}
        assert 0 <= m["data_wait_s"] <= m["step_s"]
        assert m["loss"] == pytest.approx(0.5 * m["loss_ce"] + 0.5 * m["loss_kd"], rel=1e-6)
    assert ms[-1]["loss"] < ms[0]["loss"]
    for step in (2, 4, 6):
        ck = out / f"checkpoint-{step}"
        for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt",
                     "rng-rank0.pt", "data-rank0.json", "train_state.json", "train_config.toml"):
            assert (ck / name).exists(), ck / name
        torch.load(ck / "optimizer.pt", weights_only=True)
    assert not list(out.glob("*.tmp"))
    from kdpipe.pipeline.config import load_config

    # the run records what ran: "auto" loss settings resolved for this device (issue 22)
    assert load_config(TrainConfig, out / "final" / "train_config.toml") == cfg.with_loss_defaults("cpu")


def test_saved_student_loads_with_transformers(reference_run, padded_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = reference_run
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    before = AutoModelForCausalLM.from_pretrained(padded_student)
    assert model.get_output_embeddings().weight.shape[0] == 576  # padded rows kept
    w, w0 = model.get_output_embeddings().weight, before.get_output_embeddings().weight
    assert not torch.equal(w[:512], w0[:512])
    assert torch.equal(w[512:], w0[512:])  # sliced off: no logits, no gradient (weight decay 0)
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("The city council", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


# ------------------------------------------------------------------------------- distributed


def _torchrun(args, cwd, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(29500 + os.getpid() % 1000),
           "-m", "kdpipe.pipeline.cli", "train-student", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_run_matches_one_process(reference_run, tmp_path, mode):
    """2 ranks × 1 micro-batch = 1 rank × 2 micro-batches: same records, same global normalization."""
    cfg, ref = reference_run
    toml = write_toml(tmp_path / "cfg.toml", cfg)
    out = tmp_path / mode
    extra = ["--fsdp"] if mode == "fsdp" else []
    _torchrun(["--config", str(toml), "--out", str(out), "--grad-accum", "1", *extra], tmp_path)
    got, want = losses(out), losses(ref)
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-7)
    from safetensors.torch import load_file

    a, b = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- interruption


def _cli(args, **kw):
    return subprocess.Popen([str(VENV_BIN / "kdpipe"), "train-student", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the condition: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_kill_then_resume_reproduces_the_uninterrupted_losses(reference_run, tmp_path):
    cfg, ref = reference_run
    toml = write_toml(tmp_path / "cfg.toml", cfg)
    out = tmp_path / "killed"
    p = _cli(["--config", str(toml), "--out", str(out)])
    _wait_for(lambda: (out / "checkpoint-2").exists() and (out / "metrics.jsonl").exists()
              and len(metrics(out)) >= 3, p)
    p.kill()  # SIGKILL: no chance to clean up
    p.wait()
    assert not (out / "final").exists()
    from kdpipe.pipeline.train.trainer import train

    with pytest.raises(ConfigError, match="--resume"):  # an existing run is not overwritten
        train(TrainConfig(**{**cfg.__dict__, "out": str(out)}))
    q = subprocess.run([str(VENV_BIN / "kdpipe"), "train-student", "--config", str(toml), "--out", str(out), "--resume"],
                       capture_output=True, text=True)
    assert q.returncode == 0, q.stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert losses(out) == losses(ref)  # on CPU: exactly equal, step for step


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(reference_run, tmp_path):
    cfg, _ = reference_run
    toml = write_toml(tmp_path / "cfg.toml", cfg)
    out = tmp_path / "term"
    p = _cli(["--config", str(toml), "--out", str(out), "--save-every", "0", "--steps", "500"])  # still running at the signal
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 1, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    assert "interrupted at step" in stdout
    step = metrics(out)[-1]["step"]
    assert step < 500
    # The checkpoint of the last logged step, complete (resume itself: the SIGKILL test above).
    ck = out / f"checkpoint-{step}"
    assert ck.is_dir() and not (out / "final").exists() and not list(out.glob("*.tmp"))
    assert json.loads((ck / "train_state.json").read_text())["step"] == step
    assert (ck / "data-rank0.json").exists() and (ck / "model.safetensors").exists()


# ------------------------------------------------------------------------------- other modes


def test_sampled_store_trains_with_forward_kl(tiny_student, sampled_store, tmp_path):
    from kdpipe.pipeline.train.trainer import train

    r = train(base_cfg(tiny_student, sampled_store, tmp_path / "run", steps=2, save_every=0, temperature=1.0,
                       grad_accum=1))
    ms = metrics(r.run)
    assert len(ms) == 2 and all(m["loss_kd"] > 0 for m in ms)


def test_lora_run_saves_a_merged_student(tiny_student, topk_store, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdpipe.pipeline.train.trainer import train

    r = train(base_cfg(tiny_student, topk_store, tmp_path / "run", steps=2, save_every=1, lora=True, lora_r=4,
                       grad_accum=1, grad_checkpointing=True))
    assert (r.run / "checkpoint-1" / "adapter_config.json").exists()  # resume needs only the adapter
    assert not (r.final / "adapter_config.json").exists()
    m = AutoModelForCausalLM.from_pretrained(r.final)
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_other_tokenizer_refused_for_logits_and_sequence_level_with_alpha_one(topk_store, tmp_path):
    from kdpipe.pipeline.tiny import TinyModelConfig, build_tiny
    from kdpipe.pipeline.train.trainer import train

    other = build_tiny(tmp_path / "other", ["A completely different corpus of words for another tokenizer. "] * 4,
                       TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, seed=2))
    with pytest.raises(ConfigError, match=r"--alpha 1.0"):
        train(base_cfg(other, topk_store, tmp_path / "a", steps=1))
    r = train(base_cfg(other, topk_store, tmp_path / "b", steps=2, alpha=1.0, save_every=0, grad_accum=1))
    ms = metrics(r.run)
    assert len(ms) == 2 and all(m["loss_kd"] == 0 and m["loss_ce"] > 0 for m in ms)


def test_short_context_refused_or_truncated_and_counted(topk_store, tiny_teacher, tmp_path):
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model
    from kdpipe.pipeline.train.trainer import train

    short = tmp_path / "short"
    build_model(short, tiny_teacher, TinyModelConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=20, seed=1))
    with pytest.raises(ConfigError, match="--truncate"):
        train(base_cfg(short, topk_store, tmp_path / "a", steps=1))
    r = train(base_cfg(short, topk_store, tmp_path / "b", steps=2, truncate=True, save_every=0))
    assert metrics(r.run)[-1]["truncated"] > 0


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,match", [
    ("alpha", 1.5, "alpha: 1.5 is outside"),
    ("alpha", -0.1, "alpha"),
    ("temperature", 0.0, "temperature: 0.0 must be > 0"),
    ("temperature", -1.0, "temperature"),
    ("jsd_beta", 1.0, "jsd_beta"),
    ("store_weights", (1.0, 2.0), "store_weights"),
])
def test_bad_config_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(student="s", stores=("x",), out="o", **{field: value})


def test_bad_config_from_cli_is_a_clean_error(tmp_path):
    p = subprocess.run([str(VENV_BIN / "kdpipe"), "train-student", "--student", "s", "--store", "x", "--out",
                        str(tmp_path), "--alpha", "2"], capture_output=True, text=True)
    assert p.returncode != 0 and "alpha: 2.0 is outside [0, 1]" in p.stderr and "Traceback" not in p.stderr


def test_store_not_finalized(tiny_teacher, tiny_student, tmp_path):
    from kdpipe.pipeline.train.trainer import train

    store = build_store(tiny_teacher, tmp_path / "store", n_seqs=2, finalize=False)
    with pytest.raises(StoreError, match="not finalized"):
        train(base_cfg(tiny_student, store, tmp_path / "run"))


def test_empty_store(tiny_teacher, tiny_student, tmp_path):
    from kdpipe.pipeline.train.trainer import train

    # finalize_store refuses to write an empty store; a manifest listing no shard stands for one
    # (e.g. written by another tool): the cache key covers the metadata, so it still opens that far.
    store = build_store(tiny_teacher, tmp_path / "store", n_seqs=1)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"] = []
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="empty"):
        train(base_cfg(tiny_student, store, tmp_path / "run"))


@pytest.mark.parametrize("divergence", ["reverse_kl", "generalized_jsd", "total_variation"])
def test_divergence_the_sampled_codec_cannot_support(tiny_student, sampled_store, tmp_path, divergence):
    from kdpipe.pipeline.train.trainer import train

    with pytest.raises(ConfigError, match="cannot be computed from a 'sampled' store"):
        train(base_cfg(tiny_student, sampled_store, tmp_path / "run", divergence=divergence, temperature=1.0))


def test_resume_with_other_settings_is_refused(reference_run, tmp_path):
    import shutil

    from kdpipe.pipeline.train.trainer import train

    cfg, ref = reference_run
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    with pytest.raises(ConfigError, match="alpha"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(out), "alpha": 0.9, "resume": True}))


def test_resume_from_a_checkpoint_older_than_a_new_field(reference_run, tmp_path):
    """A TrainConfig field added after a checkpoint was written is missing from its train_config.toml:
    resuming at that field's default continues the run, a non-default value is still a refused change."""
    import re
    import shutil

    from kdpipe.pipeline.train.checkpoint import latest_checkpoint
    from kdpipe.pipeline.train.trainer import train

    cfg, ref = reference_run
    out = tmp_path / "old"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "final")
    ckpt = latest_checkpoint(out)
    saved = ckpt / "train_config.toml"
    text = saved.read_text()
    assert re.search(r"(?m)^jsd_beta = ", text)
    text = text.replace(str(ref), str(out))  # the copy is its own run (out is part of the settings)
    saved.write_text(re.sub(r"(?m)^jsd_beta = .*\n", "", text))  # as if jsd_beta did not exist yet
    with pytest.raises(ConfigError, match="jsd_beta"):
        train(TrainConfig(**{**cfg.__dict__, "out": str(out), "jsd_beta": 0.25, "resume": True}))
    result = train(TrainConfig(**{**cfg.__dict__, "out": str(out), "resume": True}))
    assert result.steps == cfg.steps and result.final is not None


def test_resume_a_run_written_with_the_old_loss_defaults_on_cuda_defaults(reference_run, tmp_path):
    """Issue 22: loss_backward / loss_chunk_size resolve per device (CUDA: in_forward, 4096; CPU: in_forward, 1024).
    A run written with the old defaults (recompute, 1024), or before the fields existed, resumes with the new
    ones: the same loss computed another way, so the losses continue the uninterrupted run's."""
    import re
    import shutil

    from kdpipe.pipeline.config import read_toml
    from kdpipe.pipeline.train.checkpoint import latest_checkpoint
    from kdpipe.pipeline.train.trainer import train

    cfg, ref = reference_run
    assert (cfg.loss_backward, cfg.loss_chunk_size) == ("auto", 0)
    assert (read_toml(ref / "train_config.toml")["loss_backward"], read_toml(ref / "train_config.toml")["loss_chunk_size"]) \
        == ("in_forward", 1024)  # resolved on CPU and written
    for drop in (False, True):
        out = tmp_path / f"old{int(drop)}"
        shutil.copytree(ref, out)
        shutil.rmtree(out / "final")
        ckpt = latest_checkpoint(out)
        for f in out.rglob("train_config.toml"):
            text = f.read_text().replace(str(ref), str(out))
            if drop:  # written before the two fields existed
                text = re.sub(r"(?m)^loss_(backward|chunk_size) = .*\n", "", text)
            else:  # written with the old defaults
                text = re.sub(r"(?m)^loss_backward = .*$", 'loss_backward = "recompute"', text)
                assert re.search(r"(?m)^loss_chunk_size = 1024$", text)
            f.write_text(text)
        with open(out / "metrics.jsonl") as fh:
            kept = [line for line in fh if json.loads(line)["step"] <= int(ckpt.name.rsplit("-", 1)[1])]
        (out / "metrics.jsonl").write_text("".join(kept))
        new = TrainConfig(**{**cfg.__dict__, "out": str(out), "resume": True, "loss_backward": "in_forward",
                             "loss_chunk_size": 4096})  # what "auto" resolves to on CUDA
        result = train(new)
        assert result.steps == cfg.steps
        saved = read_toml(out / "train_config.toml")
        assert (saved["loss_backward"], saved["loss_chunk_size"]) == ("in_forward", 4096)
        for got, want in zip(losses(out), losses(ref)):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_errors_are_kdpipe_errors():
    assert issubclass(ConfigError, KdpipeError) and issubclass(StoreError, KdpipeError)


# ------------------------------------------------------------------------------- disk full at a checkpoint

@pytest.mark.parametrize("failure", ["enospc", "torch_zip_writer"])
def test_disk_full_while_writing_a_checkpoint_is_a_clear_error(tiny_student, topk_store, tmp_path, monkeypatch, failure):
    """Finding 10: a failed write inside save_checkpoint -> KdpipeError naming checkpoint-STEP.tmp, saying
    to free space and --resume; the partial .tmp is removed, the previous checkpoint stays whole.
    (The real RLIMIT_FSIZE run: tests/faults/test_fault_pipeline.py::test_disk_full_while_writing_a_checkpoint.)"""
    import errno

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kdpipe.pipeline.train.checkpoint as ck
    from kdpipe.pipeline.train.distributed import Dist

    run = tmp_path / "run"
    run.mkdir()
    cfg = base_cfg(tiny_student, topk_store, run)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)

    def save(step):
        return ck.save_checkpoint(run, step, model, model, tok, opt, sched, {"cursor": step}, {}, cfg, dist)

    save(2)
    before = {p.name: p.read_bytes() for p in (run / "checkpoint-2").iterdir() if p.is_file()}
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04partial")  # what a write cut short leaves
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 197824 vs 197716")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(KdpipeError) as ei:
        save(4)
    msg = str(ei.value)
    assert str(run / "checkpoint-4.tmp") in msg and "free space" in msg and "--resume" in msg, msg
    assert str(run / "checkpoint-2") in msg, msg  # where the resume continues from
    assert not (run / "checkpoint-4.tmp").exists() and not (run / "checkpoint-4").exists()
    assert {p.name: p.read_bytes() for p in (run / "checkpoint-2").iterdir() if p.is_file()} == before
    assert ck.latest_checkpoint(run) == run / "checkpoint-2"

    # not a write failure (a bug, a collective error): propagates unchanged
    def bug(obj, f, *a, **k):
        raise RuntimeError("something else broke")

    monkeypatch.setattr(ck.torch, "save", bug)
    with pytest.raises(RuntimeError, match="something else broke"):
        save(6)


# ------------------------------------------------------------------------------- paths and --resume (issue 23)

def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"warmup_steps: 50 is more than steps = 10"):
        TrainConfig(student="s", stores=("x",), out="o", steps=10, warmup_steps=50)
    TrainConfig(student="s", stores=("x",), out="o", steps=10, warmup_steps=10)  # the whole run warming up is allowed


def test_resume_with_the_same_store_spelled_otherwise_or_from_elsewhere(tiny_student, topk_store, tmp_path, monkeypatch):
    """`--store store1` then `--store ./store1 --resume`, or a resume from another directory with absolute
    paths: the same run. The config is written with absolute paths."""
    import shutil

    from kdpipe.pipeline.config import read_toml
    from kdpipe.pipeline.train.trainer import train

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(topk_store, work / "store1")
    monkeypatch.chdir(work)
    first = train(base_cfg(tiny_student, "store1", "run", steps=4, save_every=2))
    assert first.steps == 4
    saved = read_toml(work / "run" / "checkpoint-4" / "train_config.toml")
    assert saved["stores"] == [str(work / "store1")] and saved["out"] == str(work / "run")
    again = train(base_cfg(tiny_student, "./store1", "./run", steps=6, save_every=2, resume=True))
    assert again.steps == 6
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    third = train(base_cfg(tiny_student, work / "store1", work / "run", steps=8, save_every=2, resume=True))
    assert third.steps == 8


def test_resume_of_an_old_run_that_wrote_relative_paths(reference_run, tmp_path, monkeypatch):
    """Checkpoints written before paths were made absolute hold them as given: resumable from the same directory."""
    import shutil

    from kdpipe.pipeline.train.checkpoint import latest_checkpoint
    from kdpipe.pipeline.train.trainer import train

    cfg, ref = reference_run
    shutil.copytree(ref, tmp_path / "old")
    shutil.copytree(cfg.stores[0], tmp_path / "store1")
    shutil.rmtree(tmp_path / "old" / "final")
    ckpt = latest_checkpoint(tmp_path / "old")
    for f in (ckpt / "train_config.toml", ckpt / "data-rank0.json"):  # as an older kdpipe wrote them
        f.write_text(f.read_text().replace(str(ref), "old").replace(cfg.stores[0], "store1"))
    monkeypatch.chdir(tmp_path)
    result = train(TrainConfig(**{**cfg.__dict__, "stores": ("./store1",), "out": "old", "resume": True}))
    assert result.steps == cfg.steps and result.final is not None


def test_resume_into_a_folder_that_does_not_exist_is_refused(tmp_path):
    from kdpipe.pipeline.train.trainer import train

    (tmp_path / "run-a05").mkdir()
    (tmp_path / "store").mkdir()
    with pytest.raises(ConfigError, match=r"--resume: out .*run-a5 does not exist.*did you mean .*run-a05\?") as ei:
        train(TrainConfig(student="s", stores=(str(tmp_path / "store"),), out=str(tmp_path / "run-a5"), resume=True))
    assert not (tmp_path / "run-a5").exists()
    assert "drop --resume" in str(ei.value)
