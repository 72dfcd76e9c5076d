"""`kdpipe generate-logits`: flags and `--config FILE.toml` fill one GenerateConfig, then one call.

Every GenerateConfig field is a flag (`top_k` -> `--top-k`, booleans as `--x/--no-x`); the
options are generated from the dataclass so the two cannot drift apart. Precedence:
dataclass defaults < TOML file (flat keys, or a [generate] table) < flags given.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing

import click

from kdpipe.pipeline.cli import run_command
from kdpipe.pipeline.generate.config import GenerateConfig

HELP = {
    "teacher": "Teacher model: hub id or local directory.",
    "data": "Dataset: hub id or local .json/.jsonl/.csv/.parquet file.",
    "out": "Store directory to write (an existing store must match teacher/codec/recipe/data).",
    "recipe": "summarize (teacher writes), score (teacher-forced target), basic-reading (entities + Q&A per sentence).",
    "engine": "vllm (default) or hf (plain transformers reference backend, slow).",
    "split": "Dataset split.",
    "text_field": "Column with the document text.",
    "target_field": "Column with the target (score): text, or a list of teacher token ids.",
    "id_field": "Column with unique sample ids (default: row numbers).",
    "limit": "Use only the first N rows.",
    "teacher_revision": "Hub revision of the teacher.",
    "trust_remote_code": "Allow the teacher repo's own Python code (off by default).",
    "tensor_parallel_size": "GPUs per teacher (vLLM tensor parallelism).",
    "dtype": "auto | float32 | bfloat16 | float16.",
    "max_model_len": "Context length (default: the teacher's); longer documents follow --too-long.",
    "gpu_memory_utilization": "Fraction of GPU memory vLLM may use.",
    "max_logprobs": "Engine cap on log-probs per position (default: --top-k).",
    "enforce_eager": "Disable CUDA graphs (faster start, slower steps).",
    "seed": "Engine seed, per-request sampling seeds and the sampled codec's RNG.",
    "chat_template": "Wrap prompts in the teacher's chat template when it has one.",
    "system_prompt": "System message for chat-template prompts.",
    "prompt_template": "summarize/score prompt with {text} (default: 'Summarize the following text...').",
    "reading_template": "basic-reading few-shot prompt with {sentence}.",
    "separator": "basic-reading separator between sentences and readings.",
    "sentence_language": "basic-reading pysbd language code.",
    "max_new_tokens": "Max generated tokens (summary / reading).",
    "temperature": "Sampling temperature of generated text (0 = greedy); targets are raw log-probs regardless.",
    "sampling_top_p": "Nucleus sampling of generated text (not the codec's --top-p).",
    "too_long": "Documents beyond the context: truncate or skip (counted in the summary).",
    "codec": "topk (top-k log-probs + exact tail) or sampled (N draws from the top-k + tail).",
    "top_k": "Entries per position (topk) / size of the top-K drawn from (sampled).",
    "top_p": "topk: keep entries until cumulative mass >= P (at most --top-k).",
    "draws": "sampled: draws per position (<= 255).",
    "task_index": "This array task (default: SLURM_ARRAY_TASK_ID, else 0).",
    "num_tasks": "Number of array tasks (default: SLURM_ARRAY_TASK_COUNT, else 1).",
    "max_inflight": "Requests kept queued in the engine.",
    "writer_queue": "Results buffered for the writer thread.",
    "shard_mb": "Shard size in MiB before rolling over.",
    "store_text": "Store generated text (summaries, assembled paragraphs).",
    "progress": "Show a progress bar.",
}


def _click_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _click_type(args[0])
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(tp)])
    return {int: int, float: float, str: str, bool: bool}.get(tp, str)


def _options(fn):
    hints = typing.get_type_hints(GenerateConfig)
    for f in reversed(dataclasses.fields(GenerateConfig)):
        name = f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = HELP.get(f.name, "") + (f"  [default: {default}]" if default is not None else "")
        if tp is bool:
            fn = click.option(f"--{name}/--no-{name}", f.name, default=None, help=help_)(fn)
        else:
            fn = click.option(f"--{name}", f.name, type=_click_type(tp), default=None, help=help_)(fn)
    return fn


def load_generate_config(config_path: str | None, overrides: dict) -> GenerateConfig:
    """defaults < TOML (flat, or its [generate] table) < flags given."""
    from kdpipe.pipeline.config import load_config, read_toml

    section = None
    if config_path is not None:
        data = read_toml(config_path)
        if isinstance(data.get("generate"), dict):
            section = "generate"
    return load_config(GenerateConfig, config_path, overrides, section=section)


@click.command("generate-logits", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file with any of these options (flags given here override it).")
@_options
def generate_logits(config_path: str | None, **flags) -> None:
    """Phase one: the teacher reads DATA once and writes its targets into the store OUT.

    Example: kdpipe generate-logits --teacher Qwen/Qwen2.5-7B-Instruct --data docs.jsonl
    --recipe summarize --out store/ --codec topk --top-k 64
    """
    from kdpipe.pipeline.generate.run import generate_logits as run

    def go():
        cfg = load_generate_config(config_path, flags)
        return run(cfg)

    from kdpipe.pipeline.shutdown import exit_process

    summary = run_command(go)
    click.echo(summary.line())
    # 143 after SIGTERM, so a job chain does not go on to `kdpipe finalize` (the rerun resumes);
    # 0 once the task is done, whatever vLLM's teardown would do (see kdpipe.pipeline.shutdown).
    exit_process(143 if summary.interrupted else 0)
