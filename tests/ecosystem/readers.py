"""Read back what each tracker wrote, with each library's own reader.

-> {scalar name: {step: value}} (the last value logged at a step wins: a resumed run re-logs the
steps after its checkpoint).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def tensorboard_images(logdir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0})
    ea.Reload()
    return ea.Tags()["images"]


def mlflow_run(tracking_uri: str, run_id: str):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        out[key] = {m.step: m.value for m in hist}
    artifacts = [a.path for a in client.list_artifacts(run_id, "plots")]
    return out, run.data.params, run.data.tags, artifacts


def _wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb: a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B transaction log"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history(wandb_dir: Path, run_id: str) -> tuple[dict[str, dict[int, float]], dict]:
    """History of every offline run directory of `run_id` (a resumed run writes a second one), and its config."""
    out: dict[str, dict[int, float]] = {}
    config: dict = {}
    for d in sorted(Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}")):
        for rec in _wandb_records(d / f"run-{run_id}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items: dict = {}
                for it in rec.history.item:  # a media value (an image) arrives as nested keys [name, field]
                    path = [it.key] if it.key else list(it.nested_key)
                    if len(path) == 1:
                        items[path[0]] = json.loads(it.value_json)
                    else:
                        items.setdefault(path[0], {})[".".join(path[1:])] = json.loads(it.value_json)
                step = int(items.pop("_step"))
                for k, v in items.items():
                    if not k.startswith("_") and isinstance(v, (int, float)):
                        out.setdefault(k, {})[step] = float(v)
                    elif not k.startswith("_") and isinstance(v, dict):
                        out.setdefault(k, {})[step] = v  # media (an image) as its JSON description
            elif kind == "run":
                for it in rec.run.config.update:
                    config[it.key] = json.loads(it.value_json)
            elif kind == "config":
                for it in rec.config.update:
                    config[it.key] = json.loads(it.value_json)
    return out, config


def trackio_logs(project: str, run: str) -> tuple[dict[str, dict[int, float]], dict]:
    from trackio.sqlite_storage import SQLiteStorage

    out: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs(project, run):
        step = int(row["step"])
        for k, v in row.items():
            if k not in ("step", "timestamp") and not k.startswith("_") and v is not None:
                out.setdefault(k, {})[step] = v if not isinstance(v, (int, float)) else float(v)
    config = SQLiteStorage.get_run_config(project, run) if hasattr(SQLiteStorage, "get_run_config") else {}
    return out, config or {}
