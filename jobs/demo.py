"""`kdpipe demo`: the whole pipeline on CPU in minutes, on real text shipped with kdpipe.

The corpus is Debian's package descriptions (document = long description, summary = the
maintainer's one-line synopsis; pipeline/data/DEBIAN.md), short documents only. The design is the
quality benchmark's (benchmarks/bench_quality.py) at a smaller scale, the way distillation is
used: a teacher that has seen far more data than the distillation does.

1. A tokenizer on the training split; a teacher (4x128) and a smaller student (2x64) from configs.
2. The teacher trains (plain CE) on ALL short training pairs: summarize prompt -> human synopsis.
3. The students see only a small transfer set (a seeded subset of the training documents), all
   from the same initialization and for the same steps:
   - sft_ref: CE on the transfer set's human synopses (a `score` store: the teacher scores the
     references, alpha = 1 ignores its log-probs). The "just fine-tune" baseline.
   - seqkd:   CE on the teacher's own summaries of the transfer set (alpha = 1): sequence-level KD.
   - kd:      the same store with logit distillation (alpha < 1).
4. Teacher and students are evaluated together on held-out documents; the headline table follows.

Phases one and two run as two job files (OUT/demo-job.toml, OUT/demo-ref-job.toml, the schema of
jobs/examples/demo.toml) through the jobs layer's local runner, and the evaluation as a
`kdpipe evaluate` child process, each with its output in a log file: the terminal shows one line
per stage (`-v` shows everything). The figures of one demo run are one noisy sample;
benchmarks/bench_quality.py (5 seeds, CIs, NLL, calibration) is the measured claim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Literal


# Several trainers and engines share the demo's 2 cores: busy-waiting OpenMP threads then burn the
# time slices of the thread they wait for (measured here: 9.6 s vs 1.1 s per teacher step under
# load). Must be set before torch is imported; child processes (the job steps) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# vLLM's CPU backend otherwise reserves a fraction of ALL memory and refuses to start when other
# processes hold some; the tiny models need a 1 GiB KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from kdpipe.pipeline.config import atomic_write_text, write_resolved
from kdpipe.pipeline.console import shown_path
from kdpipe.pipeline.lm_train import train_teacher
from kdpipe.storage.errors import ConfigError, DataError

# Step counts, transfer-set and evaluation sizes per budget; "small" is for CI.
# The teacher's steps are most of the budget: below ~1,000 steps it emits synopsis templates ("GNU R package
# for the C++ library") that students copy from a few hundred examples; from there it starts to use the
# document's own words (measured: held-out ROUGE-L 0.147 after 350 steps, 0.197 after 350 + 650).
BUDGETS = {
    "small": {"teacher_steps": 1000, "student_steps": 100, "transfer_docs": 300, "eval_samples": 48},
    "default": {"teacher_steps": 1000, "student_steps": 150, "transfer_docs": 400, "eval_samples": 64},
    "large": {"teacher_steps": 2500, "student_steps": 400, "transfer_docs": 800, "eval_samples": 200},
}
STUDENTS = ("sft_ref", "seqkd", "kd")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; everything else is fixed so a run finishes in minutes on 2 cores."""

    out: str = "demo-output"
    budget: Literal["small", "default", "large"] = "default"
    seed: int = 0
    data: str | None = None  # None = the shipped Debian corpus; else a JSONL with id, document, summary, split
    max_doc_chars: int = 200  # short documents only: a tiny model's summaries of them are learnable in minutes
    teacher_steps: int | None = None  # None = the budget's
    student_steps: int | None = None
    transfer_docs: int | None = None  # the students' transfer set (documents)
    eval_samples: int | None = None  # held-out documents evaluated
    # Model sizes: the teacher is 2x wider and 2x deeper than the student; head_dim stays 32 (vLLM CPU kernels).
    vocab_size: int = 2048  # one tokenizer for teacher and students (logit KD on one vocabulary)
    teacher_hidden: int = 128
    teacher_layers: int = 4
    student_hidden: int = 64
    student_layers: int = 2
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    batch_size: int = 32  # teacher training (documents per step)
    # CE weight of the prompt's tokens in the teacher's training: a model trained from scratch learns its
    # language from the documents too (validation answer NLL 3.94 at 1.0 vs 4.38 at 0; benchmarks/qualitylib.py)
    teacher_doc_loss_weight: float = 1.0
    alpha: float = 0.5  # kd student's CE weight; sft_ref and seqkd use 1.0
    temperature: float = 1.0
    top_k: int = 16
    max_new_tokens: int = 24  # a synopsis is ~10 tokens

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget: {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        for k in ("teacher_steps", "student_steps", "transfer_docs", "eval_samples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"{k}: must be >= 1 (or unset for the budget's {BUDGETS[self.budget][k]})")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"alpha: {self.alpha}; the kd student needs alpha < 1 (sft_ref and seqkd are alpha = 1)")
        if self.max_doc_chars < 32:
            raise ConfigError(f"max_doc_chars: {self.max_doc_chars}; must be >= 32")
        if self.teacher_doc_loss_weight < 0:
            raise ConfigError(f"teacher_doc_loss_weight: {self.teacher_doc_loss_weight}; must be >= 0 (0 = answer tokens only)")
        for k in ("teacher_hidden", "student_hidden"):
            if getattr(self, k) % 32:
                raise ConfigError(f"{k}: {getattr(self, k)} must be a multiple of 32 (head_dim 32 for vLLM's CPU kernels)")
        if self.student_layers * self.student_hidden >= self.teacher_layers * self.teacher_hidden:
            raise ConfigError("the teacher must be larger than the student: raise teacher_layers/teacher_hidden")

    def steps(self, key: str) -> int:
        v = getattr(self, key)
        return BUDGETS[self.budget][key] if v is None else v


# ---------------------------------------------------------------------------------------- data
def corpus_path(cfg: DemoConfig) -> Path:
    """The corpus file: `data`, or the shipped Debian corpus."""
    if cfg.data:
        return Path(cfg.data)
    from kdpipe.pipeline.data.build_debian_corpus import shipped_path

    return shipped_path()


def read_corpus(path: Path, max_doc_chars: int | None = None) -> list[dict]:
    """Rows with id, document, summary, split; .jsonl.gz or .jsonl; documents over max_doc_chars dropped."""
    from kdpipe.pipeline.data.build_debian_corpus import load_corpus

    if not path.is_file():
        raise DataError(f"{path}: demo corpus not found; build it with `python -m kdpipe.pipeline.data.build_debian_corpus`")
    if path.name.endswith(".gz"):
        return load_corpus(max_doc_chars=max_doc_chars, path=path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, r in enumerate(rows):
        for f in ("id", "split", "document", "summary"):
            if f not in r:
                raise DataError(f"{path}: line {i + 1} has no field '{f}'")
    return [r for r in rows if max_doc_chars is None or len(r["document"]) <= max_doc_chars]


def _ranked(rows: list[dict], seed: int, salt: str) -> list[dict]:
    """A seeded order that does not depend on the input order (a stable hash of each id)."""
    return sorted(rows, key=lambda r: hashlib.sha256(f"{salt}:{seed}:{r['id']}".encode()).digest())


def split_rows(cfg: DemoConfig, rows: list[dict]) -> dict[str, list[dict]]:
    """train (the teacher's), transfer (a seeded subset of train: the students'), heldout (evaluation)."""
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    if not train or not held:
        raise DataError(f"{corpus_path(cfg)}: needs rows with split 'train' and 'heldout' "
                        f"(documents <= max_doc_chars={cfg.max_doc_chars})")
    n = cfg.steps("transfer_docs")
    if n > len(train) // 2:
        raise ConfigError(f"transfer_docs: {n} of {len(train)} training documents; the transfer set must be a "
                          "small share of the teacher's data: lower transfer_docs")
    transfer = sorted(_ranked(train, cfg.seed, "transfer")[:n], key=lambda r: r["id"])
    heldout = _ranked(held, cfg.seed, "heldout")[: cfg.steps("eval_samples")]
    return {"train": train, "transfer": transfer, "heldout": heldout}


# ---------------------------------------------------------------------------------------- models
def build_models(cfg: DemoConfig, rows: list[dict], out: Path) -> tuple[Path, Path]:
    """Tokenizer trained on `rows`; teacher and student initialized from configs (seeded)."""
    from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE
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


def _student(cfg: DemoConfig, name: str, alpha: float, student: Path) -> dict[str, Any]:
    steps = cfg.steps("student_steps")
    return {
        "name": name, "model": str(student), "alpha": alpha, "temperature": cfg.temperature,
        "divergence": "forward_kl",
        "optimizer": {"name": "adamw", "lr": cfg.student_lr, "warmup_steps": max(1, steps // 20), "weight_decay": 0.0},
        "steps": steps, "tokens_per_batch": 2048, "seed": cfg.seed, "save_every": 0, "nodes": 1, "gpus": 0,
    }


def _teacher_section(teacher: Path) -> dict[str, Any]:
    return {"model": str(teacher), "dtype": "float32", "max_model_len": 512, "enforce_eager": True}


def demo_job(cfg: DemoConfig, out: Path, teacher: Path, student: Path, transfer_jsonl: Path) -> dict[str, Any]:
    """The main job file (the schema of jobs/examples/demo.toml): the teacher summarizes the transfer
    set into a top-k store; seqkd (alpha 1) and kd (alpha < 1) train on it."""
    return {
        "name": "demo",
        "run_dir": str(out / "job"),
        "teacher": _teacher_section(teacher),
        "data": {"dataset": str(transfer_jsonl), "split": "train", "text_field": "document", "id_field": "id"},
        "generation": {
            "recipe": "summarize", "codec": "topk", "k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens,
            "num_tasks": 1, "store": str(out / "store"), "seed": cfg.seed,
        },
        "students": [_student(cfg, "kd", cfg.alpha, student), _student(cfg, "seqkd", 1.0, student)],
    }


def reference_job(cfg: DemoConfig, out: Path, teacher: Path, student: Path, transfer_jsonl: Path) -> dict[str, Any]:
    """The baseline's job file: the transfer set's human synopses, teacher-forced (`score` recipe),
    so sft_ref trains with the same trainer, tokens and steps as the students it is compared with."""
    return {
        "name": "demo-ref",
        "run_dir": str(out / "job-ref"),
        "teacher": _teacher_section(teacher),
        "data": {"dataset": str(transfer_jsonl), "split": "train", "text_field": "document", "id_field": "id",
                 "target_field": "summary"},
        "generation": {"recipe": "score", "codec": "topk", "k": cfg.top_k, "num_tasks": 1,
                       "store": str(out / "store-ref"), "seed": cfg.seed},
        "students": [_student(cfg, "sft_ref", 1.0, student)],
    }


def _run_job(out: Path, job: dict, file_name: str, stream: bool, line: Callable[[str], None]) -> dict[str, Path]:
    """A job file through the jobs layer's local runner; every step's output in RUN_DIR/logs."""
    import tomli_w

    from kdpipe.jobs.local import run_plan
    from kdpipe.jobs.plan import make_plan
    from kdpipe.jobs.spec import load_job

    job_file = out / file_name
    atomic_write_text(job_file, tomli_w.dumps(job))
    plan = make_plan(load_job(job_file))
    run_plan(plan, stream=stream, echo=lambda s: line("    " + s),
             announce=None if stream else lambda label, log: line(f"    ..  {label}  (log: {shown_path(log)})", transient=True))
    return {r.name: Path(plan.run_dir_of(r)) for r in plan.runs}


# ---------------------------------------------------------------------------------------- terminal
class _Terminal:
    """Quiet by default: one line per stage (a transient line or bar while it runs); verbose shows all.

    In quiet mode the demo's own in-process noise (library warnings, Hugging Face progress bars)
    goes to OUT/logs/demo.log, like every step's engine output goes to its own log.
    """

    def __init__(self, verbose: bool, echo: Callable[[str], None], log_file: Path) -> None:
        self.verbose, self.echo = verbose, echo
        self.tty = sys.stderr.isatty() and not verbose
        self.pending = False
        self.log_file = log_file

    def line(self, text: str, transient: bool = False) -> None:
        if self.tty and self.pending:
            sys.stderr.write("\r\033[K")
            self.pending = False
        if transient:
            if self.tty:
                try:
                    width = os.get_terminal_size(sys.stderr.fileno()).columns
                except OSError:
                    width = 100
                sys.stderr.write(text[: width - 1])
                sys.stderr.flush()
                self.pending = True
            return
        self.echo(text)

    @contextlib.contextmanager
    def quiet(self):
        """Route in-process warnings and HF logging/progress bars to the demo log (quiet mode only)."""
        if self.verbose:
            yield
            return
        import transformers

        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_file, encoding="utf-8")
        root = logging.getLogger()
        old_level, old_handlers = root.level, list(root.handlers)
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                yield
        finally:
            logging.captureWarnings(False)
            root.handlers, root.level = old_handlers, old_level
            handler.close()
            transformers.utils.logging.enable_progress_bar()
            transformers.utils.logging.disable_propagation()
            transformers.utils.logging.enable_default_handler()


def _teacher_progress(term: _Terminal, steps: int):
    if term.verbose:
        return None
    t0 = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step == steps or step % 10 == 0:
            rate = (time.perf_counter() - t0) / step
            term.line(f"    teacher step {step}/{steps}  loss {loss:.2f}  ~{rate * (steps - step):.0f} s left", transient=True)

    return progress


# ---------------------------------------------------------------------------------------- demo
# The demo's derived outputs, removed when the settings change (never anything else in OUT).
_DERIVED = ("store", "store-ref", "job", "job-ref", "report", "models")


def _models_hash(cfg: DemoConfig, data: dict[str, list[dict]]) -> str:
    """Everything a demo run depends on but its folder: the same hash, the same models, stores and runs."""
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    key.update({k: cfg.steps(k) for k in BUDGETS[cfg.budget]})
    key["train"] = hashlib.sha256("\n".join(sorted(r["id"] for r in data["train"])).encode()).hexdigest()
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _stamp_matches(stamp: Path, models_hash: str, teacher: Path, student: Path) -> bool:
    try:
        ok = json.loads(stamp.read_text())["hash"] == models_hash
    except (OSError, ValueError, KeyError):
        return False
    return ok and (teacher / "model.safetensors").is_file() and (student / "model.safetensors").is_file()


def _clear_derived(out: Path) -> None:
    import shutil

    for name in _DERIVED:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, verbose: bool = False) -> dict[str, Any]:
    """The whole pipeline; returns the evaluation report (also written under OUT/report)."""
    from kdpipe.jobs.local import run_logged

    t_start = time.perf_counter()
    out = Path(cfg.out).resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / "demo_config.toml").is_file():
        raise ConfigError(f"out: {out} exists and is not a demo output folder (no demo_config.toml); "
                          "pass an empty or new folder with --out")
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out / "demo_config.toml")
    term = _Terminal(verbose, log, out / "logs" / "demo.log")
    stage_t = [time.perf_counter()]

    def stage(n: int, text: str) -> None:
        stage_t[0] = time.perf_counter()
        term.line(f"[{n}/5] {text}")

    def done(what: str = "done") -> None:
        term.line(f"    {what} ({time.perf_counter() - stage_t[0]:.0f} s)")

    with term.quiet():
        rows = read_corpus(corpus_path(cfg), cfg.max_doc_chars)
        data = split_rows(cfg, rows)
        data_dir = out / "data"
        data_dir.mkdir(exist_ok=True)
        paths = {k: data_dir / f"{k}.jsonl" for k in data}
        for k, p in paths.items():
            atomic_write_text(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data[k]))
        n_train, n_transfer = len(data["train"]), len(data["transfer"])
        log(f"kdpipe demo: {corpus_path(cfg).name}, documents <= {cfg.max_doc_chars} characters: "
            f"{n_train} training pairs (teacher), {n_transfer} of them the transfer set (students), "
            f"{len(data['heldout'])} held-out documents; logs under {shown_path(out)}/")

        # A rerun with the same settings reuses the models (and through the stores' cache keys, the
        # stores and finished runs); other settings mean another teacher or other runs, so whatever
        # was derived from the old ones is removed first (a store refuses a new teacher).
        models_hash = _models_hash(cfg, data)
        stamp = out / "models" / "demo-models.json"
        t_steps = cfg.steps("teacher_steps")
        teacher = out / "models" / "teacher"
        student = out / "models" / "student-init"
        if _stamp_matches(stamp, models_hash, teacher, student):
            stage(1, "models: the same settings as the last run in this folder, reused")
            stage(2, f"teacher: reused ({teacher})")
        else:
            _clear_derived(out)
            stage(1, f"tokenizer ({cfg.vocab_size}), teacher {cfg.teacher_layers}x{cfg.teacher_hidden} and "
                     f"student {cfg.student_layers}x{cfg.student_hidden} initialized")
            teacher_init, student = build_models(cfg, data["train"], out)
            stage(2, f"teacher: CE on all {n_train} training pairs, {t_steps} steps of {cfg.batch_size}")
            teacher = train_teacher(teacher_init, teacher, data["train"], t_steps, cfg.teacher_lr,
                                    cfg.batch_size, cfg.seed, log if verbose else (lambda s: None),
                                    progress=_teacher_progress(term, t_steps), doc_loss_weight=cfg.teacher_doc_loss_weight)
            atomic_write_text(stamp, json.dumps({"hash": models_hash}) + "\n")
            done()

        s_steps = cfg.steps("student_steps")
        stage(3, f"phase one + two: the teacher summarizes the {n_transfer} transfer documents into a top-{cfg.top_k} "
                 f"store; students kd (alpha {cfg.alpha}) and seqkd (alpha 1), {s_steps} steps each")
        runs = _run_job(out, demo_job(cfg, out, teacher, student, paths["transfer"]), "demo-job.toml", verbose, term.line)
        stage(4, f"baseline: the transfer set's human synopses teacher-forced into a store; student sft_ref, {s_steps} steps")
        runs.update(_run_job(out, reference_job(cfg, out, teacher, student, paths["transfer"]), "demo-ref-job.toml",
                             verbose, term.line))

        stage(5, f"evaluation: teacher and the 3 students on {len(data['heldout'])} held-out documents (vLLM)")
        from kdpipe.pipeline.evaluate.config import EvalConfig

        eval_cfg = EvalConfig(
            models=(str(teacher), *(str(runs[s]) for s in STUDENTS)), names=("teacher", *STUDENTS),
            data=str(paths["heldout"]), out=str(out / "report"), split="", baseline="sft_ref",
            text_field="document", target_field="summary",  # the corpus' fields (evaluate's default is "text")
            stores=(str(out / "store"), str(out / "store-ref")), max_new_tokens=cfg.max_new_tokens,
            max_model_len=512, seed=cfg.seed,
            # Timing every prompt alone costs more than the rest of the evaluation; a sample suffices.
            latency_requests=min(24, cfg.steps("eval_samples")),
        )
        eval_toml = out / "eval_config.toml"
        write_resolved(eval_cfg, eval_toml)
        eval_log = out / "logs" / "evaluate.log"
        if not verbose:
            term.line(f"    ..  evaluate  (log: {shown_path(eval_log)})", transient=True)
        run_logged([sys.executable, "-m", "kdpipe.pipeline.cli", "evaluate", "--config", str(eval_toml)], eval_log,
                   "evaluate", stream=verbose)
        done()
    report = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    report["demo_seconds"] = time.perf_counter() - t_start
    return report


def what_it_means(report: dict, top_k: int) -> str:
    """One sentence under the table: what the numbers say, and where the measured claim is."""
    models = [m for m in report["models"] if "rougeL" in m["quality"]]
    rouge = {m["name"]: m["quality"]["rougeL"]["mean"] for m in models}
    nll = {m["name"]: m["reference"]["nll_ref"]["mean"] for m in models
           if (m.get("reference") or {}).get("nll_ref", {}).get("mean") is not None}
    t = rouge.get("teacher")
    students = {k: v for k, v in rouge.items() if k != "teacher"}
    if t is None or not students:
        return "See the report; benchmarks/bench_quality.py is the measured claim."
    best = max(students, key=students.get)
    leads = all(v < t for v in students.values())
    verdict = ("the teacher, trained on every training pair, leads every student trained on the small transfer set"
               if leads else "a student reached the teacher's ROUGE-L here, so this run shows no teacher-student gap")
    figures = f"ROUGE-L teacher {t:.3f}, best student {best} {students[best]:.3f}"
    if "teacher" in nll and len(nll) > 1:
        best_nll = min((k for k in nll if k != "teacher"), key=nll.get)
        figures += f"; NLL of the human synopses teacher {nll['teacher']:.2f}, best student {best_nll} {nll[best_nll]:.2f} nats/token"
    return (f"Against the human synopses of {report['data']['num_examples']} held-out Debian packages, {verdict} "
            f"({figures}). sft_ref is plain fine-tuning on the transfer set, seqkd learns the teacher's summaries, kd "
            f"also its top-{top_k} log-probs. One demo run on tiny models is one noisy sample, not a result: "
            "benchmarks/bench_quality.py (5 seeds, paired CIs, held-out NLL and calibration) is the measured claim.")
