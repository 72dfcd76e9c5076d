"""GenerateConfig: every option of `kdpipe generate-logits`, defaults only here.

Filled by `kdpipe.pipeline.config.load_config` from defaults < `--config FILE.toml` < CLI flags;
the resolved value is written into the store as `generate-config.toml`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE
from kdpipe.storage.errors import ConfigError

RECIPES = ("summarize", "score", "basic-reading", "on-policy")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Few-shot prompt for Basic Reading Distillation (Zhou et al., ACL 2025): per sentence, the teacher
# lists named entities with types, then asks questions about the sentence and answers them from it.
DEFAULT_READING_TEMPLATE = (
    "Read the sentence. List its named entities with their types, then ask questions about the "
    "sentence and answer each one using only the sentence.\n\n"
    "Sentence: The city council approved a new budget for parks and schools on Monday.\n"
    "Entities: city council (ORGANIZATION); Monday (DATE)\n"
    "Q: Who approved the new budget? A: The city council.\n"
    "Q: What is the budget for? A: Parks and schools.\n"
    "Q: When was the budget approved? A: On Monday.\n\n"
    "Sentence: Researchers in Paris reported that the river reached its highest level in ten years.\n"
    "Entities: Paris (LOCATION); ten years (DURATION)\n"
    "Q: Where are the researchers? A: In Paris.\n"
    "Q: What did the river reach? A: Its highest level in ten years.\n\n"
    "Sentence: {sentence}\n"
)


def slurm_default(name: str) -> int | None:
    """An integer SLURM environment variable, or None when unset/blank."""
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} is not an integer; unset it or pass the flag") from None


@dataclass(frozen=True)
class GenerateConfig:
    """Phase one: the teacher reads a dataset once and writes its targets into a store."""

    # --- what to run
    teacher: str  # hub id or local directory of the teacher model
    data: str  # hub dataset id or local .json/.jsonl/.csv/.parquet file
    out: str  # store directory (created; an existing store must have the same teacher/codec/recipe)
    recipe: Literal["summarize", "score", "basic-reading", "on-policy"] = "summarize"  # summarize (teacher writes), score (teacher-forced target), basic-reading (entities + Q&A per sentence), on-policy (a sampler writes, the teacher scores)
    engine: Literal["vllm", "hf"] = "vllm"  # vllm, or hf = plain transformers reference backend (slow; ground truth)

    # --- dataset
    split: str = "train"  # dataset split to read
    text_field: str = "text"  # column with the document text (evaluate and job files use the same name)
    target_field: str | None = None  # column with the target, needed by `score` (text, or a list of teacher token ids)
    id_field: str | None = None  # column with unique sample ids; None: ids are the row numbers ("0", "1", ...)
    limit: int | None = None  # use only the first N rows

    # --- teacher engine
    teacher_revision: str | None = None  # hub revision (branch, tag, commit) of the teacher
    trust_remote_code: bool = False  # allow the teacher repo's own Python code; off unless it needs it (and you trust it)
    tensor_parallel_size: int = 1  # GPUs per teacher (vLLM tensor parallelism)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = the checkpoint's torch_dtype on GPU, float32 on CPU (resolved before the engine starts, recorded in the store)
    max_model_len: int | None = None  # context length; None: the teacher config's (longer documents follow --too-long)
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory vLLM may use
    max_logprobs: int | None = None  # engine's cap on log-probs per position; None = top_k
    enforce_eager: bool = False  # skip CUDA-graph capture (faster start, slower steps)
    seed: int = 0  # engine seed, per-request sampling seeds and the sampled codec's RNG

    # --- prompts and sampling
    chat_template: bool = True  # wrap prompts in the teacher's chat template when it has one
    system_prompt: str | None = None  # system message for chat-template prompts
    prompt_template: str | None = None  # summarize/score: must contain {text}; None = recipe default
    reading_template: str | None = None  # basic-reading: must contain {sentence}; None = default few-shot
    separator: str = "<sep>"  # basic-reading: between sentences and readings
    sentence_language: str = "en"  # basic-reading: pysbd language code
    max_new_tokens: int = 256  # summarize: summary length; basic-reading: reading length
    temperature: float = 0.0  # generation only; targets are raw log-probs, independent of it
    sampling_top_p: float = 1.0  # nucleus sampling of the generated text (not the codec's top_p)
    too_long: Literal["truncate", "skip"] = "truncate"  # documents that do not fit max_model_len

    # --- on-policy (recipe on-policy, see recipes/onpolicy.py): the student writes, the teacher scores
    sampler: str | None = None  # the model that samples completions: a model dir / hub id, or a RUN (= RUN/final)
    samples_per_prompt: int = 1  # N completions per prompt, each its own store row "<id>#<j>"
    sampling_temperature: float = 1.0  # the sampler's temperature (1.0 = its own distribution)

    # --- targets (the store's codec)
    codec: Literal["topk", "sampled"] = "topk"  # topk (top-k log-probs + exact tail) or sampled (N draws from the top-k + tail)
    top_k: int = 64  # entries per position (topk) / size of the top-K drawn from (sampled)
    top_p: float | None = None  # topk only: adaptive cut at cumulative mass top_p
    draws: int = 50  # sampled only

    # --- cluster sharding: default from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT
    task_index: int | None = None  # this array task; None = SLURM_ARRAY_TASK_ID, else 0
    num_tasks: int | None = None  # number of array tasks; None = SLURM_ARRAY_TASK_COUNT, else 1

    # --- throughput
    max_inflight: int = 512  # requests kept queued in the engine (continuous batching stays full)
    score_mode: Literal["prefix-cache", "full"] = "prefix-cache"  # teacher-forced scoring under vLLM (score, basic-reading): prefix-cache prefills the prompt, then computes log-probs only past the cached prefix (same targets, faster); full computes every row (the reference)
    writer_queue: int = 256  # records buffered between the engine loop and the writer thread
    shard_mb: float = 256.0  # shard size (MiB) before rolling to the next one
    store_text: bool = True  # keep generated text (summaries, assembled paragraphs) in the store
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        for key in ("teacher", "data", "out"):
            if not str(getattr(self, key)).strip():
                raise ConfigError(f"{key}: must not be empty")
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe: {self.recipe!r} is not a recipe; choose one of {', '.join(RECIPES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.recipe == "score" and not self.target_field:
            raise ConfigError(
                "recipe 'score' scores a given target but target_field is not set; "
                "pass --target-field FIELD (the column holding the reference text)"
            )
        if self.recipe == "on-policy" and not (self.sampler or "").strip():
            raise ConfigError(
                "recipe 'on-policy' scores the sampler's completions but sampler is not set; pass --sampler "
                "MODEL_OR_RUN (the current student: a model directory, a hub id, or a training run directory)"
            )
        if self.sampler is not None and self.recipe != "on-policy":
            raise ConfigError(f"sampler: only recipe 'on-policy' uses a sampler; remove --sampler or pass --recipe on-policy")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt: {self.samples_per_prompt} must be >= 1 (completions sampled per prompt)")
        if self.sampling_temperature < 0:
            raise ConfigError(f"sampling_temperature: {self.sampling_temperature} must be >= 0 (0 = greedy)")
        if self.sampling_temperature == 0 and self.samples_per_prompt > 1:
            raise ConfigError(
                f"samples_per_prompt={self.samples_per_prompt} with sampling_temperature=0: greedy decoding gives "
                "the same completion every time; use samples_per_prompt = 1 or a temperature > 0"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: {self.limit} must be >= 1 (or unset for the whole split)")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size: {self.tensor_parallel_size} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError(f"max_model_len: {self.max_model_len} is too small (>= 16)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization: {self.gpu_memory_utilization} must be in (0, 1]")
        if self.top_k < 1:
            raise ConfigError(f"top_k: {self.top_k} must be >= 1")
        if self.max_logprobs is not None and self.top_k > self.max_logprobs:
            raise ConfigError(
                f"top_k={self.top_k} is above max_logprobs={self.max_logprobs}: the engine returns at most "
                f"max_logprobs entries per position; lower --top-k or raise --max-logprobs"
            )
        if self.top_p is not None:
            if self.codec != "topk":
                raise ConfigError("top_p is the topk codec's adaptive cut; remove --top-p or use --codec topk")
            if not 0.0 < self.top_p <= 1.0:
                raise ConfigError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.codec == "sampled" and not 1 <= self.draws <= 255:
            raise ConfigError(f"draws: {self.draws} must be between 1 and 255")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature: {self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.sampling_top_p <= 1.0:
            raise ConfigError(f"sampling_top_p: {self.sampling_top_p} must be in (0, 1]")
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            raise ConfigError("prompt_template: must contain the placeholder {text} (where the document goes)")
        if self.reading_template is not None and "{sentence}" not in self.reading_template:
            raise ConfigError("reading_template: must contain the placeholder {sentence}")
        if self.recipe == "basic-reading" and not self.separator.strip():
            raise ConfigError("separator: basic-reading needs a non-blank separator (default '<sep>')")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ConfigError(f"num_tasks: {self.num_tasks} must be >= 1")
        if self.task_index is not None and self.task_index < 0:
            raise ConfigError(f"task_index: {self.task_index} must be >= 0")
        if self.task_index is not None and self.num_tasks is not None and self.task_index >= self.num_tasks:
            raise ConfigError(f"task_index={self.task_index} must be below num_tasks={self.num_tasks}")
        if self.max_inflight < 1 or self.writer_queue < 1:
            raise ConfigError("max_inflight and writer_queue must be >= 1")
        if self.shard_mb <= 0:
            raise ConfigError(f"shard_mb: {self.shard_mb} must be > 0")

    # --- derived values (not options)

    @property
    def logprob_cap(self) -> int:
        return self.max_logprobs if self.max_logprobs is not None else self.top_k

    def resolved_tasks(self) -> tuple[int, int]:
        """(task index, number of tasks): flags, else the SLURM array variables, else (0, 1)."""
        num = self.num_tasks if self.num_tasks is not None else slurm_default("SLURM_ARRAY_TASK_COUNT")
        idx = self.task_index
        if idx is None:
            # The array task id IS the task index: a resubmitted partial array (`--array=1,3`)
            # must still write tasks 1 and 3, never renumber them from the array's minimum.
            idx = slurm_default("SLURM_ARRAY_TASK_ID")
        num = 1 if num is None else num
        idx = 0 if idx is None else idx
        if num < 1 or not 0 <= idx < num:
            raise ConfigError(
                f"task index {idx} is not in [0, {num}); with SLURM use a contiguous array such as "
                f"--array=0-{num - 1}, or pass --task-index/--num-tasks"
            )
        return idx, num

    @property
    def template(self) -> str:
        return self.prompt_template if self.prompt_template is not None else DEFAULT_SUMMARIZE_TEMPLATE

    @property
    def reading(self) -> str:
        return self.reading_template if self.reading_template is not None else DEFAULT_READING_TEMPLATE
