"""Shared pieces of the ecosystem tests: the train tests' tiny stores, tracker environment, metrics.

(Not a conftest.py, so that `from conftest import require` keeps meaning tests/conftest.py.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for sub in ("train", "storage"):
    p = str(HERE.parent / sub)
    if p not in sys.path:
        sys.path.insert(0, p)

from train_stores import build_store, topk_store  # noqa: E402,F401 (fixtures)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as the trackers must hold it: {"{split}/{key}": {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for row in metrics(run):
        split = row.get("split", "train")
        for k, v in row.items():
            if k in ("step", "split") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out.setdefault(f"{split}/{k}", {})[int(row["step"])] = float(v)
    return out


def tracker_env(monkeypatch, root: Path) -> None:
    """Every tracker's local files under `root`; nothing reaches the network."""
    monkeypatch.setenv("TRACKIO_DIR", str(root / "trackio"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(v, str(root / v.lower()))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KDPIPE_REPORT_TO", raising=False)
