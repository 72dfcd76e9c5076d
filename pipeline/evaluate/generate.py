"""Outputs of each model on the evaluation prompts, under vLLM, with honest per-request latency.

Every model runs under the same engine settings (dtype, context length, eager mode, sampling),
one engine at a time. After a short warm-up, the timed prompts are sent ONE request at a time
and timed by the wall clock around the blocking call (submit -> last token), so a request's
latency is what a user waiting for one summary sees; the remaining prompts, if any, are batched
(their outputs are scored, their times are not reported).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from kdpipe.pipeline.context_length import model_context_length, resolve_context_length
from kdpipe.storage.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class EvalExample:
    id: str
    document: str
    reference: str


class Examples(list):
    """The selected examples; `selection` says in words which rows they are (for the report header)."""

    selection: str = "every row"


def load_examples(cfg) -> Examples:
    """Rows of cfg.data (JSONL) of the chosen split, checked before any model loads."""
    path = Path(cfg.data)
    if not path.is_file():
        raise DataError(f"{cfg.data}: evaluation data file not found (a JSONL file with one document per line)")
    rows = Examples()
    matched = unlabeled = 0  # rows whose split field equals cfg.split / rows without a split field
    capped = False
    lines = 0  # non-blank lines
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                row = json.loads(line.rstrip("\r\n"))  # without its line break, as an editor shows the line
            except json.JSONDecodeError as e:
                raise DataError(f"{cfg.data}: line {line_no} is not valid JSON ({e}); fix that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{cfg.data}: line {line_no} is not a JSON object")
            if cfg.split and cfg.split_field in row and row[cfg.split_field] != cfg.split:
                continue
            if cfg.split:
                if cfg.split_field in row:
                    matched += 1
                else:
                    unlabeled += 1
            for field in (cfg.text_field, cfg.target_field):
                if field not in row:
                    raise DataError(
                        f"{cfg.data}: line {line_no} has no field '{field}' (fields: {', '.join(sorted(row))}); "
                        f"pass --{'text' if field == cfg.text_field else 'target'}-field with the right name"
                    )
                if not isinstance(row[field], str) or not row[field].strip():
                    raise DataError(f"{cfg.data}: line {line_no}: field '{field}' is empty or not text")
            rid = str(row.get(cfg.id_field, line_no - 1))
            rows.append(EvalExample(rid, row[cfg.text_field], row[cfg.target_field]))
            if cfg.max_samples is not None and len(rows) >= cfg.max_samples:
                capped = True
                break
    if not lines:
        raise DataError(f"{cfg.data} is empty (no rows); pass a JSONL file with one document per line")
    if not rows:
        where = f" with {cfg.split_field} == {cfg.split!r}" if cfg.split else ""
        raise DataError(f"{cfg.data}: no rows{where}; check --split (or pass --split '' for every row)")
    if not cfg.split:
        sel = "every row"
    elif not matched:
        sel = f"every row (no row has a '{cfg.split_field}' field, so --split {cfg.split!r} selected nothing out)"
    elif unlabeled:
        sel = f"rows with {cfg.split_field} == {cfg.split!r} and {unlabeled} row(s) without a '{cfg.split_field}' field"
    else:
        sel = f"rows with {cfg.split_field} == {cfg.split!r}"
    rows.selection = sel + (f", the first {cfg.max_samples} (--max-samples)" if capped else "")
    return rows


# ---------------------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str  # what vLLM loads: a folder or hub id
    run: str | None  # the training run folder, when a run was given


def resolve_model(arg: str, name: str) -> ModelSpec:
    """A run folder (has final/) means RUN/final; a model folder or hub id is used as is."""
    p = Path(arg)
    if p.is_dir() and (p / "final").is_dir():
        return ModelSpec(name, str(p / "final"), str(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model {name!r}: {arg} has no config.json (nor a final/ checkpoint of a training run)")
        run = str(p.parent) if p.name == "final" and (p.parent / "metrics.jsonl").is_file() else None
        return ModelSpec(name, str(p), run)
    if arg.startswith(("/", ".", "~")):
        raise ConfigError(f"model {name!r}: {arg} does not exist")
    return ModelSpec(name, arg, None)  # hub id


def summarize_template(cfg) -> str:
    """The summarize recipe's prompt template from phase one, so students see the prompts they trained on."""
    from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE

    return cfg.instruction if cfg.instruction else DEFAULT_SUMMARIZE_TEMPLATE


def build_prompt_ids(tokenizer, document: str, template: str, use_chat_template: bool, system_prompt: str | None = None) -> list[int]:
    """Token ids of the summarize prompt, built by phase one's own Prompter (template, then chat template)."""
    from kdpipe.pipeline.prompts import Prompter

    return Prompter(tokenizer, use_chat_template, system_prompt).ids(template.replace("{text}", document))


def resolve_max_model_len(specs: Sequence[ModelSpec], cfg) -> int:
    """The one engine context length of every model: --max-model-len, or the smallest of the models' own.

    Checked here because vLLM refuses a length above a model's own with a long pydantic trace.
    """
    natives = {f"model {s.name!r} ({s.model})": model_context_length(s.model, what=f"model {s.name!r}") for s in specs}
    return resolve_context_length(cfg.max_model_len, natives)


def load_tokenizers(specs: Sequence[ModelSpec], cfg) -> dict[str, Any]:
    """Each model's tokenizer, refusing models that cannot generate before any engine starts."""
    from transformers import AutoConfig, AutoTokenizer

    toks = {}
    for s in specs:
        try:
            toks[s.name] = AutoTokenizer.from_pretrained(s.model)
        except Exception as e:
            raise ConfigError(
                f"model {s.name!r} ({s.model}) has no usable tokenizer ({type(e).__name__}); save the tokenizer "
                "beside the weights (tokenizer.json / tokenizer_config.json)"
            ) from None
        try:
            mcfg = AutoConfig.from_pretrained(s.model)
        except Exception as e:
            raise ConfigError(f"model {s.name!r} ({s.model}): config.json cannot be read ({e})") from None
        if getattr(mcfg, "is_encoder_decoder", False) or not any(a.endswith("ForCausalLM") for a in (mcfg.architectures or [])):
            raise ConfigError(
                f"model {s.name!r} ({s.model}) is not a causal language model (architectures: {mcfg.architectures}); "
                "evaluate generates with decoder-only models"
            )
    if cfg.use_chat_template:
        with_tpl = [n for n, t in toks.items() if getattr(t, "chat_template", None)]
        without = [n for n in toks if n not in with_tpl]
        if with_tpl and without:
            raise ConfigError(
                f"model(s) {', '.join(without)} have no chat template but {', '.join(with_tpl)} do: the prompts would "
                "differ between models; save the chat template with every model, or pass --no-chat-template"
            )
    return toks


# ---------------------------------------------------------------------------------------- generation
@dataclasses.dataclass
class ModelOutputs:
    name: str
    texts: list[str]
    output_tokens: list[int]
    finish_reasons: list[str]
    latencies_s: list[float]  # one per timed request (the first `len(latencies_s)` prompts)
    engine_start_s: float


def _engine_kwargs(cfg) -> dict[str, Any]:
    return dict(
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        enforce_eager=True,
        seed=cfg.seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
    )


def generate_outputs(spec: ModelSpec, tokenizer, prompts: list[list[int]], cfg, progress=None) -> ModelOutputs:
    """Run one model over all prompts; the first `latency_requests` are timed one by one."""
    too_long = [i for i, p in enumerate(prompts) if len(p) + cfg.max_new_tokens > cfg.max_model_len]
    if too_long:
        raise DataError(
            f"{len(too_long)} prompt(s) (first: example {too_long[0]}, {len(prompts[too_long[0]])} tokens) plus "
            f"max_new_tokens={cfg.max_new_tokens} do not fit max_model_len={cfg.max_model_len}; raise --max-model-len"
        )
    if getattr(cfg, "engine", "vllm") == "hf":
        return generate_outputs_hf(spec, tokenizer, prompts, cfg, progress)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=spec.model, **_engine_kwargs(cfg))
    start_s = time.perf_counter() - t0
    try:
        params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, detokenize=False)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        # Warm-up: the first requests pay one-off costs (allocations, kernel selection) no user sees twice.
        llm.generate(inputs[: max(cfg.warmup_requests, 0)] or inputs[:1], params, use_tqdm=False)
        if progress is not None:
            progress.reset(total=len(inputs))  # the engine start is not a request: restart the rate
        n_timed = len(inputs) if cfg.latency_requests is None else min(cfg.latency_requests, len(inputs))
        results: list[Any] = []
        latencies = []
        for inp in inputs[:n_timed]:
            t = time.perf_counter()
            out = llm.generate([inp], params, use_tqdm=False)[0]
            latencies.append(time.perf_counter() - t)
            results.append(out)
            if progress is not None:
                progress.update(1)
        if n_timed < len(inputs):
            results.extend(llm.generate(inputs[n_timed:], params, use_tqdm=False))
            if progress is not None:
                progress.update(len(inputs) - n_timed)
    finally:
        _shutdown(llm)
    ids = [list(r.outputs[0].token_ids) for r in results]
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    return ModelOutputs(
        name=spec.name,
        texts=texts,
        output_tokens=[len(t) for t in ids],
        finish_reasons=[str(r.outputs[0].finish_reason) for r in results],
        latencies_s=latencies,
        engine_start_s=start_s,
    )


def generate_outputs_hf(spec: ModelSpec, tokenizer, prompts: list[list[int]], cfg, progress=None) -> ModelOutputs:
    """The same protocol with plain transformers (`engine = "hf"`): no engine start, for small models on CPU.

    Greedy (or seeded sampling) until EOS or max_new_tokens; the EOS is counted as an output token,
    as vLLM counts it. Timed prompts run one request at a time; the rest in left-padded batches.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype, torch.float32)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype).to(device).eval()
    start_s = time.perf_counter() - t0
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    sample = cfg.temperature > 0
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, eos_token_id=eos, pad_token_id=pad,
              **({"temperature": cfg.temperature} if sample else {"temperature": None, "top_p": None, "top_k": None}))

    def run(batch: list[list[int]]) -> list[list[int]]:
        torch.manual_seed(cfg.seed)
        T = max(len(p) for p in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)  # [B, T], left padded
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)[:, T:].tolist()
        cut = []
        for row in out:  # up to and including the first EOS; the rest is padding
            cut.append(row[: row.index(eos) + 1] if eos in row else row)
        return cut

    run(prompts[: max(cfg.warmup_requests, 1)][:1])  # warm-up: first-call allocations
    if progress is not None:
        progress.reset(total=len(prompts))
    n_timed = len(prompts) if cfg.latency_requests is None else min(cfg.latency_requests, len(prompts))
    ids: list[list[int]] = []
    latencies = []
    for p in prompts[:n_timed]:
        t = time.perf_counter()
        ids += run([p])
        latencies.append(time.perf_counter() - t)
        if progress is not None:
            progress.update(1)
    rest = sorted(range(n_timed, len(prompts)), key=lambda i: len(prompts[i]))
    done: dict[int, list[int]] = {}
    for b in range(0, len(rest), 32):
        chunk = rest[b : b + 32]
        for i, o in zip(chunk, run([prompts[i] for i in chunk])):
            done[i] = o
        if progress is not None:
            progress.update(len(chunk))
    ids += [done[i] for i in range(n_timed, len(prompts))]
    del model
    gc.collect()
    return ModelOutputs(
        name=spec.name,
        texts=[tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids],
        output_tokens=[len(t) for t in ids],
        finish_reasons=["stop" if t and t[-1] == eos else "length" for t in ids],
        latencies_s=latencies,
        engine_start_s=start_s,
    )


def _shutdown(llm) -> None:
    """Stop the engine now, its processes joined, so the next model's engine gets the cores and memory."""
    from kdpipe.pipeline.shutdown import shutdown_llm

    shutdown_llm(llm)
