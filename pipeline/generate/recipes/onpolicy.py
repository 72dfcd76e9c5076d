"""The on-policy recipe: the student writes, the teacher grades, in one array task.

Per array task (`kdpipe generate-logits --recipe on-policy --sampler MODEL_OR_RUN ...`):

1. The sampler (the current student; a training RUN means RUN/final) generates
   `samples_per_prompt` = N completions for each prompt of the task under the same engine kind
   as the teacher, each request seeded with `request_seed(seed, sample id, j)`. The completions
   are written atomically to STORE/samples/task-XXXXX.json, then the sampler is freed.
2. The teacher engine starts and scores every prompt + completion teacher-forced; each store
   row "<id>#<j>" holds the teacher's top-K at every completion token **plus the completion
   token itself** when it is outside the top-K (its exact log-prob from the engine), so the
   stored entries always include log p(x_t) — what the sampled-token estimator of phase two
   needs — and the tail stays exact (1 − Σ p over the kept entries). The store's codec therefore
   records top_k = K + 1 (at most K + 1 entries per position).

Resume. The samples file is the unit of "drawn": a rerun reads it and never samples again, so no
completion is ever drawn twice or differently (seeded vLLM sampling is reproducible per request,
but only the file makes that a guarantee across engine versions and batch compositions); rows
already in finished shards are skipped as for every recipe. A task killed while sampling has no
samples file and no rows, and samples from scratch.

Tokenizers. The teacher scores the student's token ids, which is the student's own text only
when both use the same tokenizer: a sampler whose tokenizer fingerprint (vocabulary, special
tokens, chat template) differs from the teacher's is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from kdpipe.pipeline.generate.data import Sample
from kdpipe.pipeline.generate.engines import Request, make_engine
from kdpipe.pipeline.generate.recipes.base import Job, Recipe, Result, request_seed
from kdpipe.pipeline.generate.teacher import local_model_revision
from kdpipe.storage.errors import ConfigError, StoreError

SAMPLES_DIR = "samples"
SAMPLES_VERSION = 1


def sample_key(sample_id: str, j: int) -> str:
    """The store row id of completion j of a prompt."""
    return f"{sample_id}#{j}"


def resolve_sampler(sampler: str) -> str:
    """A model directory / hub id as given; a training run directory -> its RUN/final (refused without one)."""
    p = Path(sampler)
    if not p.is_dir():
        if p.exists():
            raise ConfigError(f"sampler: {sampler} is a file; pass a model directory, a hub id or a training run directory")
        return sampler
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return str(p.resolve())
    is_run = (p / "train_config.toml").is_file() or (p / "metrics.jsonl").is_file() or any(p.glob("checkpoint-*"))
    if not is_run:
        raise ConfigError(f"sampler: {sampler} holds neither a model (config.json) nor a training run (train_config.toml)")
    final = p / "final"
    if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
        raise ConfigError(
            f"sampler: {sampler} is a training run without final/ (it has not finished: "
            f"{'checkpoints exist, resume it with --resume' if any(p.glob('checkpoint-*')) else 'no checkpoint yet'}); "
            "an on-policy round samples from a finished run's RUN/final, so finish that run first or pass a model directory"
        )
    return str(final.resolve())


def sampler_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, ...
        raise ConfigError(f"sampler: cannot load a tokenizer from {path!r} ({type(e).__name__}: {e})") from None


class OnPolicy(Recipe):
    name = "on-policy"
    extra_entries = 1  # the completion token itself, when outside the teacher's top-K

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        from kdpipe.storage import tokenizer_fingerprint

        self.sampler = resolve_sampler(self.cfg.sampler)
        stok = sampler_tokenizer(self.sampler, self.cfg.trust_remote_code)
        s_fp, t_fp = tokenizer_fingerprint(stok), tokenizer_fingerprint(self.tok)
        if s_fp != t_fp:
            raise ConfigError(
                f"sampler {self.cfg.sampler!r}: its tokenizer differs from the teacher's {self.cfg.teacher!r} "
                f"(fingerprint {s_fp[:12]}… vs {t_fp[:12]}…: vocabulary, special tokens or chat template). An on-policy "
                "store holds the teacher's scores of the student's token ids, which are the student's text only when "
                "both share one tokenizer; use a sampler (student) with the teacher's tokenizer"
            )
        local = Path(self.sampler).is_dir()
        self.sampler_revision = local_model_revision(Path(self.sampler)) if local else None
        self.completions: dict[str, tuple[list[int], list[int]]] = {}  # row id -> (prompt ids, completion ids)

    def params(self) -> dict:
        # Everything that determines what the sampler wrote: each round's store gets its own cache key.
        return {
            **super().params(),
            "prompt_template": self.cfg.template,
            "sampler": self.sampler,
            "sampler_revision": self.sampler_revision or "",
            "samples_per_prompt": self.cfg.samples_per_prompt,
            "sampling_temperature": self.cfg.sampling_temperature,
            "sampling_top_p": self.cfg.sampling_top_p,
            "max_new_tokens": self.cfg.max_new_tokens,
            "target_entry": True,  # the scored token is always among a position's entries
        }

    def build(self, doc: str) -> list[int]:
        return self.prompter.ids(self.cfg.template.replace("{text}", doc))

    def prepare(self, samples: list[Sample], done: set[str], meta, task_index: int, sampler_engine=None) -> list[Sample]:
        """The sampler draws (or a rerun reloads) N completions per prompt first: one row per completion."""
        from kdpipe.storage import cache_key

        return sample_task(self.cfg, self, samples, done, self.max_model_len, self.tok, task_index, cache_key(meta),
                           sampler_engine)

    def prompt(self, sample: Sample) -> list[int] | None:
        fitted = self.fit(sample.text, self.build, self.max_model_len - self.cfg.max_new_tokens)
        return None if fitted is None else fitted[0]

    def job(self, sample: Sample) -> Job:
        prompt, completion = self.completions[sample.id]
        seq = prompt + completion
        positions = list(range(len(prompt), len(seq)))
        (out,) = yield [Request("score", seq, positions=positions)]
        top_ids, top_lps = with_target_entry(out.top_ids, out.top_logprobs, np.asarray(completion), out.target_logprobs)
        text = self.tok.decode(completion, skip_special_tokens=True) if self.cfg.store_text else None
        return Result(sample.id, seq, positions, top_ids, top_lps, text)


def with_target_entry(top_ids: np.ndarray, top_lps: np.ndarray, targets: np.ndarray, target_lps: np.ndarray | None):
    """[P, K] teacher entries + the target token at each position -> [P, K+1] (-1 / -inf where already kept).

    The extra entry has a log-prob below every top-K entry, so rows stay sorted.
    """
    if target_lps is None:
        raise StoreError("the teacher engine returned no log-prob of the scored tokens; it cannot serve recipe 'on-policy'")
    kept = (top_ids == targets[:, None]).any(axis=1)  # [P]
    extra_ids = np.where(kept, -1, targets).astype(np.int32)[:, None]  # [P, 1]
    extra_lps = np.where(kept, -np.inf, np.minimum(target_lps, 0.0)).astype(np.float32)[:, None]
    return np.concatenate([top_ids.astype(np.int32), extra_ids], 1), np.concatenate([top_lps.astype(np.float32), extra_lps], 1)


# ----------------------------------------------------------------------------- step 1: sampling


def samples_path(store: str | Path, task_index: int) -> Path:
    return Path(store) / SAMPLES_DIR / f"task-{task_index:05d}.json"


def sample_task(cfg, recipe: OnPolicy, samples: list[Sample], done: set[str], max_model_len: int, tokenizer,
                task_index: int, cache_key: str, sampler_engine=None) -> list[Sample]:
    """Draw (or reload) this task's completions into `recipe.completions`; -> one Sample per store row.

    The sampler runs only when this task has no samples file; it is closed before returning, so the
    teacher engine starts on a free device.
    """
    path = samples_path(cfg.out, task_index)
    if path.exists():
        drawn = _load_samples(path, cache_key)
    else:
        if done:
            raise StoreError(
                f"{cfg.out}: task {task_index} has {len(done)} finished rows but no {path.relative_to(cfg.out)}, so the "
                "completions they score are unknown and sampling again could draw others; restore that file, or delete "
                f"the task's shards and tasks/task-{task_index:05d}.json to start the task over"
            )
        drawn = _draw(cfg, recipe, samples, max_model_len, tokenizer, sampler_engine)
        from kdpipe.storage.manifest import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"version": SAMPLES_VERSION, "cache_key": cache_key, "sampler": recipe.sampler,
                                 "samples": drawn})
    rows: list[Sample] = []
    for s in samples:
        for j, (prompt, completion) in enumerate(drawn.get(s.id, [])):
            if not completion:
                recipe.stats["skipped_empty_output"] += 1
                continue
            key = sample_key(s.id, j)
            recipe.completions[key] = (prompt, completion)
            rows.append(Sample(id=key, row=s.row, text=s.text, target=None))
    return rows


def _load_samples(path: Path, cache_key: str) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable samples file ({e}); delete the task's shards, task manifest and this file to redo the task") from None
    if not isinstance(doc, dict) or doc.get("version") != SAMPLES_VERSION or not isinstance(doc.get("samples"), dict):
        raise StoreError(f"{path}: not a samples file of this kdpipe (version {SAMPLES_VERSION})")
    if doc.get("cache_key") != cache_key:
        raise StoreError(f"{path}: written for another store (cache key {str(doc.get('cache_key'))[:16]}…); this store is {cache_key[:16]}…")
    return doc["samples"]


def _draw(cfg, recipe: OnPolicy, samples: list[Sample], max_model_len: int, tokenizer, engine=None) -> dict:
    """sample id -> [[prompt ids, completion ids]] * N, from the sampler under seeded requests."""
    scfg = dataclasses.replace(
        cfg, teacher=recipe.sampler, teacher_revision=None, recipe="summarize", sampler=None, codec="topk", top_p=None,
        top_k=1, max_logprobs=None, temperature=cfg.sampling_temperature,
    )
    own = engine is None
    if own:
        engine = make_engine(scfg, max_model_len, tokenizer)
    engine.top_k, engine.temperature, engine.sampling_top_p = 1, scfg.temperature, scfg.sampling_top_p
    try:
        keys: dict[int, tuple[str, int, list[int]]] = {}
        out: dict[str, list] = {}
        n = 0
        for s in samples:
            prompt = recipe.prompt(s)
            if prompt is None:
                continue
            out[s.id] = [None] * cfg.samples_per_prompt
            for j in range(cfg.samples_per_prompt):
                seed = request_seed(cfg.seed, s.id, j) if scfg.temperature > 0 else None
                engine.submit(n, Request("generate", prompt, max_new_tokens=cfg.max_new_tokens, seed=seed))
                keys[n] = (s.id, j, prompt)
                n += 1
        left = n
        while left:
            got = engine.poll()
            if not got:
                raise StoreError(f"the sampler engine ({recipe.sampler}) stopped with {left} requests unfinished; see its log above")
            for key, o in got:
                sid, j, prompt = keys.pop(key)
                gen = list(o.token_ids)
                cut = next((i for i, t in enumerate(gen) if t >= recipe.vocab_size), None)
                if cut is not None:  # a padded model row the tokenizer does not define
                    recipe.stats["cut_at_padded_id"] += 1
                    gen = gen[:cut]
                out[sid][j] = [list(map(int, prompt)), list(map(int, gen))]
                left -= 1
        recipe.stats["sampled_completions"] += n
        return out
    finally:
        if own:
            engine.close()
