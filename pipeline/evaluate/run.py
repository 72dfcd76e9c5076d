"""`evaluate(cfg)`: check everything, generate with each model, score, write the report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.pipeline.card import update_run_cards
from kdpipe.pipeline.config import atomic_write_text, config_to_dict, write_resolved
from kdpipe.pipeline.evaluate import cache as teacher_cache
from kdpipe.pipeline.evaluate import metrics as M
from kdpipe.pipeline.evaluate.calibration import reference_scores
from kdpipe.pipeline.evaluate.config import EvalConfig
from kdpipe.pipeline.trackers import check_installed, evaluation_to_trackers
from kdpipe.pipeline.metrics_log import read_metrics
from kdpipe.pipeline.evaluate.generate import (
    ModelOutputs, build_prompt_ids, generate_outputs, load_examples, load_tokenizers, resolve_max_model_len, resolve_model,
    summarize_template,
)

QUALITY_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "similarity_reference", "similarity_source", "nli_entailment")


def _progress(total: int, desc: str, file=None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, leave=False, file=file)


def check_stores(stores) -> None:
    """Every --store given must be a finalized store: refused before any model loads or engine starts."""
    from kdpipe.storage import open_store

    for s in dict.fromkeys(stores):
        open_store(s)  # StoreError naming the directory (not found, not finalized, damaged manifest)


def read_run(run_dir: str) -> dict[str, Any]:
    """A training run's loss curve (metrics.jsonl) and resolved config (train_config.toml), when present."""
    run = Path(run_dir)
    info: dict[str, Any] = {"path": str(run), "curve": {}, "config": None}
    cfg_path = run / "train_config.toml"
    if cfg_path.is_file():
        with open(cfg_path, "rb") as f:
            info["config"] = tomllib.load(f)
    curve: dict[str, list[list[float]]] = {}
    for row in read_metrics(run):  # a line cut by a crash is left out: the curve is still useful
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        # Validation lines (train-student --val-store/--val-fraction) are their own curves: val_loss, ...
        prefix = "val_" if row.get("split") == "validation" else ""
        for k, v in row.items():
            if "loss" in k and isinstance(v, (int, float)) and math.isfinite(v):
                curve.setdefault(prefix + k, []).append([step, float(v)])
    # A part that is identically zero (the KD term of a CE-only run) is not a curve.
    info["curve"] = {k: pts for k, pts in curve.items() if any(v != 0.0 for _, v in pts)}
    return info


def store_keys(stores: list[str]) -> list[dict[str, Any]]:
    """Cache key and size of each store (open_store refuses a store that is not finalized)."""
    from kdpipe.storage import open_store

    out = []
    for s in dict.fromkeys(stores):
        try:
            m = open_store(s)
            out.append({"path": s, "cache_key": m.cache_key, "teacher": m.meta.teacher, "recipe": m.meta.recipe,
                        "num_sequences": m.num_sequences, "num_target_tokens": m.num_target_tokens})
        except Exception as e:  # a moved/deleted store must not lose the whole report
            out.append({"path": s, "cache_key": None, "error": str(e)})
    return out


def evaluate(cfg: EvalConfig, verbose: bool = False) -> dict[str, Any]:
    """Generate with every model on the same prompts, score them, write report.json/.md and plots.

    Unless `verbose`, each engine's own output goes to REPORT/logs/evaluate-NAME.log.
    """
    from kdpipe.pipeline.console import engine_output
    from kdpipe.pipeline.dtype import resolve_dtype

    out = Path(cfg.out)
    names = cfg.model_names()
    t_idx, b_idx = cfg.teacher_index(), cfg.baseline_index()

    # --- everything that can be wrong is checked before the first engine starts
    check_installed(cfg.report_to)  # --report-to: a tracker that is not installed stops here
    check_stores(cfg.stores)
    examples = load_examples(cfg)
    specs = [resolve_model(m, n) for m, n in zip(cfg.models, names)]
    toks = load_tokenizers(specs, cfg)
    # --dtype auto: resolved per model here and passed explicitly (see pipeline/dtype.py)
    dtypes = {s.name: resolve_dtype(cfg.dtype, s.model) for s in specs}
    max_model_len = resolve_max_model_len(specs, cfg)  # unset: the smallest of the models' own context lengths
    sim_model = None
    if cfg.similarity_model.lower() != "none":
        sim_model = M.load_similarity_model(cfg.similarity_model, cfg.score_device)
    nli = M.NLIScorer(cfg.nli_model, cfg.score_device, cfg.nli_chunk_tokens, cfg.score_batch_size) if cfg.nli_model else None
    runs = {s.name: read_run(s.run) for s in specs if s.run}
    stores = list(cfg.stores)
    for r in runs.values():
        stores.extend((r.get("config") or {}).get("stores", []))

    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out / "eval_config.toml")
    template = summarize_template(cfg)

    # --- generation, one engine at a time
    outputs: dict[str, ModelOutputs] = {}
    if not verbose:
        print(f"evaluate: {len(specs)} model(s) on {len(examples)} examples; engine logs in {out / 'logs'}", file=sys.stderr, flush=True)
    cached: dict[str, str] = {}  # model name -> the cache file its outputs came from
    for i, s in enumerate(specs):
        prompts = [build_prompt_ids(toks[s.name], ex.document, template, cfg.use_chat_template, cfg.system_prompt) for ex in examples]
        mcfg = dataclasses.replace(cfg, dtype=dtypes[s.name], max_model_len=max_model_len)
        key = teacher_cache.cache_key(s.model, prompts, mcfg) if cfg.teacher_cache and i == t_idx else None
        hit = teacher_cache.load(cfg.teacher_cache, key, len(prompts)) if key else None
        if hit is not None:  # the teacher's outputs of an earlier evaluation with the same model, prompts, settings
            outputs[s.name] = ModelOutputs(**hit)
            cached[s.name] = str(teacher_cache.cache_file(cfg.teacher_cache, key))
            print(f"evaluate: {s.name}: {len(prompts)} outputs from the teacher cache {cached[s.name]}", file=sys.stderr, flush=True)
            continue
        with engine_output(out / "logs" / f"evaluate-{s.name}.log", verbose) as console:
            bar = _progress(len(prompts), f"generate {s.name}", console)
            try:
                outputs[s.name] = generate_outputs(s, toks[s.name], prompts, mcfg, bar)
            finally:
                bar.close()
        if key:
            teacher_cache.save(cfg.teacher_cache, key, outputs[s.name])

    # --- scoring
    refs = [ex.reference for ex in examples]
    docs = [ex.document for ex in examples]
    per_example: dict[str, dict[str, np.ndarray]] = {}
    bar = _progress(len(specs), "score")
    for s in specs:
        texts = outputs[s.name].texts
        scores: dict[str, np.ndarray] = dict(M.rouge_scores(texts, refs))
        if sim_model is not None:
            scores["similarity_reference"] = M.cosine_similarity(sim_model, texts, refs, cfg.score_batch_size)
            scores["similarity_source"] = M.cosine_similarity(sim_model, texts, docs, cfg.score_batch_size)
        if nli is not None:
            scores["nli_entailment"] = nli.score(docs, texts)
        per_example[s.name] = scores
        bar.update(1)
    bar.close()

    # --- teacher-forced scores on the references: NLL per target token and calibration (ECE)
    reference = {s.name: reference_scores(s.model, toks[s.name], docs, refs, template, cfg.use_chat_template,
                                          cfg.system_prompt, cfg.score_device, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
                 for s in specs} if cfg.reference_scores else {}

    models = []
    for i, s in enumerate(specs):
        o = outputs[s.name]
        quality = {
            k: M.bootstrap_ci(v, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
            for k, v in per_example[s.name].items()
        }
        n_t = len(o.latencies_s)
        models.append({
            "name": s.name,
            "role": "teacher" if i == t_idx else ("baseline" if i == b_idx else "student"),
            "model": s.model,
            "run": s.run,
            "quality": quality,
            "latency": {
                **M.latency_summary(o.latencies_s, o.output_tokens[:n_t]),
                "engine_start_s": o.engine_start_s,
                "per_request_s": o.latencies_s,
            },
            "dtype": dtypes[s.name],
            # Rows whose outputs (and latencies) an earlier evaluation generated: all of them, or none.
            "outputs_from_cache": {"file": cached[s.name], "rows": len(o.texts)} if s.name in cached else None,
            "finish_reasons": {r: o.finish_reasons.count(r) for r in sorted(set(o.finish_reasons))},
        })
        if s.name in reference:
            models[-1]["reference"] = reference[s.name]
    teacher = models[t_idx]
    t_means = {k: v["mean"] for k, v in teacher["quality"].items()}
    for i, m in enumerate(models):
        means = {k: v["mean"] for k, v in m["quality"].items()}
        if i != t_idx:
            m["retention_vs_teacher_pct"] = M.retention(means, t_means)
            m["speedup_vs_teacher"] = M.speedup(teacher["latency"], m["latency"])
        if b_idx is not None and i not in (b_idx, t_idx):
            b_means = {k: v["mean"] for k, v in models[b_idx]["quality"].items()}
            m["vs_baseline"] = {
                "baseline": models[b_idx]["name"],
                "pct_of_baseline": M.retention(means, b_means),
                "difference": {k: means[k] - b_means[k] for k in means if k in b_means},
                # Paired bootstrap of the per-example difference: same examples, same resamples.
                "difference_ci": {
                    k: M.bootstrap_ci(per_example[m["name"]][k] - per_example[models[b_idx]["name"]][k],
                                      cfg.bootstrap_samples, cfg.confidence, cfg.seed)
                    for k in means if k in b_means
                },
            }
            if reference:  # per-example mean NLL of the reference, student − baseline (lower is better)
                m["vs_baseline"]["nll_ref_difference_ci"] = M.bootstrap_ci(
                    np.asarray(reference[m["name"]]["per_example_nll"]) - np.asarray(reference[models[b_idx]["name"]]["per_example_nll"]),
                    cfg.bootstrap_samples, cfg.confidence, cfg.seed)

    report = {
        "kdpipe_report_version": 1,
        "config": config_to_dict(dataclasses.replace(cfg, max_model_len=max_model_len)),  # the length the engines used
        "prompt_template": template,
        "data": {"path": cfg.data, "split": cfg.split, "selection": getattr(examples, "selection", None),
                 "num_examples": len(examples)},
        "teacher": teacher["name"],
        "baseline": models[b_idx]["name"] if b_idx is not None else None,
        "models": models,
        "stores": store_keys(stores) if stores else [],
        "runs": runs,
        "scorers": {
            "rouge": "rouge-score, F1, Porter stemmer; rougeLsum over pysbd sentences joined by newlines",
            "similarity": (M.default_similarity_model_path() if cfg.similarity_model == "default" else cfg.similarity_model)
            if sim_model is not None else None,
            "nli": {"model": cfg.nli_model, "entailment_index": nli.entail} if nli is not None else None,
            "reference": ("teacher-forced on the references: NLL per target token (pooled) and ECE over 15 equal-width "
                          "bins of top-1 confidence; CIs by bootstrap over examples") if reference else None,
            "bootstrap": {"samples": cfg.bootstrap_samples, "confidence": cfg.confidence, "seed": cfg.seed},
        },
        "environment": {"cpu_count": os.cpu_count()},
    }
    # Every output beside its reference, for reading what the numbers mean.
    lines = []
    for j, ex in enumerate(examples):
        row = {"id": ex.id, "reference": ex.reference}
        row.update({s.name: outputs[s.name].texts[j] for s in specs})
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out / "outputs.jsonl", "\n".join(lines) + "\n")

    from kdpipe.pipeline.evaluate.report import write_report

    write_report(report, out, plots=cfg.plots)
    update_run_cards(report)  # each evaluated run's RUN/final/README.md gains the headline
    evaluation_to_trackers(cfg.report_to, report, out, config_to_dict(cfg))  # --report-to
    return report
