"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow, trackio.

`report_to` follows the Hugging Face Trainer's convention: a comma-separated list of tracker
names, or "none"; unset, it is whatever `KDPIPE_REPORT_TO` says (default none). A run's tracker
state lives in RUN/trackers/ (state.json: the W&B run id, the MLflow run id, the TensorBoard log
dir, the trackio project/run), so a resumed run continues the same tracker runs.

What each tracker receives (rank 0 only):
    hyper-parameters   the resolved config (flattened), plus store cache keys and teacher(s)
    scalars            every numeric field of every metrics.jsonl line, named `{split}/{key}`
                       (split = the line's "split", default "train"), at the line's "step"
    at the end         evaluation headline metrics `eval/...`, with the report's plots as images

Offline by default: W&B runs with WANDB_MODE=offline unless WANDB_MODE says otherwise, MLflow
writes a file store under RUN/trackers/mlruns (unless MLFLOW_TRACKING_URI is set), trackio
writes its local database (TRACKIO_DIR, default the Hugging Face cache), TensorBoard writes
event files under RUN/trackers/tensorboard. Nothing here needs the network.

The libraries are optional extras (`pip install kdpipe[tensorboard]` …); asking for one that is
not installed is a ConfigError naming the extra, raised before training starts.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import io
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from kdpipe.pipeline.metrics_log import read_metrics
from kdpipe.storage.errors import ConfigError

ENV = "KDPIPE_REPORT_TO"
# name -> (import name, pip extra of kdpipe)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
STATE_FILE = "state.json"


def parse_report_to(value: Any, where: str = "report_to") -> tuple[str, ...]:
    """None -> $KDPIPE_REPORT_TO (or none); "a,b" / ["a", "b"] -> ("a", "b"); "none" -> (); "all" -> every tracker."""
    if value is None:
        value, where = os.environ.get(ENV, "none"), f"{where} (from ${ENV})"
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for raw in items:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: {raw!r} is not a tracker name; give names such as 'tensorboard,wandb' or 'none'")
        name = raw.strip().lower()
        if name in ("", "none"):
            continue
        if name == "all":
            names.extend(TRACKERS)
            continue
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS) + ["none"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown tracker {raw.strip()!r}{hint}; choose from {', '.join(TRACKERS)}, all or none")
        names.append(name)
    return tuple(dict.fromkeys(names))


def check_installed(names: Iterable[str]) -> None:
    """Refuse a requested tracker whose library is missing, naming the extra that installs it."""
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n][0]) is None]
    if missing:
        extras = ",".join(TRACKERS[n][1] for n in missing)
        raise ConfigError(
            f"report_to: {', '.join(missing)} requested but not installed; pip install 'kdpipe[{extras}]' "
            f"(or drop {', '.join(missing)} from --report-to)"
        )


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar}; lists become comma-joined strings (what every tracker takes)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(x) for x in v)
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def scalars(record: Mapping[str, Any]) -> tuple[int | None, dict[str, float]]:
    """One metrics.jsonl line -> (step, {"{split}/{key}": value}) of its finite numeric fields."""
    split = str(record.get("split") or "train")
    step = record.get("step")
    out = {}
    for k, v in record.items():
        if k in ("step", "split") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[f"{split}/{k}"] = float(v)
    return (int(step) if isinstance(step, (int, float)) else None), out


# ----------------------------------------------------------------------------------------------
# backends: start(state, resume_step) -> state; params(dict); log(dict, step); images(dict, step); close()


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, root: Path, run_name: str, state: dict, resume_step: int | None, params: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.logdir = Path(state.get("logdir") or root / "tensorboard")
        # purge_step: TensorBoard drops events past the checkpoint a resumed run restarts from
        self.w = SummaryWriter(log_dir=str(self.logdir), purge_step=None if resume_step is None else resume_step + 1)
        if not state:  # a new run (not resumed, not attached to by evaluate)
            hp = {k: v for k, v in params.items() if isinstance(v, (bool, int, float, str))}
            for s in hparams(hp, {}):
                self.w.file_writer.add_summary(s)
            self.w.add_text("config", "```\n" + json.dumps(params, indent=1, sort_keys=True) + "\n```", 0)
        self.state = {"logdir": str(self.logdir)}

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def images(self, paths: dict[str, Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for tag, p in paths.items():
            self.w.add_image(tag, np.asarray(Image.open(p).convert("RGB")), step, dataformats="HWC")
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _WandB:
    name = "wandb"

    def __init__(self, root: Path, run_name: str, state: dict, resume_step: int | None, params: dict) -> None:
        import wandb

        self.wandb = wandb
        run_id = state.get("id") or uuid.uuid4().hex[:8]
        wdir = Path(state.get("dir") or root)
        wdir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=state.get("project") or os.environ.get("WANDB_PROJECT", "kdpipe"), name=run_name, id=run_id,
            dir=str(wdir), mode=os.environ.get("WANDB_MODE", "offline"), resume="allow", config=params,
            reinit="create_new", settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.state = {"id": run_id, "dir": str(wdir), "project": self.run.project, "mode": os.environ.get("WANDB_MODE", "offline")}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def images(self, paths: dict[str, Path], step: int) -> None:
        self.run.log({k: self.wandb.Image(str(p)) for k, p in paths.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    name = "mlflow"

    def __init__(self, root: Path, run_name: str, state: dict, resume_step: int | None, params: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = state.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or (root / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; it is the
            # store that needs no server or database, which is what a run directory wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = state.get("run_id")
        if run_id is None:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "kdpipe")
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            # MLflow params are write-once: logged when the run is created, not again on resume
            items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.state = {"run_id": run_id, "tracking_uri": uri}

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def images(self, paths: dict[str, Path], step: int) -> None:
        for p in paths.values():
            self.client.log_artifact(self.run_id, str(p), artifact_path="plots")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Trackio:
    name = "trackio"

    def __init__(self, root: Path, run_name: str, state: dict, resume_step: int | None, params: dict) -> None:
        import trackio
        from trackio.utils import TRACKIO_DIR

        self.trackio = trackio
        project = state.get("project") or os.environ.get("TRACKIO_PROJECT", "kdpipe")
        name = state.get("name") or f"{run_name}-{int(time.time())}"
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would interleave with the progress bar
            self.run = trackio.init(project=project, name=name, config=params, resume="allow" if state else "never",
                                    embed=False, auto_log_cpu=False, auto_log_gpu=False)
        self.state = {"project": project, "name": name, "dir": str(TRACKIO_DIR)}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def images(self, paths: dict[str, Path], step: int) -> None:
        self.run.log({k: self.trackio.Image(str(p)) for k, p in paths.items()}, step=step)

    def close(self) -> None:
        # trackio.finish() also clears trackio's current run; Run.finish() alone leaves it set, and
        # trackio's atexit hook then finishes it a second time, printing "Run finished. Uploading
        # logs to Trackio" at interpreter exit (after the run's own output, or a test session's).
        from trackio import context_vars

        with contextlib.redirect_stdout(io.StringIO()):
            try:
                self.run.finish()
            finally:
                if context_vars.current_run.get() is self.run:
                    context_vars.current_run.set(None)


_BACKENDS = {b.name: b for b in (_TensorBoard, _WandB, _MLflow, _Trackio)}


class Trackers:
    """The tracker runs of one kdpipe run (see module doc); a no-op when `names` is empty or not rank 0."""

    def __init__(self, backends: list, root: Path | None, state: dict) -> None:
        self.backends = backends
        self.root = root
        self.state = state
        self.last_step = 0

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl line (training or validation) to every tracker, at its step."""
        step, values = scalars(record)
        if not self.backends or not values:
            return
        step = self.last_step if step is None else step
        self.last_step = max(self.last_step, step)
        for b in self.backends:
            b.log(values, step)

    def log_final(self, values: Mapping[str, float], images: Mapping[str, Path] | None = None,
                  step: int | None = None) -> None:
        """End-of-run values (the evaluation headline) and plots as images where the tracker takes them."""
        step = self.last_step if step is None else step
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for b in self.backends:
            if clean:
                b.log(clean, step)
            if images:
                b.images(dict(images), step)

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for b in backends:
            b.close()


def check_trackers(names: Iterable[str], root: Path, resuming: bool,
                   hint: str = "pass --resume to continue that run, or choose a new --out") -> None:
    """Before a run starts: every requested tracker is installed, and `root` is not another run's."""
    names = tuple(names)
    if not names:
        return
    check_installed(names)
    recorded = _read_state(Path(root)).get("trackers", {})
    if recorded and not resuming:
        runs = ", ".join(f"{k} {v.get('id') or v.get('run_id') or v.get('name') or v.get('logdir')}" for k, v in recorded.items())
        raise ConfigError(
            f"{root}: holds the tracker runs of another run ({runs}); {hint} (or delete {root})"
        )


def _read_state(root: Path) -> dict:
    path = root / STATE_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: tracker state is unreadable ({e}); delete {root} to start new tracker runs") from None
    if not isinstance(state, dict) or not isinstance(state.get("trackers"), dict):
        raise ConfigError(f"{path}: tracker state is malformed; delete {root} to start new tracker runs")
    return state


def _write_state(root: Path, state: dict) -> None:
    from kdpipe.pipeline.config import atomic_write_text

    atomic_write_text(root / STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")


def open_trackers(names: Iterable[str], root: Path, run_name: str, params: Mapping[str, Any], *,
                  resume_step: int | None = None, attach: bool = False, enabled: bool = True,
                  tags: Mapping[str, str] | None = None, hint: str | None = None) -> Trackers:
    """Start (or continue) one tracker run per name, their state kept in `root` (RUN/trackers).

    resume_step: the step a resumed training run restarts from (None = a new run; then an
    existing `root` is refused, it belongs to another run). attach: continue the runs recorded in
    `root` without a step to purge from (evaluate adds its headline to a finished run's trackers).
    """
    names = tuple(names)
    if not names or not enabled:
        return Trackers([], None, {})
    # Absolute: state.json records each tracker's folder (log dir, wandb dir), and a path relative to the
    # working directory would point elsewhere when the run is resumed or read back from another directory.
    root = Path(os.path.abspath(root))
    check_trackers(names, root, resuming=resume_step is not None or attach, **({"hint": hint} if hint else {}))
    state = _read_state(root)
    recorded = state.get("trackers", {})
    root.mkdir(parents=True, exist_ok=True)
    flat = flatten(dict(params))
    flat.update({k: v for k, v in (tags or {}).items()})
    backends, new_state = [], {"run_name": state.get("run_name", run_name), "trackers": dict(recorded)}
    try:
        for n in names:
            b = _BACKENDS[n](root, new_state["run_name"], recorded.get(n, {}), resume_step, flat)
            if tags and hasattr(b, "tags"):
                b.tags(dict(tags))
            backends.append(b)
            new_state["trackers"][n] = b.state
            _write_state(root, new_state)  # after each start: a crash still leaves the ids to resume
    except Exception:
        for b in backends:
            b.close()
        raise
    t = Trackers(backends, root, new_state)
    t.last_step = resume_step or 0
    return t


def store_tags(stores: Iterable[str]) -> dict[str, str]:
    """Cache key and teacher of each store, as tracker tags / hyper-parameters."""
    from kdpipe.storage import open_store

    tags: dict[str, str] = {}
    for i, s in enumerate(stores):
        m = open_store(s)
        pre = "kdpipe.store" if i == 0 else f"kdpipe.store{i}"
        tags[f"{pre}.cache_key"] = m.cache_key
        tags[f"{pre}.teacher"] = m.meta.teacher
        tags[f"{pre}.teacher_revision"] = str(m.meta.teacher_revision)
        tags[f"{pre}.codec"] = m.meta.codec.name
    return tags


def train_trackers(cfg: Any, run: Path, resume_step: int | None, enabled: bool) -> Trackers:
    """The tracker runs of a training run: RUN/trackers, the resolved TrainConfig as hyper-parameters."""
    from kdpipe.pipeline.config import config_to_dict

    if not cfg.report_to or not enabled:
        return Trackers([], None, {})
    return open_trackers(cfg.report_to, Path(run) / "trackers", Path(run).name, config_to_dict(cfg),
                         resume_step=resume_step, tags=store_tags(cfg.stores))


def _last_step(run: Path) -> int:
    return max([0] + [int(row["step"]) for row in read_metrics(run) if isinstance(row.get("step"), (int, float))])


def _eval_values(m: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out = {f"{prefix}{k}": v.get("mean") for k, v in (m.get("quality") or {}).items() if isinstance(v, Mapping)}
    lat = m.get("latency") or {}
    out.update({f"{prefix}latency_p50_s": lat.get("p50_s"), f"{prefix}tokens_per_s": lat.get("tokens_per_s")})
    for k, v in (m.get("retention_vs_teacher_pct") or {}).items():
        out[f"{prefix}retention_{k}_pct"] = v
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluation_to_trackers(names: Iterable[str], report: Mapping[str, Any], out: Path, params: Mapping[str, Any]) -> None:
    """`kdpipe evaluate --report-to`: each evaluated training run gets its headline (eval/...) and the
    report's plots in its own tracker runs (RUN/trackers, continued at the run's last step); an
    evaluation of plain models gets tracker runs of its own under REPORT/trackers."""
    names = tuple(names)
    if not names:
        return
    out = Path(out)
    images = {f"eval/{Path(p).stem}": out / p for p in report.get("plots", []) if (out / p).is_file()}
    models = list(report.get("models", []))
    runs = [m for m in models if m.get("run")]
    for m in runs:
        run = Path(m["run"])
        t = open_trackers(names, run / "trackers", run.name, {"evaluation": dict(params)}, attach=True)
        try:
            t.log_final(_eval_values(m, "eval/"), images, step=_last_step(run))
        finally:
            t.close()
    if not runs:
        t = open_trackers(names, out / "trackers", out.name, dict(params),
                          hint="an evaluation report gets new tracker runs: choose a new --out")
        try:
            values: dict[str, float] = {}
            for m in models:
                values.update(_eval_values(m, f"eval/{m['name']}/"))
            t.log_final(values, images, step=0)
        finally:
            t.close()
