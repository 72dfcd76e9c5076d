"""`--dtype auto`, resolved before an engine starts, so the stored log-probs say what computed them.

vLLM's own "auto" may run a float32 checkpoint in bfloat16 (on CPU too, where bf16 is emulated),
which changes every stored log-prob while the store recorded only "auto". kdpipe therefore
resolves "auto" itself, passes the result to the engine explicitly and records the resolved
name in the store meta (part of the cache key) and in every resolved config:

  * on CPU: float32 (bf16/fp16 are emulated there: slower and less exact);
  * on a GPU: the checkpoint's own dtype (config.json `torch_dtype` / `dtype`), float32 when it
    states none.
"""

from __future__ import annotations

from kdpipe.storage.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def _name(value) -> str | None:
    if value is None:
        return None
    s = str(value).removeprefix("torch.")
    return {"float": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16", "fp32": "float32"}.get(s, s)


def checkpoint_dtype(model: str, revision: str | None = None, trust_remote_code: bool = False) -> str | None:
    """The dtype a checkpoint's config.json states (None when it states none)."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"cannot read the model config of {model!r} to resolve --dtype auto ({type(e).__name__}: {e}); "
                          "pass --dtype float32|bfloat16|float16") from None
    text = getattr(mc, "text_config", None)
    for c in (mc, text):
        for key in ("torch_dtype", "dtype"):
            name = _name(getattr(c, key, None)) if c is not None else None
            if name in DTYPES:
                return name
    return None


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(dtype: str, model: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """`dtype` unless it is "auto": then float32 on CPU, the checkpoint's dtype (or float32) on a GPU."""
    if dtype != "auto":
        return dtype
    if not on_gpu():
        return "float32"
    return checkpoint_dtype(model, revision, trust_remote_code) or "float32"
