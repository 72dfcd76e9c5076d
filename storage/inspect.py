"""inspect_store: a store's summary, and with verify=True a full re-check of every shard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdpipe.storage.errors import StoreError
from kdpipe.storage.manifest import checksum_matches, open_store


# How the entropy figures are estimated (printed by `inspect`, recorded in --json).
ENTROPY_HOW = (
    "per position over the kept entries plus the tail mass; lower bound = the tail as one category, "
    "upper bound = the tail spread evenly over the vocabulary ids not kept"
)


def _stats(rec_counts, rec_mass, rec_ent, counts, lp, tail, vocab_size: int = 0, rec_ent_hi=None) -> None:
    """Per position: entries kept, kept mass, and the teacher entropy bounds (tail included, see ENTROPY_HOW).

    The true entropy H = -Σ_kept p log p + H_tail, where the tail's t = 1 - Σ p_kept spreads over the
    V - n ids not kept in some unknown way: H_tail lies between -t log t (all on one id) and
    -t log t + t log(V - n) (uniform over them).
    """
    valid = np.isfinite(lp)
    p = np.where(valid, np.exp(lp.astype(np.float64)), 0.0)  # [P, K]
    rec_counts.append(counts.astype(np.int64))
    rec_mass.append(p.sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=1)  # [P]
        t = np.clip(tail.astype(np.float64), 0.0, 1.0)  # [P]
        h += np.where(t > 0, -t * np.log(np.where(t > 0, t, 1.0)), 0.0)
    rec_ent.append(h)
    if rec_ent_hi is not None:
        rest = np.maximum(vocab_size - valid.sum(axis=1), 1)  # ids outside the kept entries
        rec_ent_hi.append(h + t * np.log(rest))


def inspect_store(store_dir: str | os.PathLike, verify: bool = False, sample_rows: int = 4096) -> dict[str, Any]:
    """Summary of a finalized store; verify=True re-checks every shard (checksum, schema, columns).

    Shard problems are collected (not raised) into report["problems"] and report["ok"] is False;
    a missing/unreadable manifest raises StoreError. Entry statistics come from the first
    `sample_rows` rows (all rows when verifying).
    """
    m = open_store(store_dir)
    codec = m.meta.codec
    problems: list[dict[str, str]] = []
    counts_l: list = []
    mass_l: list = []
    ent_l: list = []
    ent_hi_l: list = []
    seen = 0
    from kdpipe.storage.reader import DecodedBatch, check_schema

    for s in m.shards:
        if not verify and seen >= sample_rows:
            break
        path = s.path
        if not path.exists():
            problems.append({"shard": s.file, "problem": "file is missing"})
            continue
        size = path.stat().st_size
        if size != s.bytes:
            problems.append({"shard": s.file, "problem": f"{size} bytes, the manifest says {s.bytes} (truncated or replaced)"})
            continue
        if verify:
            ok, got = checksum_matches(path, s.checksum)
            if not ok:
                problems.append({"shard": s.file, "problem": f"checksum mismatch ({got} != manifest {s.checksum}); the file is corrupted"})
                continue
        try:
            with pa.OSFile(str(path), "rb") as f:
                reader = pa.ipc.open_file(f)
                check_schema(reader.schema, codec, m.meta.vocab_size, path)
                if reader.num_record_batches != len(s.batch_rows):
                    raise StoreError(f"{reader.num_record_batches} record batches, the manifest says {len(s.batch_rows)}")
                rows = tokens = 0
                for i in range(reader.num_record_batches):
                    if not verify and seen >= sample_rows:
                        break
                    b = reader.get_batch(i)
                    rows += b.num_rows
                    tokens += int(np.diff(b.column("target_positions").offsets.to_numpy()).sum())
                    db = DecodedBatch(b, m.meta, f"record batch {i}")  # checks the columns
                    for j in range(b.num_rows):
                        if not verify and seen >= sample_rows:
                            break
                        rec = db.record(j)
                        _stats(counts_l, mass_l, ent_l, db._get("num_entries", j), rec.logprobs, rec.tail,
                               m.meta.vocab_size, ent_hi_l)
                        seen += 1
                if verify and (rows != s.rows or tokens != s.target_tokens):
                    raise StoreError(f"holds {rows} rows / {tokens} target tokens, the manifest says {s.rows} / {s.target_tokens}")
        except StoreError as e:
            problems.append({"shard": s.file, "problem": str(e).replace(f"{path}: ", "")})
        except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError, IndexError) as e:
            problems.append({"shard": s.file, "problem": f"unreadable ({type(e).__name__}: {e})"})

    if verify:
        from kdpipe.storage.tokenizer_files import verify_tokenizer_files

        problems += [{"shard": "teacher_tokenizer", "problem": p} for p in verify_tokenizer_files(store_dir, m.raw.get("teacher_tokenizer"))]

    def mean(parts: list) -> float | None:
        return float(np.concatenate(parts).mean()) if parts and sum(len(p) for p in parts) else None

    meta = m.meta
    return {
        "store": str(Path(store_dir)),
        "ok": not problems,
        "verified": verify,
        "format_version": m.raw.get("format_version"),
        "cache_key": m.cache_key,
        "teacher": meta.teacher,
        "teacher_revision": meta.teacher_revision,
        "recipe": meta.recipe,
        "codec": codec.name,
        "top_k": codec.top_k,
        "top_p": codec.top_p,
        "draws": codec.draws if codec.name == "sampled" else None,
        "shards": len(m.shards),
        "sequences": m.num_sequences,
        "target_tokens": m.num_target_tokens,
        "bytes": m.bytes,
        "bytes_per_token": m.bytes / max(1, m.num_target_tokens),
        "mean_entries_per_position": mean(counts_l),
        "mean_kept_mass": mean(mass_l),
        "teacher_entropy_nats": mean(ent_l),  # lower bound (tail as one category), see ENTROPY_HOW
        "teacher_entropy_nats_upper": mean(ent_hi_l),
        "teacher_entropy_how": ENTROPY_HOW,
        "stats_rows": seen,
        "teacher_tokenizer": "teacher_tokenizer" in m.raw,
        "imported_from": meta.generation_params.get("imported_from"),  # kdpipe import (storage/interop.py)
        "tail": meta.generation_params.get("tail", "exact"),  # "unknown": renormalized source, no tail_mode = bucket
        "problems": problems,
    }


def format_report(r: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    codec = r["codec"] + (f" k={r['top_k']}" if r["codec"] == "topk" else f" N={r['draws']} from top-{r['top_k']}")
    if r["top_p"] is not None:
        codec += f" p={r['top_p']}"
    rows = [
        ("store", r["store"]),
        ("teacher", f"{r['teacher']}" + (f" @ {r['teacher_revision']}" if r["teacher_revision"] else "")),
        ("recipe", r["recipe"] + (f" (imported from {r['imported_from']}, tail {r['tail']})" if r.get("imported_from") else "")),
        ("codec", codec),
        ("cache key", r["cache_key"][:16] + "…"),
        ("shards", f(r["shards"])),
        ("sequences", f(r["sequences"])),
        ("target tokens", f(r["target_tokens"])),
        ("bytes", f(r["bytes"])),
        ("bytes / target token", f(r["bytes_per_token"])),
        ("mean entries / position", f(r["mean_entries_per_position"])),
        ("mean kept mass", f(r["mean_kept_mass"])),
        ("teacher entropy (nats)", f"{f(r['teacher_entropy_nats'])} .. {f(r.get('teacher_entropy_nats_upper'))} "
         "(kept entries + tail: tail as one category .. spread evenly over the other ids)"),
        ("verified", "yes" if r["verified"] else "no (use --verify)"),
        ("ok", "yes" if r["ok"] else "NO"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    for p in r["problems"]:
        lines.append(f"BAD SHARD {p['shard']}: {p['problem']}")
    return "\n".join(lines)
