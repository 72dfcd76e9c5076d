"""A model's own context length, read from its config: what phase one and evaluate default to.

Shared by phase one (the teacher's `--max-model-len`) and evaluate (every model's engine), which do
not import each other. vLLM refuses a `max_model_len` above the model's with a long pydantic trace;
checking it here turns that into a one-line error before any engine starts.
"""

from __future__ import annotations

from kdpipe.pipeline.config import check_model_dir
from kdpipe.storage.errors import ConfigError

# Keys of a model config that give its context length, in the order vLLM consults them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length", "n_ctx")


def model_context_length(model: str, revision: str | None = None, trust_remote_code: bool = False,
                         what: str = "model") -> int | None:
    """The context length `model`'s config states (None when it states none); `what` names it in errors."""
    from transformers import AutoConfig

    check_model_dir(model, what)  # a missing path or an unreachable hub id: one line, before the loader's retries
    try:
        mc = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{what}: cannot read the model config of {model!r} ({type(e).__name__}: {e})") from None
    mc = getattr(mc, "text_config", None) or mc
    return next((int(v) for k in CONTEXT_KEYS if isinstance(v := getattr(mc, k, None), int) and v > 0), None)


def resolve_context_length(requested: int | None, natives: dict[str, int | None]) -> int:
    """`requested` (--max-model-len) checked against each model's own length; None = the smallest of them.

    natives: label -> that model's own length (None when its config states none); a label reads in a sentence
    ("the teacher", "model 'kd' (run/final)").
    """
    known = {label: v for label, v in natives.items() if v is not None}
    if requested is not None:
        over = sorted((v, label) for label, v in known.items() if requested > v)
        if over:
            native, label = over[0]
            raise ConfigError(f"max_model_len={requested} is above {label}'s context length {native}; lower "
                              f"--max-model-len (or leave it unset: {min(known.values())})")
        return requested
    missing = [label for label, v in natives.items() if v is None]
    if missing:
        raise ConfigError(f"{missing[0]} does not state its context length; pass --max-model-len")
    return min(known.values())
