"""The dataset side of phase one: load, check every row, give ids, slice per array task.

Everything here runs before the teacher engine starts, so a bad dataset costs seconds, not an
engine start: a missing or empty text field names its row, repeated ids name both rows, a
non-UTF-8 file names its line. A row of a JSON-lines file is named by its 1-based line (what an
editor shows), any other row (csv, parquet, a .json array, a hub dataset) as "row N (0-based)".
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.storage.errors import DataError

# Local file suffix -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = {".json", ".jsonl", ".csv"}


@dataclass(frozen=True)
class Sample:
    """One document to process. `row` is its 0-based index in the (limited) split; messages name it
    with `row_names`."""

    id: str
    row: int
    text: str
    target: str | list[int] | None = None


@dataclass(frozen=True)
class TaskData:
    samples: list[Sample]  # this task's slice, in dataset order
    num_rows: int  # rows in the whole (limited) split, over all tasks
    fingerprint: str  # sha256 over (id, text, target) of every row: identical for every task
    source: str  # what was loaded, for messages


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8, naming the line and byte offset of the first bad byte."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            final = not block
            try:
                dec.decode(block, final=final)
            except UnicodeDecodeError as e:
                bad = offset + e.start
                line += block[: e.start].count(b"\n") if e.start <= len(block) else 0
                raise DataError(
                    f"{path}: not valid UTF-8 at byte {bad} (line {line}); re-encode the file as UTF-8 "
                    f"(e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`)"
                ) from None
            if final:
                return
            line += block.count(b"\n")
            offset += len(block)


def _blank(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether a text file holds nothing but whitespace (read up to its first other byte)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return False
    return True


def _one_json_document(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except json.JSONDecodeError:
        return False


def check_json_lines(path: Path, whole_document_ok: bool = False) -> None:
    """Refuse a JSON-lines file with a line that does not parse, naming its 1-based line number
    and the parser's whole message (the same number `kdpipe evaluate` gives for that line).

    `whole_document_ok` (.json files): a file that parses as one JSON document is fine too.
    """
    if whole_document_ok and _one_json_document(path):
        return
    # a .jsonl, or a .json that is not one document: JSON lines, checked line by line
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line.rstrip("\r\n"))  # without its line break, as an editor shows the line
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no} is not valid JSON ({e}); fix that line") from None


def row_names(data: str, *rows: int) -> str:
    """How a message names rows of `data` (0-based indices of the split as loaded): "line 3" or
    "lines 1 and 3" in a JSON-lines file (1-based; `datasets` skips blank lines, so row i is the
    (i+1)-th non-blank line), else "row 2 (0-based)" or "rows 0 and 2 (0-based)".

    Only called for a message: the file is scanned then, not for every load.
    """
    path = Path(data)
    suffix = path.suffix.lower()
    if path.is_file() and (suffix == ".jsonl" or (suffix == ".json" and not _one_json_document(path))):
        line_of: dict[int, int] = {}  # row -> line
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    line_of[len(line_of)] = line_no
                    if len(line_of) > max(rows):
                        break
        return ("line " if len(rows) == 1 else "lines ") + " and ".join(str(line_of[r]) for r in rows)
    return ("row " if len(rows) == 1 else "rows ") + " and ".join(map(str, rows)) + " (0-based)"


def load_table(data: str, split: str):
    """A `datasets.Dataset` from a local json/jsonl/csv/parquet file or a hub dataset id."""
    import datasets

    datasets.disable_progress_bars()  # kdpipe shows its own progress; "Generating train split" is noise
    path = Path(data)
    if path.exists():
        if path.is_dir():
            raise DataError(f"{data}: is a directory; pass a .json/.jsonl/.csv/.parquet file or a hub dataset id")
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{data}: unknown file type {path.suffix!r}; use one of {', '.join(sorted(BUILDERS))}"
            )
        if path.suffix.lower() in TEXT_SUFFIXES:
            check_utf8(path)
            if _blank(path):  # `datasets` would end in a bare "StopIteration"
                raise DataError(f"{data} is empty (no rows); pass a file with one document per line")
        if builder == "json":
            # Found here, before `datasets` turns it into "DatasetGenerationError" without a line.
            check_json_lines(path, whole_document_ok=path.suffix.lower() == ".json")
        try:
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        except Exception as e:  # datasets raises many types for a malformed file
            raise DataError(f"{data}: could not be read as {builder} ({type(e).__name__}: {e}); fix the file") from None
    else:
        if path.suffix.lower() in BUILDERS or data.startswith(("/", ".", "~")):
            raise DataError(f"{data}: file not found")
        try:
            ds = datasets.load_dataset(data, split=split)
        except Exception as e:
            raise DataError(
                f"{data}: could not load split {split!r} as a hub dataset ({type(e).__name__}: {e}); "
                f"check the id, --split, and that the hub is reachable (or pass a local file)"
            ) from None
    return ds


def _target_value(value: Any, row: int, field: str, data: str) -> str | list[int]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{data}: {row_names(data, row)}: target field '{field}' is empty; fill it or drop the row")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]  # pre-tokenized target (token ids of the teacher's tokenizer)
    if value is None or (isinstance(value, (list, tuple)) and not value):
        raise DataError(
            f"{data}: {row_names(data, row)}: target field '{field}' is missing or empty; fill it or drop the row"
        )
    raise DataError(
        f"{data}: {row_names(data, row)}: target field '{field}' is a {type(value).__name__}; "
        f"make it text or a list of token ids"
    )


def task_bounds(num_rows: int, task_index: int, num_tasks: int) -> tuple[int, int]:
    """Contiguous, deterministic slice [lo, hi) of task `task_index` out of `num_tasks`."""
    return num_rows * task_index // num_tasks, num_rows * (task_index + 1) // num_tasks


def load_task_data(
    data: str,
    split: str = "train",
    text_field: str = "text",
    target_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
    task_index: int = 0,
    num_tasks: int = 1,
) -> TaskData:
    """Load and check the whole split (every task sees the same checks and fingerprint), then slice."""
    ds = load_table(data, split)
    columns = list(ds.column_names)
    for what, field in (("text", text_field), ("target", target_field), ("id", id_field)):
        if field is not None and field not in columns:
            raise DataError(
                f"{data}: no column '{field}' for the {what} field; columns are {', '.join(columns)}; "
                f"pass --{what}-field with one of them"
            )
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    n = len(ds)
    if n == 0:
        raise DataError(f"{data}: split {split!r} has no rows")

    cols = ds.select_columns(sorted({f for f in (text_field, target_field, id_field) if f}))[:]  # dict of lists
    texts = cols[text_field]
    targets = list(cols[target_field]) if target_field else [None] * n
    raw_ids = cols[id_field] if id_field else None

    ids: list[str] = []
    seen: dict[str, int] = {}
    h = hashlib.sha256()
    h.update(json.dumps({"text_field": text_field, "target_field": target_field}).encode())
    for i in range(n):
        text = texts[i]
        if text is None:
            raise DataError(
                f"{data}: {row_names(data, i)}: text field '{text_field}' is missing (null); fill it or drop the row"
            )
        if not isinstance(text, str):
            raise DataError(
                f"{data}: {row_names(data, i)}: text field '{text_field}' is a {type(text).__name__}, not text; "
                f"make it a string, or pass --text-field with the column that holds the text"
            )
        if not text.strip():
            raise DataError(f"{data}: {row_names(data, i)}: text field '{text_field}' is empty; fill it or drop the row")
        if target_field:
            targets[i] = _target_value(targets[i], i, target_field, data)
        if raw_ids is not None:
            rid = raw_ids[i]
            if rid is None or (isinstance(rid, str) and not rid.strip()):
                raise DataError(
                    f"{data}: {row_names(data, i)}: id field '{id_field}' is empty; every row needs an id: "
                    f"fill it, or drop --id-field to use row numbers"
                )
            sid = str(rid)
        else:
            sid = str(i)
        if sid in seen:
            raise DataError(
                f"{data}: id {sid!r} repeats ({row_names(data, seen[sid], i)}); ids must be unique because resume "
                f"skips finished ids; deduplicate the data or drop --id-field to use row numbers"
            )
        seen[sid] = i
        ids.append(sid)
        h.update(json.dumps([sid, text, targets[i]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")

    lo, hi = task_bounds(n, task_index, num_tasks)
    samples = [Sample(id=ids[i], row=i, text=texts[i], target=targets[i]) for i in range(lo, hi)]
    return TaskData(samples=samples, num_rows=n, fingerprint=h.hexdigest(), source=data)
