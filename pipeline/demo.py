"""`kdpipe demo`: the whole pipeline on CPU in minutes, on the corpus shipped with kdpipe.

1. Build a tokenizer on the shipped corpus, a tiny teacher and a smaller student (kdpipe.pipeline.tiny).
2. Train the teacher briefly with a plain CE loop on the training documents (the prompts phase one uses).
3. Phase one under vLLM: the teacher summarizes the training documents into a top-k store.
4. Phase two twice on that store and the same steps: a KD student (alpha < 1) and a CE-only baseline (alpha = 1).
5. Evaluate teacher, KD student and CE student on the held-out documents; print the headline table.

Steps 3-5 are a job file (jobs/examples/demo.toml filled with this run's paths), run by the
jobs layer's local runner: the demo and a cluster run share one path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import click

# Several trainers and engines share the demo's 2 cores: busy-waiting OpenMP threads then burn the
# time slices of the thread they wait for (measured here: 9.6 s vs 1.1 s per teacher step under
# load). Must be set before torch is imported; child processes (the job steps) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# vLLM's CPU backend otherwise reserves a fraction of ALL memory and refuses to start when other
# processes hold some; the tiny models need a 1 GiB KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from kdpipe.pipeline.config import atomic_write_text, write_resolved
from kdpipe.storage.errors import ConfigError, DataError

# Step counts and evaluation size per budget; "small" is for CI, "large" for the quality benchmark.
BUDGETS = {
    "small": {"teacher_steps": 250, "student_steps": 150, "eval_samples": 24},
    "default": {"teacher_steps": 450, "student_steps": 300, "eval_samples": 80},
    "large": {"teacher_steps": 700, "student_steps": 500, "eval_samples": 80},
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; everything else is fixed so a run finishes in minutes on 2 cores."""

    out: str = "demo-output"
    budget: Literal["small", "default", "large"] = "default"
    seed: int = 0
    data: str | None = None  # None = the corpus shipped with kdpipe (pipeline/data/summarization.jsonl)
    teacher_steps: int | None = None  # None = the budget's
    student_steps: int | None = None
    eval_samples: int | None = None
    # Model sizes: the teacher is 4x wider-deep than the student; head_dim stays 32 (vLLM CPU kernels).
    vocab_size: int = 1024
    teacher_hidden: int = 128
    teacher_layers: int = 4
    student_hidden: int = 64
    student_layers: int = 2
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    batch_size: int = 16
    alpha: float = 0.3  # KD student's CE weight; the baseline uses 1.0
    temperature: float = 1.0
    top_k: int = 16
    max_new_tokens: int = 32
    use_jobs: bool = True  # run phases one, two and evaluation through the jobs layer's local runner

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget: {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        for k in ("teacher_steps", "student_steps", "eval_samples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"{k}: must be >= 1")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"alpha: {self.alpha}; the KD student needs alpha < 1 (the baseline is alpha = 1)")

    def steps(self, key: str) -> int:
        v = getattr(self, key)
        return BUDGETS[self.budget][key] if v is None else v


def corpus_path(cfg: DemoConfig) -> Path:
    if cfg.data:
        return Path(cfg.data)
    return Path(str(resources.files("kdpipe.pipeline").joinpath("data/summarization.jsonl")))


def read_corpus(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: demo corpus not found; regenerate it with `python pipeline/data/make_corpus.py`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, r in enumerate(rows):
        for f in ("id", "split", "document", "summary"):
            if f not in r:
                raise DataError(f"{path}: line {i + 1} has no field '{f}'")
    return rows


# ---------------------------------------------------------------------------------------- models
def build_models(cfg: DemoConfig, rows: list[dict], out: Path) -> tuple[Path, Path]:
    """Tokenizer trained on the corpus; teacher and student initialized from configs (seeded)."""
    from kdpipe.pipeline.generate.config import DEFAULT_SUMMARIZE_TEMPLATE
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model, build_tokenizer

    teacher, student = out / "models" / "teacher-init", out / "models" / "student-init"
    texts = [r["document"] + "\n" + r["summary"] for r in rows] + [DEFAULT_SUMMARIZE_TEMPLATE] * 20
    build_tokenizer(teacher, texts, vocab_size=cfg.vocab_size)
    build_model(teacher, teacher, TinyModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.teacher_hidden, intermediate_size=4 * cfg.teacher_hidden,
        num_hidden_layers=cfg.teacher_layers, num_attention_heads=cfg.teacher_hidden // 32,
        num_key_value_heads=cfg.teacher_hidden // 32, max_position_embeddings=512, seed=cfg.seed,
    ))
    build_model(student, teacher, TinyModelConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.student_hidden, intermediate_size=4 * cfg.student_hidden,
        num_hidden_layers=cfg.student_layers, num_attention_heads=cfg.student_hidden // 32,
        num_key_value_heads=cfg.student_hidden // 32, max_position_embeddings=512, seed=cfg.seed + 1,
    ))
    return teacher, student


def train_teacher(init: Path, out_dir: Path, rows: list[dict], steps: int, lr: float, batch_size: int, seed: int,
                  log=print) -> Path:
    """A plain CE loop on (summarize prompt -> reference summary) pairs: the prompts phase one will send.

    The target is the chat-formatted answer (summary + end-of-turn marker) followed by EOS, so the
    teacher stops by itself under vLLM.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.pipeline.generate.config import DEFAULT_SUMMARIZE_TEMPLATE
    from kdpipe.pipeline.generate.recipes import Prompter

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    prompter = Prompter(tok, True, None)
    pairs = []
    for r in rows:
        user = DEFAULT_SUMMARIZE_TEMPLATE.replace("{text}", r["document"])
        pairs.append((prompter.ids(user), prompter.target_ids(user, r["summary"]) + [tok.eos_token_id]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        # Linear warmup, then linear decay to 5%: short runs need the high learning rate early.
        f = min(1.0, (step + 1) / warmup) * max(0.05, 1.0 - step / steps)
        for g in opt.param_groups:
            g["lr"] = lr * f
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        T = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), T), tok.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(batch), T), -100, dtype=torch.long)  # [B, T]; loss on the answer only
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, (p, t) in enumerate(batch):
            seq = p + t
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(p) : len(seq)] = torch.tensor(t)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  teacher step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------- job
def demo_job(cfg: DemoConfig, out: Path, teacher: Path, student: Path, train_jsonl: Path, eval_jsonl: Path) -> dict[str, Any]:
    """The demo's job file (same schema as jobs/examples/*.toml), with this run's paths filled in."""
    steps = cfg.steps("student_steps")
    common = {
        "model": str(student), "temperature": cfg.temperature, "divergence": "forward_kl",
        "optimizer": {"name": "adamw", "lr": cfg.student_lr, "warmup_steps": max(1, steps // 20), "weight_decay": 0.0},
        "steps": steps, "tokens_per_batch": 2048, "seed": cfg.seed, "save_every": 0, "nodes": 1, "gpus": 0,
    }
    return {
        "name": "demo",
        "run_dir": str(out / "job"),
        "teacher": {"model": str(teacher), "dtype": "float32", "max_model_len": 512, "enforce_eager": True},
        "data": {"dataset": str(train_jsonl), "split": "train", "text_field": "document", "id_field": "id"},
        "generation": {
            "recipe": "summarize", "codec": "topk", "k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens,
            "num_tasks": 1, "store": str(out / "store"), "seed": cfg.seed,
        },
        "students": [
            {"name": "kd", "alpha": cfg.alpha, **common},
            {"name": "ce", "alpha": 1.0, **common},
        ],
    }


def _run_phases_direct(cfg: DemoConfig, out: Path, teacher: Path, student: Path, train_jsonl: Path, log) -> dict[str, Path]:
    """Phases one and two through the library functions (the same configs the job would write)."""
    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import generate_logits
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train
    from kdpipe.storage import finalize_store

    store = out / "store"
    log("phase one: the teacher summarizes the training documents under vLLM")
    generate_logits(GenerateConfig(
        teacher=str(teacher), data=str(train_jsonl), out=str(store), recipe="summarize", split="train",
        text_field="document", id_field="id", dtype="float32", max_model_len=512, enforce_eager=True,
        codec="topk", top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
    ))
    finalize_store(str(store))
    runs = {}
    steps = cfg.steps("student_steps")
    for name, alpha in (("kd", cfg.alpha), ("ce", 1.0)):
        log(f"phase two: student '{name}' (alpha={alpha}, {steps} steps)")
        run = out / "runs" / name
        train(TrainConfig(
            student=str(student), stores=(str(store),), out=str(run), alpha=alpha, temperature=cfg.temperature,
            lr=cfg.student_lr, warmup_steps=max(1, steps // 20), steps=steps, tokens_per_batch=2048,
            seed=cfg.seed, save_every=0, device="cpu",
        ))
        runs[name] = run
    return runs


def _run_phases_jobs(cfg: DemoConfig, out: Path, job: dict, log) -> dict[str, Path]:
    """Phases one and two as a job file, through the jobs layer's local runner."""
    import tomli_w

    from kdpipe.jobs.local import run_plan
    from kdpipe.jobs.plan import make_plan
    from kdpipe.jobs.spec import load_job

    job_file = out / "demo-job.toml"
    atomic_write_text(job_file, tomli_w.dumps(job))
    log(f"job file: {job_file} (run it on a cluster with `kdpipe submit`)")
    plan = make_plan(load_job(job_file))
    run_plan(plan, stream=False, echo=lambda s: log("  " + s))
    return {r.name: Path(plan.run_dir_of(r)) for r in plan.runs}


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    """The whole pipeline; returns the evaluation report (also written under OUT/report)."""
    from kdpipe.pipeline.evaluate import EvalConfig, evaluate

    t_start = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out / "demo_config.toml")
    rows = read_corpus(corpus_path(cfg))
    train_rows = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] != "train"]
    if not train_rows or not held:
        raise DataError(f"{corpus_path(cfg)}: needs rows with split 'train' and held-out rows")
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    train_jsonl, eval_jsonl = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    atomic_write_text(train_jsonl, "".join(json.dumps(r) + "\n" for r in train_rows))
    atomic_write_text(eval_jsonl, "".join(json.dumps(r) + "\n" for r in held))

    log(f"building a tokenizer, a teacher ({cfg.teacher_layers}x{cfg.teacher_hidden}) and a student ({cfg.student_layers}x{cfg.student_hidden})")
    teacher_init, student = build_models(cfg, rows, out)
    log(f"training the teacher on {len(train_rows)} documents ({cfg.steps('teacher_steps')} steps)")
    teacher = train_teacher(teacher_init, out / "models" / "teacher", train_rows, cfg.steps("teacher_steps"),
                            cfg.teacher_lr, cfg.batch_size, cfg.seed, log)

    job = demo_job(cfg, out, teacher, student, train_jsonl, eval_jsonl)
    runs = _run_phases_jobs(cfg, out, job, log) if cfg.use_jobs else _run_phases_direct(cfg, out, teacher, student, train_jsonl, log)

    log("evaluation: teacher, KD student and CE-only baseline on the held-out documents")
    report = evaluate(EvalConfig(
        models=(str(teacher), str(runs["kd"]), str(runs["ce"])), names=("teacher", "kd-student", "ce-student"),
        data=str(eval_jsonl), out=str(out / "report"), split="", baseline="ce-student", stores=(str(out / "store"),),
        max_samples=cfg.steps("eval_samples"), max_new_tokens=cfg.max_new_tokens, max_model_len=512, seed=cfg.seed,
    ))
    report["demo_seconds"] = time.perf_counter() - t_start
    return report


@click.command("demo")
@click.option("--out", default=None, help="Output folder (models, store, runs, report). Default demo-output.")
@click.option("--budget", type=click.Choice(list(BUDGETS)), default=None, help="small (CI, ~5 min), default, large (benchmark).")
@click.option("--seed", type=int, default=None, help="Seed for models, training and generation.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="TOML with DemoConfig keys.")
@click.option("--jobs/--no-jobs", "use_jobs", default=None, help="Run phases through the jobs layer (default) or call them in-process.")
def demo(out, budget, seed, config_path, use_jobs):
    """The whole pipeline on a tiny built-in teacher, on CPU: build, train the teacher, phase one, phase two
    (KD and a CE-only baseline), evaluate on held-out documents."""
    from kdpipe.pipeline.cli import run_command
    from kdpipe.pipeline.config import load_config
    from kdpipe.pipeline.evaluate.report import headline_table

    cfg = run_command(load_config, DemoConfig, config_path, {"out": out, "budget": budget, "seed": seed, "use_jobs": use_jobs})
    report = run_command(run_demo, cfg, lambda s: click.echo(s, err=True))
    click.echo("")
    click.echo(headline_table(report))
    click.echo(f"\nreport: {Path(cfg.out).resolve() / 'report' / 'report.md'}  (demo took {report['demo_seconds']:.0f} s)")
    from kdpipe.pipeline.shutdown import exit_process

    exit_process(0)  # everything is written: exit 0 whatever vLLM's teardown would do (shutdown.py)
