"""The model card of a run (RUN/final/README.md, the Hub's format) and `--push-to-hub`.

The card is rebuilt from what the run folder holds: RUN/final/train_config.toml (or
RUN/train_config.toml), RUN/metrics.jsonl, the stores' manifests, and, once `kdpipe evaluate`
has scored the run, its report. With it, RUN/final can be uploaded as it is.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdpipe.pipeline.metrics_log import read_metrics
from kdpipe.storage.errors import KdpipeError

CARD_FILE = "README.md"
TAGS = ("knowledge-distillation", "kdpipe", "distillation", "text-generation")


def _yaml_str(v: str) -> str:
    return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _is_hub_id(s: str) -> bool:
    """'owner/name' that is not a local path: what the Hub's base_model / datasets fields take."""
    return bool(s) and s.count("/") == 1 and not os.path.exists(s) and not s.startswith((".", "/", "~"))


def _metrics(run: Path) -> tuple[dict | None, dict | None, int]:
    """-> the last training line, the last validation line, target tokens trained on."""
    last_train = last_val = None
    tokens = 0
    for row in read_metrics(run):
        if row.get("split", "train") == "train":
            last_train = row
            tokens += int(row.get("target_tokens", 0) or 0)
        elif row.get("split") == "validation":
            last_val = row
    return last_train, last_val, tokens


def _stores(paths: list[str]) -> list[dict[str, Any]]:
    from kdpipe.storage import open_store

    out = []
    for p in paths:
        info: dict[str, Any] = {"path": p}
        try:
            m = open_store(p)
            info.update(cache_key=m.cache_key, teacher=m.meta.teacher, teacher_revision=m.meta.teacher_revision,
                        codec=m.meta.codec.name, top_k=m.meta.codec.top_k, draws=m.meta.codec.draws,
                        recipe=m.meta.recipe, sequences=m.num_sequences, target_tokens=m.num_target_tokens)
            gen = Path(p) / "generate-config.toml"
            if gen.is_file():
                with open(gen, "rb") as f:
                    info["data"] = tomllib.load(f).get("data")
            src = m.meta.generation_params.get("imported_from")
            if src:
                info["imported_from"] = src
        except KdpipeError as e:  # a moved store must not stop the card
            info["error"] = str(e)
        out.append(info)
    return out


def _f(x: Any, digits: int = 4) -> str:
    return "–" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.{digits}f}"


def _headline(report: dict, run: Path) -> list[str]:
    """The evaluation rows of this run (and the teacher) from a kdpipe evaluate report."""
    from kdpipe.pipeline.report_keys import HEADLINE, LABELS

    mine = [m for m in report.get("models", []) if m.get("run") and Path(m["run"]).resolve() == run.resolve()]
    teacher = [m for m in report.get("models", []) if m.get("role") == "teacher"]
    rows = teacher + [m for m in mine if m not in teacher]
    if not mine:
        return []
    keys = [k for k in HEADLINE if any(k in m.get("quality", {}) for m in rows)]
    lines = ["| model | role | " + " | ".join(LABELS.get(k, k) for k in keys) + " | ROUGE-L retention % |",
             "|" + "---|" * (len(keys) + 3)]
    for m in rows:
        q = m.get("quality", {})
        ret = (m.get("retention_vs_teacher_pct") or {}).get("rougeL")
        lines.append(f"| {m['name']} | {m.get('role', '')} | "
                     + " | ".join(_f((q.get(k) or {}).get("mean"), 3) for k in keys) + f" | {_f(ret, 1)} |")
    n = (report.get("data") or {}).get("num_examples")
    return [f"Evaluated with `kdpipe evaluate` on {n} examples of `{(report.get('data') or {}).get('path')}`:", ""] + lines


def model_card(run: Path, cfg: dict[str, Any], report: dict | None = None) -> str:
    """The README.md text of RUN/final: YAML front matter + what the run distilled from and how."""
    run = Path(run)
    stores = _stores(list(cfg.get("stores", [])))
    last_train, last_val, tokens = _metrics(run)
    student = str(cfg.get("student", ""))
    datasets = sorted({s["data"] for s in stores if isinstance(s.get("data"), str) and _is_hub_id(s["data"])})
    front = ["---"]
    if _is_hub_id(student):
        front.append(f"base_model: {_yaml_str(student)}")
    front.append("library_name: transformers")
    front.append("pipeline_tag: text-generation")
    front.append("tags:")
    front += [f"- {t}" for t in TAGS]
    if datasets:
        front.append("datasets:")
        front += [f"- {_yaml_str(d)}" for d in datasets]
    front.append("---")

    alpha = cfg.get("alpha")
    divergence = cfg.get("divergence")
    if divergence == "auto" and stores and all("error" not in s for s in stores):
        from kdpipe.pipeline.divergence import default_divergence

        on_policy = all(s["recipe"] == "on-policy" for s in stores)
        divergence = f"auto → {default_divergence(stores[0]['codec'], on_policy)}"
    body = [
        f"# {run.name}",
        "",
        f"A student distilled with [kdpipe](https://pypi.org/project/kdpipe/) (offline knowledge distillation) "
        f"from `{student}`.",
        "",
        "## Teacher and targets",
        "",
        "| store | teacher | revision | cache key | codec | sequences | target tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in stores:
        if "error" in s:
            body.append(f"| `{s['path']}` | (unreadable: {s['error'][:80]}) | | | | | |")
            continue
        codec = f"{s['codec']} (k={s['top_k']})" if s["codec"] == "topk" else f"{s['codec']} (k={s['top_k']}, N={s['draws']})"
        if s.get("imported_from"):
            codec += f", imported from {s['imported_from']}"
        body.append(f"| `{s['path']}` | `{s['teacher']}` | `{s['teacher_revision']}` | `{s['cache_key']}` | {codec} | "
                    f"{s['sequences']} | {s['target_tokens']} |")
    body += [
        "",
        "## Training",
        "",
        f"- loss: α·CE + (1−α)·T²·D(teacher_T ‖ student_T) with α = {alpha}, T = {cfg.get('temperature')}, "
        f"D = {divergence}, tail mode = {cfg.get('tail_mode')}",
        f"- optimizer: AdamW, lr {cfg.get('lr')}, {cfg.get('schedule')} schedule, warmup {cfg.get('warmup_steps')} steps"
        + (", LoRA (merged)" if cfg.get("lora") else ""),
        f"- steps: {last_train['step'] if last_train else 0} of {cfg.get('steps')}, target tokens: {tokens}",
        f"- final training loss: {_f((last_train or {}).get('loss'))} (CE {_f((last_train or {}).get('loss_ce'))}, "
        f"KD {_f((last_train or {}).get('loss_kd'))})",
        f"- final validation loss: {_f((last_val or {}).get('loss'))}" if last_val else "- validation: none in this run",
        "",
        "The resolved configuration is `train_config.toml` in this folder.",
        "",
        "## Evaluation",
        "",
    ]
    rows = _headline(report, run) if report else []
    body += rows if rows else ["Not evaluated yet (`kdpipe evaluate --model RUN ...` adds the headline here)."]
    return "\n".join(front + [""] + body) + "\n"


def write_model_card(folder: Path, run: Path, cfg: dict[str, Any] | None = None, report: dict | None = None) -> Path:
    """Write folder/README.md atomically (RUN/final or its .tmp while it is being written)."""
    from kdpipe.pipeline.config import atomic_write_text

    folder = Path(folder)
    if cfg is None:
        for p in (folder / "train_config.toml", Path(run) / "train_config.toml"):
            if p.is_file():
                with open(p, "rb") as f:
                    cfg = tomllib.load(f)
                break
        else:
            cfg = {}
    atomic_write_text(folder / CARD_FILE, model_card(run, cfg, report))
    return folder / CARD_FILE


@dataclass(frozen=True)
class Upload:
    """The prepared Hub upload of a folder (call() performs it)."""

    fn: Callable[..., Any]
    kwargs: dict[str, Any]

    def call(self) -> Any:
        return self.fn(**self.kwargs)


def prepare_upload(folder: Path, repo_id: str) -> Upload:
    """huggingface_hub's upload_folder of RUN/final (README.md included) to the model repo `repo_id`."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise KdpipeError(f"{folder}: has no {CARD_FILE}; only a finished RUN/final is uploaded")
    api = HfApi()
    return Upload(api.upload_folder, {"repo_id": repo_id, "folder_path": str(folder), "repo_type": "model",
                                      "commit_message": f"kdpipe: upload {folder.parent.name}/final",
                                      "create_pr": False})


def push_to_hub(folder: Path, repo_id: str) -> Any:
    """Create `repo_id` if needed and upload `folder`; a failure keeps RUN/final and says how to retry."""
    upload = prepare_upload(folder, repo_id)
    try:
        from huggingface_hub import create_repo

        create_repo(repo_id, repo_type="model", exist_ok=True)
        return upload.call()
    except Exception as e:  # network, auth, offline mode: the run itself is complete
        raise KdpipeError(
            f"--push-to-hub {repo_id}: uploading {folder} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"the run is complete and {folder} is kept: log in (`hf auth login`) and upload it with "
            f"`hf upload {repo_id} {folder}`"
        ) from None


def update_run_cards(report: dict) -> list[Path]:
    """After `kdpipe evaluate`: rewrite RUN/final/README.md of every evaluated run with the headline."""
    written = []
    for m in report.get("models", []):
        run = m.get("run")
        if run and (Path(run) / "final").is_dir():
            written.append(write_model_card(Path(run) / "final", Path(run), report=report))
    return written
