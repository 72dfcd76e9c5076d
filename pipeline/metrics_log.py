"""RUN/metrics.jsonl: the writer (`MetricsLog`, the training loop's) and its one reader (`read_metrics`).

One JSON object a line: a training step {"step", "loss", "loss_ce", "loss_kd", ...} (no "split"
key) or a validation {"step", "split": "validation", ...} (see validate.py). The writer appends
and flushes line by line, so a run killed mid-write (or read while it writes) can end in a torn
last line; the reader skips a line that is not a JSON object and returns the rest.

No torch here: the model card, the trackers, `kdpipe status` and `kdpipe evaluate` read runs
without importing the training stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    # errors="replace": a torn last line may end inside a multi-byte character
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a run killed mid-write
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN/metrics.jsonl in file order, training and validation lines alike
    ([] when the run has written none yet); a torn last line is left out."""
    return _read_rows(Path(run_dir) / METRICS_FILE)


def last_metrics(run_dir: str | Path, split: str | None = None) -> dict[str, Any] | None:
    """The last row of RUN/metrics.jsonl whose "split" is `split`: None (the default) gives the
    last training step, "validation" the last validation; None when there is no such row."""
    for row in reversed(read_metrics(run_dir)):
        if row.get("split") == split:
            return row
    return None


class MetricsLog:
    """RUN/metrics.jsonl, one line per optimizer step (rank 0); a resumed run drops lines past its step.

    Every line written also goes to the run's trackers (--report-to), so they get the same scalars.
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool, trackers=None) -> None:
        self.f = None
        self.trackers = trackers
        if not enabled:
            return
        keep: list[dict[str, Any]] = []
        if resume_step is not None:
            keep = [row for row in _read_rows(path) if row["step"] <= resume_step]
        path.write_text("".join(json.dumps(row) + "\n" for row in keep))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
            if self.trackers is not None:
                self.trackers.log_metrics(record)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
