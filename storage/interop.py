"""kdpipe stores in other tools' formats: export to Parquet and axolotl's KD layout, import them back,
and vLLM log-prob responses. Store-API code: phase one and phase two never see it.

Export (`kdpipe export STORE OUT --format parquet|axolotl`, storage/interop_export.py) reads a finalized store through
StoreReader (checksums verified) and writes OUT/data-NNNNN.parquet only, so that
`pandas.read_parquet(OUT)` and `datasets.load_dataset("parquet", data_dir=OUT)` read the folder as
it is. The store's cache key and meta (what an import carries over) ride in every file's Parquet
schema metadata, key `kdpipe_meta` (exports before that wrote OUT/kdpipe_meta.json; still read).
One row per sequence:

    parquet  sample_id, text, input_ids [L], target_positions [P], target_token_ids [P][K_p],
             target_logprobs [P][K_p] (log p̂ of the full-vocabulary distribution), tail_mass [P]
             (named so it does not shadow pandas' Series.tail; an import also reads the old `tail`)
    axolotl  the pre-tokenized KD rows axolotl's KD collator and loss take (axolotl 0.18.0,
             src/axolotl/integrations/kd/): input_ids, attention_mask, labels [L] (-100 off
             target), target_token_ids / target_logprobs / target_mask [L][K]. Row t holds the
             teacher's distribution of the *next* token, input_ids[t+1] (axolotl pairs the hidden
             state at t with it), so kdpipe target position p lands in row p-1; rows without a
             target have mask 0, ids 0..K-1 and log-prob -inf (as axolotl pads). The log-probs are
             the teacher's own (not renormalized); plus a sample_id column (the HF Trainer drops
             columns the model does not take) and the store's text.

Import (`kdpipe import SRC STORE --format vllm-logprobs|axolotl|parquet --tokenizer TOK`) validates the
whole source first (nothing is written if a row is bad), then writes it through ShardWriter (checksums,
task manifest, resume: a rerun skips stored sample ids), saves TOK's files as STORE/teacher_tokenizer/
(as phase one does) and finalizes the store. The tail is
computed from the given log-probs exactly as phase one does: the entries go to the codec, which
keeps the top-k and stores 1 - Σ p of what it kept. A source whose lists are renormalized (Σ p = 1
at every position, or --tail unknown) has no knowable tail: its meta records
generation_params.tail = "unknown", and train-student refuses tail_mode = bucket on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kdpipe.storage.errors import DataError

EXPORT_FORMATS = ("parquet", "axolotl")
IMPORT_FORMATS = ("vllm-logprobs", "axolotl", "parquet")
TAIL_MODES = ("auto", "exact", "unknown")
META_SIDE_FILE = "kdpipe_meta.json"  # exports before the meta moved into the schema metadata
META_KEY = b"kdpipe_meta"  # Parquet schema metadata key of an export's cache key and meta
AXOLOTL_VERSION = "0.18.0"  # the axolotl release whose src/axolotl/integrations/kd/ layout is followed
LOGPROB_SLACK = 1e-5  # log-probs up to this above 0 are rounding (clipped to 0); more is refused
RENORMALIZED_SLACK = 1e-5  # |Σ p - 1| at every position below this: the lists were renormalized


# ----------------------------------------------------------------------------------------------
# import: sources -> validated samples


@dataclass
class Sample:
    sample_id: str
    input_ids: np.ndarray  # [L] int64
    positions: np.ndarray  # [P] int64
    entries: list[tuple[np.ndarray, np.ndarray]]  # per position: ids [k], log-probs [k] (full-vocabulary)
    text: str | None = None


def _files(src: Path, exts: tuple[str, ...]) -> list[Path]:
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in exts and p.name != META_SIDE_FILE)
        if not files:
            raise DataError(f"{src}: no {'/'.join(exts)} files in this folder")
        return files
    if not src.is_file():
        raise DataError(f"{src}: import source not found")
    return [src]


def _check_entries(where: str, t: int, ids: np.ndarray, lps: np.ndarray, vocab: int) -> np.ndarray:
    """One position's entries: refuse duplicates, ids outside the vocabulary, NaN and log-probs > 0.

    -inf is kept: it means p = 0, as in the codec (the entry carries no mass and is not stored; the
    tail is 1 - Σ p; a position whose entries are all -inf is stored with 0 entries and tail 1)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise DataError(f"{where}: position {t}: token id {bad} is outside the tokenizer's vocabulary [0, {vocab}); "
                        "give the tokenizer the source was made with (--tokenizer)")
    if len(np.unique(ids)) != len(ids):
        vals, counts = np.unique(ids, return_counts=True)
        raise DataError(f"{where}: position {t}: token id {int(vals[counts > 1][0])} is listed twice; deduplicate the entries")
    if np.isnan(lps).any():
        raise DataError(f"{where}: position {t}: a log-prob is NaN")
    if lps.size and lps.max() > LOGPROB_SLACK:
        raise DataError(f"{where}: position {t}: log-prob {float(lps.max()):.6g} > 0 is not a log-probability "
                        "(give natural-log probabilities, as vLLM returns them)")
    return np.minimum(lps, 0.0)


def _json_values(path: Path) -> Iterator[tuple[int, Any]]:
    """(row, value) of a .jsonl file (one value per line) or a .json file (one value or a list)."""

    def no_dupes(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise _DuplicateKey(dup)
        return dict(pairs)

    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for i, line in enumerate(f):
                if line.strip():
                    yield i, _loads(line, no_dupes, f"{path}: line {i + 1}")
            return
        value = _loads(f.read(), no_dupes, str(path))
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        yield i, v


class _DuplicateKey(ValueError):
    pass


def _loads(text: str, hook, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=hook)
    except _DuplicateKey as e:
        raise DataError(f"{where}: token id {e.args[0]} is listed twice at one position (duplicate key); "
                        "deduplicate the entries") from None
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None


def _vllm_choices(obj: Any, where: str) -> Iterator[tuple[str, dict, Any]]:
    """A completion response (or a bare choice) -> (sample id, choice, model name)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a completion response object, got {type(obj).__name__}")
    choices = obj.get("choices")
    if choices is None and ("prompt_logprobs" in obj or "logprobs" in obj):
        choices, obj = [obj], {**obj, "id": obj.get("id")}
    if not isinstance(choices, list) or not choices:
        raise DataError(f"{where}: no 'choices' with prompt_logprobs / logprobs (request prompt_logprobs=K or "
                        "logprobs=K from vLLM's completions endpoint)")
    for c in choices:
        if not isinstance(c, dict):
            raise DataError(f"{where}: a choice is not an object")
        if "prompt_token_ids" not in c and "prompt_token_ids" in obj:  # chat responses keep them on the response
            c = {**c, "prompt_token_ids": obj["prompt_token_ids"]}
        sid = obj.get("sample_id") or c.get("sample_id")
        if sid is None:
            sid = f"{obj.get('id')}-{c.get('index', 0)}" if obj.get("id") else None
        yield sid, c, obj.get("model")


def _token_id(key: Any, where: str) -> int:
    """A completion log-prob key: "token_id:123" (return_tokens_as_token_ids) or a plain integer."""
    k = str(key)
    try:
        return int(k.split(":", 1)[1]) if k.startswith("token_id:") else int(k)
    except ValueError:
        raise DataError(f"{where}: token {k!r} is text, not a token id; request the log-probs with "
                        "return_tokens_as_token_ids=true") from None


def _completion_logprobs(c: dict, where: str) -> tuple[list[int] | None, list[Any]]:
    """The generated part of a choice -> (its token ids or None, per position {id: logprob})."""
    lp = c.get("logprobs")
    if lp is None:
        return None, []
    if not isinstance(lp, dict):
        raise DataError(f"{where}: logprobs must be an object")
    if isinstance(lp.get("content"), list):  # chat completions: content[i] = {token, logprob, top_logprobs: [...]}
        tokens, tops = [], []
        for i, item in enumerate(lp["content"]):
            tokens.append(_token_id(item.get("token"), f"{where}: generated token {i}"))
            entries = item.get("top_logprobs") or []
            keys = [_token_id(e.get("token"), f"{where}: generated token {i}") for e in entries]
            if len(set(keys)) != len(keys):
                dup = next(k for k in keys if keys.count(k) > 1)
                raise DataError(f"{where}: generated token {i}: token id {dup} is listed twice; deduplicate the entries")
            tops.append({k: e.get("logprob") for k, e in zip(keys, entries)})
        return tokens, tops
    tops = lp.get("top_logprobs")
    toks = lp.get("tokens")
    if not isinstance(tops, list):
        raise DataError(f"{where}: logprobs.top_logprobs must be a list (request logprobs=K)")
    tokens = c.get("token_ids")
    if tokens is None and isinstance(toks, list):
        tokens = [_token_id(t, f"{where}: logprobs.tokens") for t in toks]
    if isinstance(toks, list) and len(toks) != len(tops):
        raise DataError(f"{where}: logprobs.tokens has {len(toks)} entries but top_logprobs {len(tops)}; the "
                        "per-position lists are inconsistent")
    return tokens, [None if t is None else {_token_id(k, f"{where}: generated token {i}"): v for k, v in t.items()}
                    for i, t in enumerate(tops)]


def _parse_vllm(path: Path, row: int, obj: Any, vocab: int, top_k: int | None) -> Iterator[Sample]:
    """One response: prompt_logprobs (with prompt_token_ids) and/or the completion's logprobs (with the
    generated token ids) -> one sequence, prompt + completion, with a target at every scored position."""
    for j, (sid, c, _) in enumerate(_vllm_choices(obj, f"{path}: row {row}")):
        where = f"{path}: row {row}" + (f" choice {j}" if j else "")
        tokens, plp = c.get("prompt_token_ids"), c.get("prompt_logprobs")
        gen_tokens, gen_lp = _completion_logprobs(c, where)
        if plp is not None and (not isinstance(tokens, list) or not isinstance(plp, list)):
            raise DataError(f"{where}: prompt_logprobs needs the prompt_token_ids list (vLLM: return_token_ids=true)")
        if plp is not None and len(plp) != len(tokens):
            raise DataError(f"{where}: prompt_logprobs has {len(plp)} positions but prompt_token_ids {len(tokens)}; "
                            "the per-position lists are inconsistent")
        if gen_lp and (not isinstance(gen_tokens, list) or len(gen_tokens) != len(gen_lp)):
            raise DataError(f"{where}: the completion has {len(gen_lp)} log-prob positions but "
                            f"{len(gen_tokens) if isinstance(gen_tokens, list) else 'no'} token ids (vLLM: "
                            "return_token_ids=true); the per-position lists are inconsistent")
        if plp is None and not gen_lp:
            raise DataError(f"{where}: neither prompt_logprobs nor logprobs (request prompt_logprobs=K or logprobs=K "
                            "from vLLM's completions endpoint)")
        prompt = list(tokens) if isinstance(tokens, list) else []
        if gen_lp and not prompt:
            raise DataError(f"{where}: completion log-probs need the prompt_token_ids (vLLM: return_token_ids=true)")
        ids_all = np.asarray(prompt + list(gen_tokens or []), dtype=np.int64)
        if ids_all.size and (ids_all.min() < 0 or ids_all.max() >= vocab):
            raise DataError(f"{where}: the token ids hold id {int(ids_all.max())} outside the tokenizer's "
                            f"vocabulary [0, {vocab}); give the tokenizer the source was made with (--tokenizer)")
        scored = list(enumerate(plp or [])) + [(len(prompt) + i, p) for i, p in enumerate(gen_lp)]
        positions, entries = [], []
        for t, pos in scored:
            if pos is None:
                continue
            if t == 0:
                raise DataError(f"{where}: position 0 has log-probs, but nothing predicts the first token")
            if not isinstance(pos, dict) or not pos:
                raise DataError(f"{where}: position {t}: expected a mapping token id -> {{logprob, rank, decoded_token}}")
            try:
                ids = np.asarray([int(k) for k in pos], dtype=np.int64)
                vals = [v["logprob"] if isinstance(v, dict) else v for v in pos.values()]
                lps = np.asarray([float(v) for v in vals], dtype=np.float64)
                ranks = [v.get("rank") if isinstance(v, dict) else None for v in pos.values()]
            except (TypeError, ValueError, KeyError):
                raise DataError(f"{where}: position {t}: entries must map an integer token id to "
                                "{\"logprob\": float, \"rank\": int, ...}") from None
            lps = _check_entries(where, t, ids, lps, vocab)
            if top_k is not None:
                # vLLM lists the actual token too when it is outside the top-K (rank > K): phase one keeps exactly the top-K
                if all(r is not None for r in ranks):
                    keep = np.asarray(ranks) <= top_k
                else:
                    keep = np.zeros(len(ids), dtype=bool)
                    keep[np.argsort(-lps, kind="stable")[:top_k]] = True
                ids, lps = ids[keep], lps[keep]
            positions.append(t)
            entries.append((ids, lps))
        if not positions:
            raise DataError(f"{where}: no position has log-probs")
        yield Sample(str(sid) if sid is not None else f"{path.stem}-{row}-{j}", ids_all, np.asarray(positions), entries,
                     c.get("text") if isinstance(c.get("text"), str) else None)


def _unreadable_parquet(path: Path, e: Exception) -> DataError:
    msg = (str(e).splitlines() or [""])[0][:160]
    return DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {msg}); give a complete .parquet "
                     "file (a truncated copy, or another format renamed, reads like this)")


def _parquet_values(path: Path) -> Iterator[tuple[int, dict]]:
    """(row, dict) of a Parquet file; an unreadable file is a one-line DataError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for r in batch.to_pylist():
                yield i, r
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise _unreadable_parquet(path, e) from None


def _axolotl_rows_of(path: Path) -> Iterator[tuple[int, dict]]:
    yield from (_parquet_values(path) if path.suffix == ".parquet" else _json_values(path))


def _parse_axolotl(path: Path, row: int, r: Any, vocab: int, top_k: int | None) -> Iterator[Sample]:
    where = f"{path}: row {row}"
    if not isinstance(r, dict):
        raise DataError(f"{where}: expected an object with input_ids, target_token_ids, target_logprobs, target_mask")
    missing = [k for k in ("input_ids", "target_token_ids", "target_logprobs", "target_mask") if k not in r]
    if missing and "target_positions" in r:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}: these are kdpipe's Parquet export columns "
                        "(target_positions), not axolotl's; import them with --format parquet")
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)} (axolotl's pre-tokenized KD rows)")
    input_ids = np.asarray(r["input_ids"], dtype=np.int64)
    L = len(input_ids)
    if L and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise DataError(f"{where}: input_ids holds id {int(input_ids.max())} outside the tokenizer's vocabulary "
                        f"[0, {vocab}); give the tokenizer the source was made with (--tokenizer)")
    tids, tlps, tmask = r["target_token_ids"], r["target_logprobs"], r["target_mask"]
    lens = {"input_ids": L, "target_token_ids": len(tids), "target_logprobs": len(tlps), "target_mask": len(tmask)}
    if len(set(lens.values())) != 1:
        raise DataError(f"{where}: the per-position lists are inconsistent (lengths {lens}); each holds one entry "
                        "per input token")
    positions, entries = [], []
    for t in range(L):
        ids_t, lp_t, m_t = tids[t], tlps[t], tmask[t]
        if not (len(ids_t) == len(lp_t) == len(m_t)):
            raise DataError(f"{where}: position {t}: target_token_ids has {len(ids_t)} entries, target_logprobs "
                            f"{len(lp_t)}, target_mask {len(m_t)}; the per-position lists are inconsistent")
        keep = np.asarray(m_t, dtype=bool)
        if not keep.any():
            continue
        if t + 1 >= L:
            raise DataError(f"{where}: position {t}: row {t} holds the next token's distribution, but the sequence "
                            f"ends at {L - 1}; mask that row (target_mask 0 at row {t})")
        ids = np.asarray(ids_t, dtype=np.int64)[keep]
        lps = _check_entries(where, t, ids, np.asarray(lp_t, dtype=np.float64)[keep], vocab)
        if top_k is not None and len(ids) > top_k:
            order = np.argsort(-lps, kind="stable")[:top_k]
            ids, lps = ids[order], lps[order]
        positions.append(t + 1)  # row t describes p(input_ids[t+1] | input_ids[:t+1])
        entries.append((ids, lps))
    if not positions:
        raise DataError(f"{where}: target_mask is 0 everywhere: the row has no teacher targets")
    sid = r.get("sample_id")
    text = r.get("text")
    yield Sample(str(sid) if sid is not None else f"{path.stem}-{row}", input_ids, np.asarray(positions), entries,
                 text if isinstance(text, str) else None)


def _parse_parquet(path: Path, row: int, r: Any, vocab: int, top_k: int | None) -> Iterator[Sample]:
    """A row of `kdpipe export --format parquet`: per target position its ids and log-probs."""
    where = f"{path}: row {row}"
    cols = ("input_ids", "target_positions", "target_token_ids", "target_logprobs")
    missing = [k for k in cols if not isinstance(r, dict) or k not in r]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)} (kdpipe's Parquet export: "
                        f"{', '.join(cols)}; axolotl rows take --format axolotl)")
    input_ids = np.asarray(r["input_ids"], dtype=np.int64)
    L = len(input_ids)
    if L and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise DataError(f"{where}: input_ids holds id {int(input_ids.max())} outside the tokenizer's vocabulary "
                        f"[0, {vocab}); give the tokenizer the source was made with (--tokenizer)")
    positions = np.asarray(r["target_positions"], dtype=np.int64)
    tids, tlps = r["target_token_ids"], r["target_logprobs"]
    lens = {"target_positions": len(positions), "target_token_ids": len(tids), "target_logprobs": len(tlps)}
    if len(set(lens.values())) != 1:
        raise DataError(f"{where}: the per-position lists are inconsistent (lengths {lens}); each holds one entry "
                        "per target position")
    if not len(positions):
        raise DataError(f"{where}: target_positions is empty: the row has no teacher targets")
    if positions.min() < 1 or positions.max() >= L or (np.diff(positions) <= 0).any():
        raise DataError(f"{where}: target_positions must increase strictly within [1, {L - 1}] (position t holds "
                        "p(input_ids[t] | input_ids[:t]))")
    entries = []
    for t, ids_t, lp_t in zip(positions.tolist(), tids, tlps):
        if len(ids_t) != len(lp_t):
            raise DataError(f"{where}: position {t}: target_token_ids has {len(ids_t)} entries, target_logprobs "
                            f"{len(lp_t)}; the per-position lists are inconsistent")
        ids = np.asarray(ids_t, dtype=np.int64)
        lps = _check_entries(where, t, ids, np.asarray(lp_t, dtype=np.float64), vocab)
        if top_k is not None and len(ids) > top_k:
            order = np.argsort(-lps, kind="stable")[:top_k]
            ids, lps = ids[order], lps[order]
        entries.append((ids, lps))
    sid, text = r.get("sample_id"), r.get("text")
    yield Sample(str(sid) if sid is not None else f"{path.stem}-{row}", input_ids, positions, entries,
                 text if isinstance(text, str) else None)


def iter_source(src: str | os.PathLike, fmt: str, vocab: int, top_k: int | None = None) -> Iterator[Sample]:
    """Every sample of an import source, validated (DataError naming file and row)."""
    src = Path(src)
    if fmt == "vllm-logprobs":
        for path in _files(src, (".json", ".jsonl")):
            for row, obj in _json_values(path):
                yield from _parse_vllm(path, row, obj, vocab, top_k)
    elif fmt == "axolotl":
        for path in _files(src, (".parquet", ".jsonl", ".json")):
            for row, r in _axolotl_rows_of(path):
                yield from _parse_axolotl(path, row, r, vocab, top_k)
    elif fmt == "parquet":
        for path in _files(src, (".parquet",)):
            for row, r in _parquet_values(path):
                yield from _parse_parquet(path, row, r, vocab, top_k)
    else:
        raise DataError(f"--format {fmt!r}: import reads one of {', '.join(IMPORT_FORMATS)}")


def _source_fingerprint(src: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _first_model(src: Path) -> str | None:
    for path in _files(src, (".json", ".jsonl")):
        for _, obj in _json_values(path):
            return obj.get("model") if isinstance(obj, dict) else None
    return None


def import_source(src: str | os.PathLike, store: str | os.PathLike, fmt: str, tokenizer: str,
                  teacher: str | None = None, top_k: int | None = None, tail: str = "auto") -> dict[str, Any]:
    """Build a finalized kdpipe store from a vLLM log-prob capture or an axolotl KD dataset (module doc)."""
    from transformers import AutoTokenizer

    from kdpipe.storage.codecs import CodecConfig
    from kdpipe.storage.finalize import finalize_store
    from kdpipe.storage.manifest import StoreMeta, tokenizer_fingerprint
    from kdpipe.storage.tokenizer_files import save_teacher_tokenizer
    from kdpipe.storage.writer import ShardWriter

    if fmt not in IMPORT_FORMATS:
        raise DataError(f"--format {fmt!r}: import reads one of {', '.join(IMPORT_FORMATS)}")
    if tail not in TAIL_MODES:
        raise DataError(f"--tail {tail!r}: choose one of {', '.join(TAIL_MODES)}")
    src = Path(src)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer {tokenizer}: cannot load it ({str(e).splitlines()[0][:160]})") from None
    vocab = len(tok)

    # Pass 1: validate everything (nothing is written for a bad source), find K and the tail's fate.
    n, k_min, k_max, renormalized = 0, None, 0, True
    for s in iter_source(src, fmt, vocab, top_k):
        n += 1
        for ids, lps in s.entries:
            k_min = len(ids) if k_min is None else min(k_min, len(ids))
            k_max = max(k_max, len(ids))
            mass = float(np.exp(lps).sum())
            if len(ids) >= vocab or abs(mass - 1.0) > RENORMALIZED_SLACK:
                renormalized = False
    if n == 0:
        raise DataError(f"{src}: the import source holds no sequences")
    # vLLM adds the actual token beside the top-K when it ranks lower: K is the smallest list
    k = top_k or (k_min if fmt == "vllm-logprobs" else k_max)
    tail_state = {"auto": "unknown" if renormalized else "exact", "exact": "exact", "unknown": "unknown"}[tail]

    side = _side_meta(src)
    carried = side.get("meta", {}) if side else {}
    codec_kw = {kk: v for kk, v in carried.get("codec", {}).items() if kk in ("sqrt_step", "log_step")}
    meta = StoreMeta(
        teacher=teacher or carried.get("teacher") or (_first_model(src) if fmt == "vllm-logprobs" else None) or "unknown",
        teacher_revision=carried.get("teacher_revision"),
        tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=vocab,
        recipe=carried.get("recipe", "import"), recipe_params=carried.get("recipe_params", {"format": fmt}),
        codec=CodecConfig(name="topk", top_k=int(k), **codec_kw),
        dataset_fingerprint=carried.get("dataset_fingerprint") or _source_fingerprint(src),
        generation_params={**carried.get("generation_params", {}), "imported_from": fmt, "tail": tail_state},
    )
    if carried and carried.get("tokenizer_fingerprint") not in (None, meta.tokenizer_fingerprint):
        raise DataError(f"{side['where']}: the export was made with another tokenizer (fingerprint "
                        f"{carried['tokenizer_fingerprint'][:12]}… != {meta.tokenizer_fingerprint[:12]}… of --tokenizer "
                        f"{tokenizer}); give the teacher's tokenizer")

    # Pass 2: the same ShardWriter as phase one (a rerun skips the sample ids already stored).
    with ShardWriter(store, meta, task_index=0, num_tasks=1) as w:
        done = w.done_ids()
        for s in iter_source(src, fmt, vocab, top_k):
            if s.sample_id in done:
                continue
            P = len(s.positions)
            width = max(len(ids) for ids, _ in s.entries)
            top_ids = np.full((P, width), -1, dtype=np.int64)  # [P, K]
            top_lp = np.full((P, width), -np.inf, dtype=np.float32)  # [P, K]
            for j, (ids, lps) in enumerate(s.entries):
                top_ids[j, :len(ids)] = ids
                top_lp[j, :len(ids)] = lps
            w.add(s.sample_id, s.input_ids, s.positions, top_ids, top_lp, text=s.text)
    save_teacher_tokenizer(store, tok)  # as phase one does: cross-tokenizer and sequence-level training need it
    manifest = finalize_store(store)
    return {"store": str(store), "sequences": manifest["num_sequences"], "top_k": k, "tail": tail_state,
            "cache_key": manifest["cache_key"], "teacher": meta.teacher}


def _side_meta(src: Path) -> dict[str, Any] | None:
    """The meta of a kdpipe export that carries over on import: the first Parquet file's schema
    metadata (key kdpipe_meta), or an older export's OUT/kdpipe_meta.json. `where` names its origin."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = src if src.is_dir() else src.parent
    path = folder / META_SIDE_FILE
    if path.is_file():
        raw, where = path.read_bytes(), str(path)
    else:
        files = sorted(folder.glob("*.parquet")) if src.is_dir() else [src] if src.suffix == ".parquet" else []
        if not files:
            return None
        try:
            md = pq.read_schema(files[0]).metadata or {}
        except (pa.ArrowException, OSError) as e:
            raise _unreadable_parquet(files[0], e) from None
        raw, where = md.get(META_KEY), f"{files[0]} (schema metadata {META_KEY.decode()})"
        if raw is None:
            return None
    try:
        side = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e}); delete it to import without the carried-over meta") from None
    return {**side, "where": where} if isinstance(side, dict) else None
