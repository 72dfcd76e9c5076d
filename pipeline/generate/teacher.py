"""The teacher as phase one sees it before any engine starts: its tokenizer, its context length, the
revision of a local teacher folder, and the store meta (and so the cache key) a run records.
generate/run.py (the driver), expected_cache_key, the on-policy recipe and the jobs' round chain use it.
"""

from __future__ import annotations

from pathlib import Path

import xxhash

from kdpipe.pipeline.config import check_model_dir
from kdpipe.pipeline.context_length import model_context_length, resolve_context_length
from kdpipe.pipeline.generate.config import GenerateConfig
from kdpipe.storage import CodecConfig, StoreMeta, tokenizer_fingerprint
from kdpipe.storage.errors import ConfigError

def load_tokenizer(cfg: GenerateConfig):
    from transformers import AutoTokenizer

    check_model_dir(cfg.teacher, "teacher")  # a missing local path, not a malformed hub id
    try:
        return AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.teacher_revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # OSError, ValueError (remote code refused), ...
        raise ConfigError(
            f"teacher: cannot load a tokenizer from {cfg.teacher!r} ({type(e).__name__}: {e}); "
            "pass a local model directory or a hub id (and --trust-remote-code only if the model needs it)"
        ) from None


def resolve_max_model_len(cfg: GenerateConfig) -> int:
    """The context length used for truncation: --max-model-len, checked against the teacher's (default: the teacher's)."""
    native = model_context_length(cfg.teacher, cfg.teacher_revision, cfg.trust_remote_code, what="teacher")
    return resolve_context_length(cfg.max_model_len, {"the teacher": native})


def local_model_revision(model_dir: Path) -> str:
    """A revision for a local teacher folder, so a retrained teacher at the same path gets a new cache key.

    Hashes config.json and, per weight file, its name, size and three 1 MiB samples (start,
    middle, end): cheap for a 140 GB teacher, and any retraining rewrites those bytes.
    """
    h = xxhash.xxh3_128()
    for f in sorted(model_dir.iterdir()):
        if f.name == "config.json":
            h.update(b"config.json" + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for off in sorted({0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))}):
                    fh.seek(off)
                    h.update(fh.read(1 << 20))
    return "local:" + h.hexdigest()


# `recipe`: a recipes.base.Recipe (its params() and extra_entries); not imported, since the on-policy
# recipe imports this module.
def build_meta(cfg: GenerateConfig, tokenizer, recipe, dataset_fingerprint: str, max_model_len: int) -> StoreMeta:
    local = Path(cfg.teacher).is_dir()
    teacher = str(Path(cfg.teacher).resolve()) if local else cfg.teacher
    revision = cfg.teacher_revision or (local_model_revision(Path(cfg.teacher)) if local else None)
    return StoreMeta(
        teacher=teacher,
        teacher_revision=revision,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        recipe=cfg.recipe,
        recipe_params=recipe.params(),
        # on-policy keeps the scored token as one entry beyond the top-K (recipes/onpolicy.py)
        codec=CodecConfig(name=cfg.codec, top_k=cfg.top_k + getattr(recipe, "extra_entries", 0), top_p=cfg.top_p,
                          draws=cfg.draws, seed=cfg.seed),
        dataset_fingerprint=dataset_fingerprint,
        generation_params={
            "engine": cfg.engine,
            "dtype": cfg.dtype,
            "max_model_len": max_model_len,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "sampling_top_p": cfg.sampling_top_p,
            "seed": cfg.seed,
            "too_long": cfg.too_long,
            "logprobs_mode": "raw_logprobs",
        },
    )
