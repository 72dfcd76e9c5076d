"""What the quality benchmarks share: the real corpus, its transfer set, and one cached teacher.

`bench_quality.py` (issue 10 §4), `bench_xtok.py` and `bench_onpolicy.py` all distil the same
teacher on the same Debian package-description corpus, so building and training that teacher is
done here, once, and cached under the benchmark's output folder:

    ROOT/tokenizer/          byte-level BPE trained on the TRAIN split (documents + summaries)
    ROOT/teacher-init/       the teacher's seeded initialization
    ROOT/teacher/            the trained teacher (plain CE on ALL training pairs)
    ROOT/teacher/quality-teacher.json   the config and its hash; a rerun with another hash retrains
    ROOT/students/init-sSEED/  the student initialization of each seed (same architecture for all)
    ROOT/data/{train,validation,heldout,transfer}.jsonl   the splits phase one / evaluate read

Teacher and students share the tokenizer (logit KD on one vocabulary); the teacher is larger in
depth and width. The transfer set is a seeded subset of the training documents (10-20% of them, as
real distillation uses far fewer tokens than the teacher saw).

    from qualitylib import ensure_teacher
    t = ensure_teacher(Path("bench-output/quality"), log=print, teacher_steps=2000)
    t["teacher"], t["tokenizer"], t["student_init"](seed), t["corpus"]["validation"], t["transfer"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pipeline/demo.py: shared cores
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from kdpipe.storage.errors import ConfigError, DataError

SPLITS = ("train", "validation", "heldout")
# The version of pipeline/demo.py's train_teacher loop (2: length-grouped epochs, prompt-token CE): in the
# cache hash, so a teacher trained by an older loop is retrained rather than reused.
TEACHER_LOOP = 2


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """The teacher, the student architecture and the data of the quality benchmarks (defaults only here)."""

    corpus: str | None = None  # None = the shipped Debian corpus; else a JSONL with id/document/summary/split
    max_doc_chars: int = 200  # documents cut at a word boundary: most of a synopsis is in the first sentence
    vocab_size: int = 2048  # one tokenizer for teacher and students
    # Teacher: deeper and wider than the students, trained on every training pair.
    teacher_layers: int = 6
    teacher_hidden: int = 256
    teacher_steps: int = 2200
    teacher_lr: float = 3e-3
    teacher_batch: int = 32
    teacher_seed: int = 0
    # CE weight of the prompt's own tokens (the document). Validation NLL of the answers after 400 steps of
    # a 4x128 teacher (seed 0, 300 validation pairs): 4.376 at weight 0, 4.170 at 0.2, 4.011 at 0.5, 3.941 at 1.
    teacher_doc_loss_weight: float = 1.0
    # Students: one architecture, one initialization per seed.
    student_layers: int = 2
    student_hidden: int = 64
    # Transfer set: a seeded share of the training documents.
    transfer_fraction: float = 0.15
    transfer_max: int | None = 2500  # cap, so the students' phase one stays affordable on CPU
    transfer_seed: int = 0
    max_position_embeddings: int = 512
    # A teacher trained elsewhere (an HF folder with its tokenizer): used as is, never trained or hashed here.
    external_teacher: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.transfer_fraction <= 1.0:
            raise ConfigError(f"transfer_fraction: {self.transfer_fraction} must be in (0, 1], e.g. 0.15")
        if self.transfer_max is not None and self.transfer_max < 1:
            raise ConfigError("transfer_max: must be >= 1 (or None for no cap)")
        if self.teacher_doc_loss_weight < 0:
            raise ConfigError("teacher_doc_loss_weight: must be >= 0 (0 = loss on the answer only)")
        for k in ("teacher_hidden", "student_hidden"):
            if getattr(self, k) % 32:
                raise ConfigError(f"{k}: {getattr(self, k)} must be a multiple of 32 (head_dim 32 for vLLM's CPU kernels)")
        if self.student_layers * self.student_hidden >= self.teacher_layers * self.teacher_hidden:
            raise ConfigError("the teacher must be larger than the students: raise teacher_layers/teacher_hidden")
        if self.max_doc_chars < 32:
            raise ConfigError("max_doc_chars: must be >= 32")

    def teacher_part(self) -> dict[str, Any]:
        """What determines the trained teacher (its cache hash)."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in ("corpus", "max_doc_chars", "vocab_size", "teacher_layers", "teacher_hidden",
                                  "teacher_steps", "teacher_lr", "teacher_batch", "teacher_seed", "teacher_doc_loss_weight",
                                  "max_position_embeddings")} | {"teacher_loop": TEACHER_LOOP}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _cut(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    cut = text[:n]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip()


def load_rows(s: QualitySettings) -> dict[str, list[dict]]:
    """The corpus by split, documents cut to max_doc_chars."""
    if s.corpus is None:
        try:
            from kdpipe.pipeline.data.build_debian_corpus import load_corpus
        except ImportError:
            raise DataError("the shipped Debian corpus (kdpipe.pipeline.data.build_debian_corpus) is not installed; "
                            "pass corpus=PATH.jsonl") from None
        rows = load_corpus()
    else:
        path = Path(s.corpus)
        if not path.is_file():
            raise DataError(f"corpus: {path} not found (a JSONL with id, document, summary, split)")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out: dict[str, list[dict]] = {k: [] for k in SPLITS}
    for i, r in enumerate(rows):
        for f in ("id", "document", "summary", "split"):
            if f not in r:
                raise DataError(f"{s.corpus or 'debian corpus'}: row {i} has no field '{f}'")
        out.setdefault(r["split"], []).append({**r, "document": _cut(r["document"], s.max_doc_chars)})
    if not out["train"] or not out["heldout"]:
        raise DataError(f"{s.corpus or 'debian corpus'}: needs rows with split 'train' and 'heldout'")
    if not out["validation"]:
        # A corpus without a validation split (the templated fixture): hold out a seeded share of train.
        train = sorted(out["train"], key=lambda r: _hash(["val", r["id"]]))
        n = max(1, len(train) // 10)
        out["validation"] = [{**r, "split": "validation"} for r in train[:n]]
        out["train"] = [r for r in out["train"] if r["id"] not in {v["id"] for v in out["validation"]}]
    return out


def transfer_rows(s: QualitySettings, train: list[dict]) -> list[dict]:
    """A seeded share of the training documents (the same for every student and seed)."""
    n = max(1, round(s.transfer_fraction * len(train)))
    if s.transfer_max is not None:
        n = min(n, s.transfer_max)
    ranked = sorted(train, key=lambda r: _hash([s.transfer_seed, r["id"]]))
    return sorted(ranked[:n], key=lambda r: r["id"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    from kdpipe.pipeline.config import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def _tiny_cfg(vocab: int, layers: int, hidden: int, max_pos: int, seed: int):
    from kdpipe.pipeline.tiny import TinyModelConfig

    return TinyModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                           max_position_embeddings=max_pos, seed=seed)


def ensure_teacher(root: Path, log: Callable[[str], None] = print, **overrides: Any) -> dict[str, Any]:
    """The corpus, the transfer set, the shared tokenizer, the trained teacher and a student builder.

    root: the benchmark's output folder (the cache lives under it).
    overrides: QualitySettings fields (e.g. teacher_steps=2000, corpus="fixture.jsonl").
    The teacher is trained (plain CE on ALL training pairs: summarize prompt -> reference summary)
    when ROOT/teacher is missing or its recorded hash differs from these settings' (said on `log`);
    otherwise it is reused.

    -> {"teacher": Path, "tokenizer": Path, "student_init": callable(seed) -> Path (built once, cached),
        "corpus": {split: rows}, "transfer": rows, "data": {split or "transfer": Path of its JSONL},
        "config": dict of the settings, "teacher_hash": str, "teacher_seconds": float (0 when reused)}
    """
    from kdpipe.pipeline.config import atomic_write_text

    unknown = set(overrides) - {f.name for f in dataclasses.fields(QualitySettings)}
    if unknown:
        raise ConfigError(f"ensure_teacher: unknown setting(s) {sorted(unknown)}; see QualitySettings")
    s = QualitySettings(**overrides)
    root = Path(root).resolve()
    corpus = load_rows(s)
    transfer = transfer_rows(s, corpus["train"])
    data = {k: write_jsonl(root / "data" / f"{k}.jsonl", v) for k, v in corpus.items() if k in SPLITS}
    data["transfer"] = write_jsonl(root / "data" / "transfer.jsonl", transfer)

    fingerprint = _hash([[r["id"], r["document"], r["summary"]] for r in corpus["train"]])
    teacher_cfg = {**s.teacher_part(), "train_fingerprint": fingerprint}
    th = _hash(teacher_cfg)
    teacher = root / "teacher"
    stamp = teacher / "quality-teacher.json"
    tok_dir = root / "tokenizer"
    seconds = 0.0
    have = json.loads(stamp.read_text()) if stamp.is_file() else None
    if s.external_teacher:
        teacher = tok_dir = Path(s.external_teacher).resolve()
        if not (teacher / "config.json").is_file():
            raise ConfigError(f"external_teacher: {teacher} has no config.json (an HF model folder with its tokenizer)")
        log(f"teacher: external {teacher} (not trained here, no cache hash)")
    elif have is None or have.get("hash") != th or not (teacher / "model.safetensors").is_file():
        if have is not None:
            changed = sorted(k for k in set(have.get("config", {})) | set(teacher_cfg) if have.get("config", {}).get(k) != teacher_cfg.get(k))
            log(f"teacher cache {teacher}: config hash differs ({', '.join(changed)} changed): retraining")
        from kdpipe.pipeline.demo import train_teacher
        from kdpipe.pipeline.generate.config import DEFAULT_SUMMARIZE_TEMPLATE
        from kdpipe.pipeline.tiny import build_model, build_tokenizer

        t0 = time.perf_counter()
        texts = [r["document"] + "\n" + r["summary"] for r in corpus["train"]] + [DEFAULT_SUMMARIZE_TEMPLATE] * 20
        build_tokenizer(tok_dir, texts, vocab_size=s.vocab_size)
        init = root / "teacher-init"
        build_model(init, tok_dir, _tiny_cfg(s.vocab_size, s.teacher_layers, s.teacher_hidden, s.max_position_embeddings, s.teacher_seed))
        log(f"training the teacher {s.teacher_layers}x{s.teacher_hidden} on all {len(corpus['train'])} training pairs "
            f"({s.teacher_steps} steps, batch {s.teacher_batch})")
        if stamp.is_file():
            stamp.unlink()  # a teacher being retrained is not the cached one
        train_teacher(init, teacher, corpus["train"], s.teacher_steps, s.teacher_lr, s.teacher_batch, s.teacher_seed, log,
                      doc_loss_weight=s.teacher_doc_loss_weight)
        seconds = time.perf_counter() - t0
        atomic_write_text(stamp, json.dumps({"hash": th, "config": teacher_cfg, "seconds": round(seconds, 1)}, indent=2) + "\n")
        # Student inits depend on the tokenizer: drop the ones built against an older one.
        for old in (root / "students").glob("init-s*") if (root / "students").is_dir() else []:
            (old / "model.safetensors").unlink(missing_ok=True)
    else:
        log(f"teacher cache {teacher}: same config hash ({th[:12]}), reused")

    def student_init(seed: int) -> Path:
        from kdpipe.pipeline.tiny import build_model

        d = root / "students" / f"init-s{seed}"
        cfg = _tiny_cfg(s.vocab_size, s.student_layers, s.student_hidden, s.max_position_embeddings, 1000 + seed)
        want = {"student": dataclasses.asdict(cfg), "teacher_hash": th}  # the tokenizer is built with the teacher
        stamp = d / "quality-student.json"
        # An init built for another size or teacher (tokenizer) is rebuilt: the runs compare students of one init per seed.
        if not (d / "model.safetensors").is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != want:
            (d / "model.safetensors").unlink(missing_ok=True)
            build_model(d, tok_dir, cfg)
            atomic_write_text(stamp, json.dumps(want, indent=1) + "\n")
        return d

    return {
        "teacher": teacher, "tokenizer": tok_dir, "student_init": student_init, "corpus": corpus, "transfer": transfer,
        "data": data, "config": dataclasses.asdict(s), "teacher_hash": th, "teacher_seconds": round(seconds, 1),
    }
