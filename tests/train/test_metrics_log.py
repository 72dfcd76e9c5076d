"""RUN/metrics.jsonl: `read_metrics` / `last_metrics` (torn last line, validation rows) and the
writer's resume trim, on hand-written files (no training)."""

from __future__ import annotations

import json
from pathlib import Path

from kdpipe.pipeline.metrics_log import METRICS_FILE, MetricsLog, last_metrics, read_metrics

ROWS = [{"step": 1, "loss": 3.0, "target_tokens": 10},
        {"step": 2, "loss": 2.5, "target_tokens": 12},
        {"step": 2, "split": "validation", "loss": 2.8, "target_tokens": 9},
        {"step": 3, "loss": 2.0, "target_tokens": 11}]


def write_run(run: Path, rows: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return run


def test_rows_in_file_order_with_validation_rows_marked(tmp_path):
    run = write_run(tmp_path / "run", ROWS, tail="\n  \n")  # blank lines are not rows
    assert read_metrics(run) == ROWS
    assert read_metrics(str(run)) == ROWS
    assert last_metrics(run) == ROWS[3]
    assert last_metrics(run, "validation") == ROWS[2]


def test_a_torn_last_line_is_left_out(tmp_path):
    # A run killed mid-write: the last line stops inside the object (here inside a 2-byte character).
    torn = json.dumps({"step": 4, "loss": 1.5, "note": "é"}, ensure_ascii=False).encode()[:-3]
    run = write_run(tmp_path / "run", ROWS)
    with open(run / METRICS_FILE, "ab") as f:
        f.write(torn)
    assert read_metrics(run) == ROWS
    assert last_metrics(run)["step"] == 3


def test_a_run_without_metrics(tmp_path):
    assert read_metrics(tmp_path) == [] and last_metrics(tmp_path) is None
    run = write_run(tmp_path / "run", ROWS[:2])
    assert last_metrics(run, "validation") is None


def test_resume_trims_past_its_step_and_drops_a_torn_line(tmp_path):
    run = write_run(tmp_path / "run", ROWS, tail='{"step": 4, "lo')
    log = MetricsLog(run / METRICS_FILE, resume_step=2, enabled=True)
    log.write({"step": 3, "loss": 1.9})
    log.close()
    assert read_metrics(run) == ROWS[:3] + [{"step": 3, "loss": 1.9}]
    assert (run / METRICS_FILE).read_text().count("\n") == 4  # every line whole: the torn one is gone
