"""Store metadata, the cache key, fingerprints, and the manifests (per task, and the merged one).

The manifest is the contract readers trust: a reader refuses a store whose manifest is missing,
has an unknown format version, or points outside the store directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.storage.codecs import CodecConfig
from kdpipe.storage.errors import KdpipeError, StoreError
from kdpipe.storage.format import FORMAT_VERSION, MANIFEST_FILE, SHARD_RE


@dataclass(frozen=True)
class StoreMeta:
    """Everything that determines a store's contents (hashed into its cache key)."""

    teacher: str
    teacher_revision: str | None
    tokenizer_fingerprint: str
    vocab_size: int  # len(tokenizer)
    recipe: str
    recipe_params: dict
    codec: CodecConfig
    dataset_fingerprint: str
    generation_params: dict  # engine/sampling settings that determine contents

    @property
    def tail_known(self) -> bool:
        """False for a store imported from renormalized top-k lists (meta generation_params.tail =
        'unknown', storage/interop.py): its tail mass is unknown, so tail_mode = bucket cannot train on it."""
        return self.generation_params.get("tail") != "unknown"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["codec"] = dataclasses.asdict(self.codec)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "meta") -> "StoreMeta":
        """Parse recorded metadata, checking every field's type; StoreError naming `where` if malformed."""
        if not isinstance(d, dict) or not isinstance(d.get("codec"), dict):
            raise StoreError(f"{where}: store metadata is malformed (expected an object with a 'codec' object)")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        codec_fields = {f.name for f in dataclasses.fields(CodecConfig)}
        bad = sorted(set(d) - set(fields)) + [f"codec.{k}" for k in sorted(set(d["codec"]) - codec_fields)]
        missing = sorted(set(fields) - set(d))
        if bad or missing:
            raise StoreError(f"{where}: store metadata has unknown key(s) {bad} / lacks {missing}; was it written by another kdpipe version?")
        checks = {
            "teacher": str, "teacher_revision": (str, type(None)), "tokenizer_fingerprint": str, "vocab_size": int,
            "recipe": str, "recipe_params": dict, "dataset_fingerprint": str, "generation_params": dict,
        }
        codec_checks = {"name": str, "top_k": int, "top_p": (float, int, type(None)), "draws": int, "seed": int,
                        "sqrt_step": (float, int), "log_step": (float, int)}
        for k, t in checks.items():
            if not isinstance(d[k], t) or isinstance(d[k], bool):
                raise StoreError(f"{where}: meta.{k} has a bad value {d[k]!r}")
        for k, t in codec_checks.items():
            v = d["codec"].get(k, getattr(CodecConfig, k, None))
            if not isinstance(v, t) or isinstance(v, bool):
                raise StoreError(f"{where}: meta.codec.{k} has a bad value {v!r}")
        if not 0 < d["vocab_size"] <= 1 << 24:
            raise StoreError(f"{where}: meta.vocab_size {d['vocab_size']} is out of range")
        try:
            codec = CodecConfig(**d["codec"])
        except (KdpipeError, ValueError, TypeError) as e:
            raise StoreError(f"{where}: recorded codec is invalid ({e})") from None
        return cls(**{**d, "codec": codec})


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def cache_key(meta: StoreMeta) -> str:
    """sha256 over everything that determines a store's contents, including FORMAT_VERSION."""
    return hashlib.sha256(_canonical({"format_version": FORMAT_VERSION, "meta": meta.to_dict()}).encode()).hexdigest()


def meta_differences(recorded: Any, new: Any, prefix: str = "", limit: int = 8) -> list[str]:
    """`key.sub: old -> new` for every leaf where two store metas differ (for refusal messages)."""
    out: list[str] = []

    def short(v: Any) -> str:
        s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
        return s if len(s) <= 60 else s[:28] + "…" + s[-28:]

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b:
            out.append(f"{key or 'meta'}: {short(a)} -> {short(b)}")

    walk(recorded, json.loads(json.dumps(new, default=str)), prefix)
    return out[:limit] + ([f"… {len(out) - limit} more"] if len(out) > limit else [])


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id), special tokens and chat template."""
    vocab = tokenizer.get_vocab()
    special = {
        "all_special_tokens": list(getattr(tokenizer, "all_special_tokens", []) or []),
        "all_special_ids": list(getattr(tokenizer, "all_special_ids", []) or []),
        "bos": getattr(tokenizer, "bos_token", None),
        "eos": getattr(tokenizer, "eos_token", None),
        "pad": getattr(tokenizer, "pad_token", None),
        "unk": getattr(tokenizer, "unk_token", None),
    }
    payload = {
        "vocab": sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])),
        "len": len(tokenizer),
        "special": special,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def kdpipe_version() -> str:
    try:
        from importlib.metadata import version

        return version("kdpipe")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


# ----------------------------------------------------------------------------------------------
# files


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """.tmp + fsync + os.replace (+ directory fsync): readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_orphan_tmps(path: Path) -> list[Path]:
    """Remove `<path.name>.<pid>.tmp` files that a killed atomic_write_json left beside `path`.

    They are never read (names are pid-specific); the caller must hold the lock that makes it the
    only writer of `path`, so no live write's temp file is removed.
    """
    removed = []
    for p in path.parent.glob(f"{path.name}.*.tmp"):
        if p.name[len(path.name) + 1:-4].isdigit():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise StoreError(f"{path}: {what} is a directory, not a file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise StoreError(f"{path}: {what} is not valid JSON ({str(e)[:100]}); the file is corrupted, rerun the step that wrote it") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: {what} must be a JSON object")
    return obj


def check_format_version(obj: dict[str, Any], path: Path) -> None:
    v = obj.get("format_version")
    if v != FORMAT_VERSION:
        raise StoreError(
            f"{path}: unknown store format version {v!r} (this kdpipe reads version {FORMAT_VERSION}); "
            "use the kdpipe version that wrote the store or regenerate it"
        )


# Shard checksums: xxh3-128 (~10x faster than sha256 here, so checking every shard on first
# open stays cheap next to decoding it); the "algo:" prefix lets readers check older stores.
CHECKSUM_ALGO = "xxh3_128"


def _hasher(algo: str):
    if algo == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algo == "sha256":
        return hashlib.sha256()
    raise StoreError(f"unknown checksum algorithm {algo!r} (known: xxh3_128, sha256)")


def file_checksum(path: Path, algo: str = CHECKSUM_ALGO, chunk: int = 1 << 20) -> str:
    """'<algo>:<hex digest>' of a file's bytes."""
    h = _hasher(algo)
    buf = bytearray(chunk)  # one reused buffer: fresh 1 MB blocks per read cost more than hashing
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return f"{algo}:{h.hexdigest()}"


def checksum_matches(path: Path, expected: str) -> tuple[bool, str]:
    """Recompute a file's checksum with the algorithm named in `expected` -> (match, got)."""
    algo = expected.split(":", 1)[0] if ":" in expected else "sha256"
    got = file_checksum(path, algo)
    return got == expected, got


# Older name, kept for callers that recompute a shard's checksum (it uses the store's algorithm).
file_sha256 = file_checksum


def resolve_shard(store_dir: Path, name: Any, where: Path) -> Path:
    """A shard named by a manifest, refused unless it is a plain shard file inside the store."""
    if not isinstance(name, str) or not SHARD_RE.fullmatch(name) or os.sep in name or "/" in name or "\0" in name:
        raise StoreError(f"{where}: shard entry {name!r} is not a shard file name (shard-tNNNNN-sNNNNNN.arrow); refusing it")
    root = store_dir.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise StoreError(f"{where}: shard {name!r} resolves outside the store directory {root}; refusing it")
    return path


# ----------------------------------------------------------------------------------------------
# the merged manifest


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    target_tokens: int
    bytes: int
    checksum: str
    batch_rows: tuple[int, ...]  # rows of each record batch, in order (for seeking)
    task: int
    path: Path = field(compare=False, repr=False, default=Path())

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "rows": self.rows, "target_tokens": self.target_tokens, "bytes": self.bytes,
            "checksum": self.checksum, "batch_rows": list(self.batch_rows), "task": self.task,
        }


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def shard_from_dict(d: Any, store_dir: Path, where: Path) -> ShardInfo:
    """One shard entry of a (task) manifest, every field checked; StoreError naming `where`."""
    if not isinstance(d, dict):
        raise StoreError(f"{where}: shard entry {str(d)[:80]!r} is not an object")
    name = d.get("file")
    path = resolve_shard(store_dir, name, where)
    for k in ("rows", "target_tokens", "bytes", "task"):
        if not _int(d.get(k)):
            raise StoreError(f"{where}: shard {name}: field {k!r} is missing or not a non-negative integer ({d.get(k)!r})")
    checksum = d.get("checksum")
    if not isinstance(checksum, str) or checksum.split(":", 1)[0] not in ("xxh3_128", "sha256") or ":" not in checksum:
        raise StoreError(f"{where}: shard {name}: bad checksum {str(checksum)[:80]!r}")
    batch_rows = d.get("batch_rows")
    if not isinstance(batch_rows, list) or not all(_int(x) for x in batch_rows):
        raise StoreError(f"{where}: shard {name}: batch_rows must be a list of row counts")
    info = ShardInfo(file=name, rows=d["rows"], target_tokens=d["target_tokens"], bytes=d["bytes"], checksum=checksum,
                     batch_rows=tuple(batch_rows), task=d["task"], path=path)
    if sum(info.batch_rows) != info.rows:
        raise StoreError(f"{where}: shard {info.file}: batch_rows add up to {sum(info.batch_rows)}, not rows={info.rows}")
    if int(SHARD_RE.match(name).group(1)) != info.task:
        raise StoreError(f"{where}: shard {name} is recorded under task {info.task}, but its name belongs to another task")
    return info


@dataclass(frozen=True)
class TaskManifest:
    task_index: int
    num_tasks: int
    complete: bool
    shards: tuple[ShardInfo, ...]


def load_task_manifest(path: Path, store_dir: Path, key: str) -> TaskManifest:
    """Read and check a task manifest (tasks/task-NNNNN.json); StoreError naming it if malformed."""
    m = read_json(path, "task manifest")
    check_format_version(m, path)
    if m.get("cache_key") != key:
        raise StoreError(f"{path}: task manifest belongs to another store configuration (cache key differs from meta.json)")
    t, n, complete, shards = m.get("task_index"), m.get("num_tasks"), m.get("complete"), m.get("shards")
    if not _int(t) or not _int(n) or not 0 <= t < n or not isinstance(complete, bool) or not isinstance(shards, list):
        raise StoreError(f"{path}: task manifest is malformed (task_index={t!r}, num_tasks={n!r}, complete={complete!r}, "
                         f"shards {type(shards).__name__}); delete it and rerun the task")
    if path.name != f"task-{t:05d}.json":
        raise StoreError(f"{path}: records task_index {t}, which does not match its file name")
    infos = tuple(shard_from_dict(s, store_dir, path) for s in shards)
    names = [i.file for i in infos]
    if len(set(names)) != len(names):
        raise StoreError(f"{path}: lists a shard twice")
    for i in infos:
        if i.task != t:
            raise StoreError(f"{path}: task {t} claims shard {i.file}, which belongs to task {i.task}")
    return TaskManifest(task_index=t, num_tasks=n, complete=complete, shards=infos)


@dataclass(frozen=True)
class StoreManifest:
    """A parsed, checked manifest.json of a finalized store."""

    store_dir: Path
    meta: StoreMeta
    cache_key: str
    shards: tuple[ShardInfo, ...]
    num_sequences: int
    num_target_tokens: int
    num_tasks: int
    kdpipe_version: str
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def codec(self) -> CodecConfig:
        return self.meta.codec

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def open_store(store_dir: str | os.PathLike) -> StoreManifest:
    """Parse and check a finalized store's manifest.json (no shard is read)."""
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise StoreError(f"{store_dir}: store directory not found")
    path = store_dir / MANIFEST_FILE
    if not path.exists():
        hint = "run `kdpipe finalize` once every task is done" if (store_dir / "tasks").is_dir() else "is this a kdpipe store?"
        raise StoreError(f"{path}: manifest not found; the store is not finalized ({hint})")
    raw = read_json(path, "store manifest")
    check_format_version(raw, path)
    if "meta" not in raw or "cache_key" not in raw or "shards" not in raw:
        raise StoreError(f"{path}: store manifest lacks meta/cache_key/shards; regenerate it with `kdpipe finalize`")
    meta = StoreMeta.from_dict(raw["meta"], where=str(path))
    key = raw["cache_key"]
    if key != cache_key(meta):
        raise StoreError(f"{path}: cache_key does not match the recorded metadata; the manifest was edited or corrupted")
    shards_raw = raw["shards"]
    if not isinstance(shards_raw, list):
        raise StoreError(f"{path}: 'shards' must be a list")
    shards = tuple(shard_from_dict(s, store_dir, path) for s in shards_raw)
    seen: dict[str, int] = {}
    for s in shards:
        if s.file in seen:
            raise StoreError(f"{path}: shard {s.file} is listed twice (tasks {seen[s.file]} and {s.task})")
        seen[s.file] = s.task
    n_seq = sum(s.rows for s in shards)
    n_tok = sum(s.target_tokens for s in shards)
    # (num_sequences / num_target_tokens / bytes at the top level are summaries for people; the
    # counts used are the shards'. A shard dropped from the list is caught below: its file stays.)
    num_tasks = raw.get("num_tasks")
    if not _int(num_tasks) or num_tasks < 1 or any(s.task >= num_tasks for s in shards):
        raise StoreError(f"{path}: num_tasks {num_tasks!r} is invalid for the listed shards")
    if n_seq == 0:
        raise StoreError(f"{path}: the store is empty (no sequences); regenerate it from a non-empty dataset")
    unlisted = sorted(p.name for p in store_dir.glob("shard-*.arrow") if p.name not in seen)
    if unlisted:
        raise StoreError(f"{path}: shard file(s) {', '.join(unlisted[:3])} are in the store but not in its manifest; "
                         "if tasks were rerun after finalizing, run `kdpipe finalize` again")
    return StoreManifest(
        store_dir=store_dir, meta=meta, cache_key=key, shards=shards, num_sequences=n_seq,
        num_target_tokens=n_tok, num_tasks=num_tasks,
        kdpipe_version=str(raw.get("kdpipe_version", "unknown")), raw=raw,
    )
