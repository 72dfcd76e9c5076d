"""Quality benchmark on real text (issue 10 §4): does a kdpipe student beat the baselines?

Corpus: Debian package descriptions (document) and their maintainers' one-line synopses (summary),
split by package group into train / validation / heldout (kdpipe.pipeline.data.build_debian_corpus).

0. Bases (benchmarks/qualitylib.py, cached under OUT/bases with a config hash, shared with bench_onpolicy
   and bench_xtok): causal LMs pretrained on the training documents without their synopses, one for the
   teacher's architecture (6x192) and one per seed for the students' (2x96; 12x fewer non-embedding
   parameters, the seeds' 9-13x). The miniature of "Llama-3.1-8B base": every student writes the domain's
   language before distillation starts (issue 20).
1. Teacher (cached under OUT/teacher, config hash checked): its base fine-tuned (plain CE) on ALL training
   pairs; one tokenizer for all models.
2. Phase one, once per codec, on the TRANSFER set (a seeded 10-20% of the training documents):
   the teacher's greedy summaries into a top-k store and, with the same pass settings, a
   sampled-codec store; and the human references scored by the teacher (`score` recipe) for
   the no-teacher baseline (only its target tokens are used: alpha = 1).
3. The kd setting (alpha x T x divergence, the grid of jobs/examples/debian-sweep.toml) is picked
   on the VALIDATION split: one seed-0 student per setting, ROUGE-L on validation (ties: NLL).
4. Per seed (every arm starts from that seed's student base):
     base        the pretrained base alone, no task training (what distillation adds over it)
     sft_ref     CE on the human references of the transfer set (no teacher)
     seqkd       CE only (alpha = 1) on the teacher's summaries: sequence-level KD
     kd          logit KD on the top-k store, the setting picked on validation
     kd_sampled  the same setting on the sampled-codec store
5. All models are evaluated together, once, on the held-out split: ROUGE with CIs, similarity,
   latency, and teacher-forced NLL of the human references and ECE (15 equal-width bins).

Resumable: the teacher, every store and every finished student run are reused on a rerun (a run
whose saved config differs is retrained). The last line of stdout is one JSON object.

    python benchmarks/bench_quality.py [--out bench-output/quality] [--seeds 0,1,2,3,4] [--student-steps N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see jobs/demo.py
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qualitylib import ensure_teacher  # noqa: E402

SWEEP_JOB = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "debian-sweep.toml"
STUDENTS = ("sft_ref", "seqkd", "kd", "kd_sampled")


def log(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


def parse_settings(text: str) -> list[dict]:
    """'0.5,2.0,forward_kl;0.5,2.0,reverse_kl' -> settings (a subset of the job file's grid, when CPU is short)."""
    out = []
    for part in text.split(";"):
        a, t, d = part.split(",")
        out.append({"alpha": float(a), "temperature": float(t), "divergence": d.strip()})
    return out


def sweep_grid(path: Path) -> list[dict]:
    """The alpha x temperature x divergence grid of the sweep job file (one [[students]] entry with lists)."""
    with open(path, "rb") as f:
        job = tomllib.load(f)
    entry = next(s for s in job["students"] if isinstance(s.get("alpha"), list))
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    return [{"alpha": a, "temperature": t, "divergence": d} for a, t, d in
            itertools.product(as_list(entry["alpha"]), as_list(entry["temperature"]), as_list(entry["divergence"]))]


def setting_name(s: dict) -> str:
    div = {"forward_kl": "fkl", "reverse_kl": "rkl", "generalized_jsd": "jsd", "total_variation": "tv"}[s["divergence"]]
    return f"a{s['alpha']}-T{s['temperature']}-{div}"


# ---------------------------------------------------------------------------------------- phase one
def ensure_store(out: Path, name: str, teacher: Path, data: Path, args, **kw) -> Path:
    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import generate_logits
    from kdpipe.storage import finalize_store

    from kdpipe.pipeline.generate.run import expected_cache_key
    from kdpipe.storage import open_store

    store = out / "stores" / name
    cfg = GenerateConfig(
        teacher=str(teacher), data=str(data), out=str(store), split="train", text_field="document", id_field="id",
        dtype="float32", max_model_len=512, enforce_eager=True, max_new_tokens=args.max_new_tokens, seed=0,
        progress=False, **kw,
    )
    if store.exists():
        # The same path may hold the targets of an earlier teacher or data: reuse only on the same cache key.
        if (store / "manifest.json").is_file() and open_store(store).cache_key == expected_cache_key(cfg):
            log(f"store {name}: finalized with the same cache key, reused")
            return store
        log(f"store {name}: another teacher/data/settings (or unfinished): rebuilt")
        shutil.rmtree(store)
    log(f"phase one: store {name} ({kw.get('recipe', 'summarize')}, {kw.get('codec', 'topk')})")
    t0 = time.perf_counter()
    generate_logits(cfg)
    finalize_store(str(store))
    log(f"store {name}: {time.perf_counter() - t0:.0f} s")
    timings.add(f"store/{name}", time.perf_counter() - t0)
    return store


def reference_targets(out: Path, T: dict) -> Path:
    """The transfer set with each human reference as the exact answer tokens the teacher learned to emit:
    reference + end-of-turn marker + EOS (the `score` recipe's text targets stop at the end-of-turn marker, and
    a student that never saw the EOS would never stop under vLLM)."""
    from transformers import AutoTokenizer

    from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE
    from kdpipe.pipeline.prompts import Prompter
    from qualitylib import write_jsonl

    tok = AutoTokenizer.from_pretrained(T["tokenizer"])
    pr = Prompter(tok, True, None)
    rows = [{**r, "target_ids": pr.target_ids(DEFAULT_SUMMARIZE_TEMPLATE.replace("{text}", r["document"]), r["summary"])
             + [tok.eos_token_id]} for r in T["transfer"]]
    return write_jsonl(out / "data" / "transfer-references.jsonl", rows)


# ---------------------------------------------------------------------------------------- phase two
def run_config(run: Path, init: Path, store: Path, seed: int, args, alpha: float, temperature: float = 1.0,
               divergence: str = "forward_kl"):
    from kdpipe.pipeline.train.config import TrainConfig

    return TrainConfig(
        student=str(init), stores=(str(store),), out=str(run), alpha=alpha, temperature=temperature,
        divergence=divergence, lr=args.student_lr, warmup_steps=max(1, args.student_steps // 20),
        steps=args.student_steps, tokens_per_batch=args.tokens_per_batch, seed=seed, save_every=0, device="cpu",
    )


def is_done(cfg) -> bool:
    """RUN/final holds exactly this config (a run with other settings is retrained)."""
    from qualitylib import finished_run_is

    if not (Path(cfg.out) / "final" / "config.json").is_file():
        return False
    # Same paths, new contents (a retrained teacher rebuilds the stores and the inits): older runs are stale.
    built = (Path(cfg.out) / "final" / "config.json").stat().st_mtime
    inputs = [Path(cfg.student) / "model.safetensors"] + [Path(st) / "manifest.json" for st in cfg.stores]
    if any(p.stat().st_mtime > built for p in inputs):
        log(f"{Path(cfg.out).name}: older than its store or initialization, retraining")
        return False
    same = finished_run_is(Path(cfg.out), cfg)
    if not same:
        log(f"{Path(cfg.out).name}: saved config differs, retraining")
    return same


def _train_one(cfg, threads: int) -> float:
    """One student run in a worker process (spawned: its own torch, `threads` intra-op threads)."""
    import torch

    from kdpipe.pipeline.train.trainer import train

    torch.set_num_threads(threads)
    run = Path(cfg.out)
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def ensure_runs(cfgs: list, jobs: int) -> None:
    """Train the runs that are not done, `jobs` at a time (finished ones are reused)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = [c for c in cfgs if not is_done(c)]
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    # A progress bar per run, several at once, buried the benchmark's log; tqdm reads this when it is imported,
    # so it is set before the workers are spawned.
    os.environ["TQDM_DISABLE"] = "1"
    with cf.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(todo))), mp_context=mp.get_context("spawn")) as pool:
        futs = {}
        for c in todo:
            log(f"train {Path(c.out).name} (alpha={c.alpha}, T={c.temperature}, {c.divergence}, {c.steps} steps)")
            futs[pool.submit(_train_one, c, threads)] = c
        for f in cf.as_completed(futs):
            c = futs[f]
            secs = f.result()
            log(f"{Path(c.out).name}: {secs:.0f} s")
            timings.add(f"run/{Path(c.out).name}", secs)
            timings.save()


# ---------------------------------------------------------------------------------------- evaluation
def eval_config(**kw):
    from kdpipe.pipeline.evaluate import EvalConfig

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    fields = {"text_field": "document", "target_field": "summary"} if "text_field" in names else \
        {"document_field": "document", "reference_field": "summary"}
    return EvalConfig(**fields, **kw)


def run_eval(out: Path, models: dict[str, Path], data: Path, args, samples: int, **kw) -> dict:
    """evaluate() on every model (reused when OUT/report.json has exactly these models and settings)."""
    from kdpipe.pipeline.evaluate import evaluate

    cfg = eval_config(models=tuple(str(p) for p in models.values()), names=tuple(models), data=str(data), out=str(out),
                      split="", max_samples=samples, max_new_tokens=args.max_new_tokens, max_model_len=512, seed=0,
                      engine=args.eval_engine, **kw)
    done = out / "report.json"
    if done.is_file():
        rep = json.loads(done.read_text())
        from kdpipe.pipeline.config import config_to_dict

        if rep.get("config") == json.loads(json.dumps(config_to_dict(cfg))) and all(
                (Path(p) / "final").is_dir() or Path(p).is_dir() for p in models.values()):
            newest = max(((Path(p) / "final") if (Path(p) / "final").is_dir() else Path(p)).joinpath("model.safetensors").stat().st_mtime
                         for p in models.values())
            if done.stat().st_mtime > newest:
                log(f"evaluation {out.name}: reused")
                return rep
    log(f"evaluation {out.name}: {len(models)} models on {samples} examples")
    t0 = time.perf_counter()
    rep = evaluate(cfg)
    log(f"evaluation {out.name}: {time.perf_counter() - t0:.0f} s")
    timings.add(f"eval/{out.name}", time.perf_counter() - t0)
    return json.loads(done.read_text())  # the JSON form (NaN -> null), as a rerun reads it


def per_example_rougeL(report_dir: Path, names: list[str]) -> dict[str, "np.ndarray"]:
    from kdpipe.pipeline.evaluate import metrics as M

    rows = [json.loads(line) for line in (report_dir / "outputs.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    refs = [r["reference"] for r in rows]
    return {n: M.rouge_scores([r[n] for r in rows], refs)["rougeL"] for n in names}


def pick_on_validation(out: Path, runs: dict[str, Path], T: dict, data: dict, args) -> dict[str, tuple]:
    """Score each sweep run on the validation split: (rougeL or None, -NLL); higher is better."""
    if args.pick_by == "rougeL":
        rep = run_eval(out / "sweep-validation", runs, data["validation"], args, args.val_samples,
                       similarity_model="none", latency_requests=0)
        by = {m["name"]: m for m in rep["models"]}
        return {n: (by[n]["quality"]["rougeL"]["mean"], -by[n]["reference"]["nll_ref"]["mean"]) for n in runs}
    from transformers import AutoTokenizer

    from kdpipe.pipeline.evaluate.calibration import reference_scores
    from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE

    cache = out / "sweep-validation.json"
    rows = T["corpus"]["validation"][: args.val_samples]
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    tok = AutoTokenizer.from_pretrained(T["tokenizer"])
    for n, run in runs.items():
        key = f"{n}@{(run / 'final' / 'model.safetensors').stat().st_mtime}:{len(rows)}"
        if key not in done:
            r = reference_scores(str(run / "final"), tok, [x["document"] for x in rows], [x["summary"] for x in rows],
                                 DEFAULT_SUMMARIZE_TEMPLATE, samples=200)
            done[key] = r["nll_ref"]["mean"]
            cache.write_text(json.dumps(done, indent=1))
        log(f"validation NLL {n}: {done[key]:.4f}")
    return {n: (None, -done[f"{n}@{(run / 'final' / 'model.safetensors').stat().st_mtime}:{len(rows)}"]) for n, run in runs.items()}


def sampled_store_probe(topk: Path, sampled: Path, max_rows: int = 1000) -> dict:
    """What the sampled store tells a student about the teacher's top-1 probability, against the top-k store of the
    same pass (same greedy sequences): the calibration signal a student's ECE measures.

    -> topk_tail_mass: mean teacher mass outside the top-k (what top-k + exact tail leaves unknown: only how that
       mass spreads over the rest of the vocabulary); p1: mean teacher top-1 probability; p1_bias / p1_mae:
       mean (p̂1 - p1) and mean |p̂1 - p1| of the sampled store's estimate of it; argmax_differs: share of
       positions whose most-drawn id is not the teacher's top-1; ids_per_position: distinct ids a sampled position
       holds. Over the first `max_rows` sequences (in store order) present in both stores.
    """
    import numpy as np

    from kdpipe.storage import StoreReader

    def rows(store: Path) -> dict:
        out = {}
        for rec in StoreReader(store, shuffle=False):
            out[rec.sample_id] = rec
            if len(out) >= max_rows:
                break
        return out

    a, b = rows(topk), rows(sampled)
    tail, p1, est, differs, nids = [], [], [], [], []
    for sid in sorted(set(a) & set(b)):
        ra, rb = a[sid], b[sid]
        if ra.ids.shape[0] != rb.ids.shape[0]:
            continue  # not the same sequence: not comparable
        top1 = ra.ids[:, 0]  # [P] entries are sorted by log-prob, descending
        p1.append(np.exp(ra.logprobs[:, 0]))
        tail.append(ra.tail)
        hit = rb.ids == top1[:, None]  # [P, K]
        est.append(np.where(hit, np.exp(rb.logprobs), 0.0).sum(axis=1))
        differs.append(rb.ids[np.arange(len(top1)), np.argmax(rb.logprobs, axis=1)] != top1)
        nids.append((rb.ids >= 0).sum(axis=1))
    if not p1:
        return {}
    p1, est, tail = np.concatenate(p1), np.concatenate(est), np.concatenate(tail)
    return {"positions": int(p1.size), "topk_tail_mass": round(float(tail.mean()), 4), "p1": round(float(p1.mean()), 4),
            "p1_bias": round(float((est - p1).mean()), 4), "p1_mae": round(float(np.abs(est - p1).mean()), 4),
            "argmax_differs": round(float(np.concatenate(differs).mean()), 4),
            "ids_per_position": round(float(np.concatenate(nids).mean()), 2)}


class Timings:
    """Seconds each artifact took to build, kept across reruns: the from-nothing total of a resumed benchmark."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.d = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, key: str, seconds: float) -> None:
        self.d[key] = round(seconds, 1)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.d, indent=1, sort_keys=True))


timings: Timings


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-output/quality")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--student-steps", type=int, default=1000,
                    help="the budget picked on validation on the miniature (1,000 over 500: docs/evaluate.md, run 3)")
    ap.add_argument("--student-lr", type=float, default=3e-3)
    ap.add_argument("--tokens-per-batch", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--draws", type=int, default=16, help="sampled codec: draws per position (16: the store stays under a quarter of top-32's bytes)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=300, help="held-out examples")
    ap.add_argument("--val-samples", type=int, default=200, help="validation examples for picking the kd setting")
    ap.add_argument("--latency-requests", type=int, default=40)
    ap.add_argument("--kd-setting", default=None, help="alpha,T,divergence: skip the validation sweep (say why in the report)")
    ap.add_argument("--sweep-job", default=str(SWEEP_JOB))
    ap.add_argument("--sweep-settings", default=None, metavar="A,T,DIV;...",
                    help="sweep only these settings instead of the job file's whole grid (say so: it is in the JSON)")
    ap.add_argument("--stop-after-sweep", action="store_true",
                    help="print the validation sweep's scores and stop before any held-out run (to compare a training "
                         "budget such as --student-steps on validation, in separate --out folders)")
    ap.add_argument("--jobs", type=int, default=2, help="student runs trained at the same time (processes)")
    ap.add_argument("--eval-engine", choices=("hf", "vllm"), default="hf",
                    help="evaluate's generation engine for every model (hf: no engine start per model, same protocol)")
    ap.add_argument("--pick-by", choices=("nll", "rougeL"), default="rougeL",
                    help="validation criterion for the kd setting: ROUGE-L, the headline metric (one evaluation of every setting), "
                         "or the NLL of the references (cheaper; it favours forward KL by construction)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a qualitylib.QualitySettings field (teacher_steps=1000, corpus=FILE.jsonl, ...); repeatable")
    args = ap.parse_args()
    if args.stop_after_sweep and args.kd_setting:
        ap.error("--stop-after-sweep compares the validation sweep; with --kd-setting there is no sweep to stop after")

    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    global timings
    timings = Timings(out / "timings.json")
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v  # a plain string (a path)
    T = ensure_teacher(out, log=log, **overrides)
    teacher, data = T["teacher"], T["data"]
    stamp = teacher / "quality-teacher.json"
    teacher_build_s = json.loads(stamp.read_text()).get("seconds", 0.0) if stamp.is_file() else 0.0  # 0: external teacher
    log(f"transfer set: {len(T['transfer'])} of {len(T['corpus']['train'])} training documents")

    # ---- phase one: the top-k store the validation sweep reads (the sampled and reference stores follow the sweep)
    gen = {"recipe": "summarize"}
    topk = ensure_store(out, "topk", teacher, data["transfer"], args, **gen, codec="topk", top_k=args.top_k)

    # ---- the kd setting, picked on validation (seed 0, one student per setting of the sweep grid)
    sweep_info: dict = {}
    if args.kd_setting:
        a, t, d = args.kd_setting.split(",")
        chosen = {"alpha": float(a), "temperature": float(t), "divergence": d}
        sweep_info = {"picked_by": "--kd-setting (given, not swept)"}
    else:
        grid = parse_settings(args.sweep_settings) if args.sweep_settings else sweep_grid(Path(args.sweep_job))
        sweep_cfgs = {setting_name(s): run_config(out / "runs" / "sweep" / setting_name(s), T["student_init"](seeds[0]), topk,
                                                  seeds[0], args, **s) for s in grid}
        ensure_runs(list(sweep_cfgs.values()), args.jobs)
        sweep_runs = {n: Path(c.out) for n, c in sweep_cfgs.items()}
        score = pick_on_validation(out, sweep_runs, T, data, args)
        best = max(score, key=lambda n: score[n])
        chosen = next(s for s in grid if setting_name(s) == best)
        what = "validation ROUGE-L (ties: validation NLL)" if args.pick_by == "rougeL" else \
            "validation NLL of the human references (teacher-forced; no engine start per setting)"
        sweep_info = {"picked_by": f"{what}, seed {seeds[0]}, {args.val_samples} validation examples",
                      "validation": {n: {"rougeL": None if v[0] is None else round(v[0], 4), "nll_ref": round(-v[-1], 4)}
                                     for n, v in score.items()},
                      "chosen": best, "grid": "--sweep-settings " + args.sweep_settings if args.sweep_settings
                      else f"{Path(args.sweep_job).name} ({len(grid)} settings)"}
    # A sampled store holds draws from the teacher at T = 1 (tempering is not linear in p, so train-student
    # refuses T != 1 on it) and supports only the forward KL (the one divergence linear in the teacher's p):
    # kd_sampled keeps kd's setting at T = 1 when kd's divergence is forward KL, else it takes the best forward-KL
    # setting of the same validation sweep (kd's alpha when there was no sweep).
    sampled_setting = {**chosen, "temperature": 1.0}
    if chosen["divergence"] != "forward_kl":
        fkl = [s for s in (grid if not args.kd_setting else []) if s["divergence"] == "forward_kl"]
        best_fkl = max(fkl, key=lambda s: score[setting_name(s)]) if fkl else {**chosen, "divergence": "forward_kl"}
        sampled_setting = {**best_fkl, "temperature": 1.0}
        sweep_info["kd_sampled"] = (f"kd's divergence {chosen['divergence']} needs the teacher's p at every id; "
                                    f"the sampled store supports forward KL only: its best validation setting at T = 1")
    log(f"kd setting: {chosen}; kd_sampled: {sampled_setting}")
    timings.save()
    if args.stop_after_sweep:
        print(json.dumps({"split": "validation", "student_steps": args.student_steps, "student_lr": args.student_lr,
                          "sweep": sweep_info, "seconds": round(time.perf_counter() - t0, 1)}))
        return
    # ---- phase one for the other arms: the sampled codec on the same transfer set; the references scored for sft_ref
    sampled = ensure_store(out, "sampled", teacher, data["transfer"], args, **gen, codec="sampled", draws=args.draws, top_k=args.top_k)
    refs = ensure_store(out, "references", teacher, reference_targets(out, T), args, recipe="score", target_field="target_ids",
                        codec="topk", top_k=1)

    # ---- students per seed (same init per seed); each seed is evaluated as soon as its students exist,
    # with the teacher in every report (greedy and seeded: its outputs are the same in each)
    reports: dict[int, dict] = {}
    for seed in seeds:
        init = T["student_init"](seed)
        cfgs = {
            f"sft_ref-s{seed}": run_config(out / "runs" / f"sft_ref-s{seed}", init, refs, seed, args, alpha=1.0),
            f"seqkd-s{seed}": run_config(out / "runs" / f"seqkd-s{seed}", init, topk, seed, args, alpha=1.0),
            # seed 0's kd student is the sweep's run of the chosen setting (same init, store and steps)
            f"kd-s{seed}": run_config(out / "runs" / "sweep" / setting_name(chosen) if seed == seeds[0] and not args.kd_setting
                                      else out / "runs" / f"kd-s{seed}", init, topk, seed, args, **chosen),
            f"kd_sampled-s{seed}": run_config(out / "runs" / f"kd_sampled-s{seed}", init, sampled, seed, args, **sampled_setting),
        }
        ensure_runs(list(cfgs.values()), args.jobs)
        runs = {n: Path(c.out) for n, c in cfgs.items()}
        if T["config"]["pretrained_bases"]:
            runs[f"base-s{seed}"] = init  # the pretrained base alone: what distillation adds over it
        reports[seed] = run_eval(out / f"report-s{seed}", {"teacher": teacher, **runs}, data["heldout"], args, args.eval_samples,
                                 baseline=f"sft_ref-s{seed}", stores=(str(topk), str(sampled), str(refs)),
                                 latency_requests=args.latency_requests)
        timings.save()
        print(json.dumps({"seed": seed, "partial": True, **{m["name"]: round(m["quality"]["rougeL"]["mean"], 4) for m in reports[seed]["models"]}}), flush=True)

    by = {m["name"]: m for m in reports[seeds[0]]["models"] if m["name"] == "teacher"}
    for seed in seeds:
        by.update({m["name"]: m for m in reports[seed]["models"] if m["name"] != "teacher"})
    rl: dict = {}
    for seed in seeds:
        names = [m["name"] for m in reports[seed]["models"]]
        rl.update({n: v for n, v in per_example_rougeL(out / f"report-s{seed}", names).items() if n != "teacher" or seed == seeds[0]})
    teacher_same = all(
        abs(next(m for m in reports[s]["models"] if m["name"] == "teacher")["quality"]["rougeL"]["mean"] - by["teacher"]["quality"]["rougeL"]["mean"]) < 1e-9
        for s in seeds)
    mean = lambda n: float(rl[n].mean())  # noqa: E731

    from kdpipe.pipeline.evaluate import metrics as M

    def ci(x: np.ndarray) -> list[float]:
        b = M.bootstrap_ci(x, 2000, 0.95, 0)
        return [round(b["ci_low"], 4), round(b["ci_high"], 4)]

    def versus(a: str, b: str) -> dict:
        per_seed = [mean(f"{a}-s{s}") - mean(f"{b}-s{s}") for s in seeds]
        paired = np.mean([rl[f"{a}-s{s}"] - rl[f"{b}-s{s}"] for s in seeds], axis=0)  # [N] seed-averaged difference
        return {"wins": sum(d > 0 for d in per_seed), "of": len(seeds), "mean_diff": round(float(paired.mean()), 4),
                "ci": ci(paired), "per_seed_diff": [round(d, 4) for d in per_seed]}

    def student_row(kind: str, s: int) -> dict:
        m = by[f"{kind}-s{s}"]
        q = m["quality"]
        return {"seed": s, "rougeL": round(q["rougeL"]["mean"], 4), "rougeL_ci": [round(q["rougeL"]["ci_low"], 4), round(q["rougeL"]["ci_high"], 4)],
                "rouge1": round(q["rouge1"]["mean"], 4), "rouge2": round(q["rouge2"]["mean"], 4),
                "similarity": round(q["similarity_reference"]["mean"], 4) if "similarity_reference" in q else None,
                "nll_ref": round(m["reference"]["nll_ref"]["mean"], 4), "ece": round(m["reference"]["ece"]["mean"], 4),
                "p50_s": round(m["latency"]["p50_s"], 5)}

    tq = by["teacher"]["quality"]
    teacher_row = {"rougeL": round(tq["rougeL"]["mean"], 4), "rougeL_ci": [round(tq["rougeL"]["ci_low"], 4), round(tq["rougeL"]["ci_high"], 4)],
                   "rouge1": round(tq["rouge1"]["mean"], 4), "rouge2": round(tq["rouge2"]["mean"], 4),
                   "similarity": round(tq["similarity_reference"]["mean"], 4) if "similarity_reference" in tq else None,
                   "nll_ref": round(by["teacher"]["reference"]["nll_ref"]["mean"], 4),
                   "ece": round(by["teacher"]["reference"]["ece"]["mean"], 4), "p50_s": round(by["teacher"]["latency"]["p50_s"], 5),
                   "size": f"{T['config']['teacher_layers']}x{T['config']['teacher_hidden']}", "steps": T["config"]["teacher_steps"],
                   "train_pairs": len(T["corpus"]["train"]), "external": T["config"].get("external_teacher")}
    if teacher_row["external"]:  # trained elsewhere: its size, steps and data are not this benchmark's settings
        teacher_row.update(size=None, steps=None, train_pairs=None)
    arms = STUDENTS + (("base",) if T["config"]["pretrained_bases"] else ())
    students = {k: [student_row(k, s) for s in seeds] for k in arms}
    sft_mean = np.mean([rl[f"sft_ref-s{s}"] for s in seeds], axis=0)  # [N]
    teacher_vs_sft = {"mean_diff": round(float((rl["teacher"] - sft_mean).mean()), 4), "ci": ci(rl["teacher"] - sft_mean)}
    kd_vs_seqkd, kd_vs_sft = versus("kd", "seqkd"), versus("kd", "sft_ref")
    samp_vs_kd = versus("kd_sampled", "kd")
    nll = {k: [r["nll_ref"] for r in students[k]] for k in arms}
    kd_mean = statistics.mean(mean(f"kd-s{s}") for s in seeds)
    retention = {k: round(statistics.mean(mean(f"{k}-s{s}") for s in seeds) / teacher_row["rougeL"], 4)
                 if teacher_row["rougeL"] else None for k in arms}
    kd_p50 = statistics.median(by[f"kd-s{s}"]["latency"]["p50_s"] for s in seeds)
    speedup = by["teacher"]["latency"]["p50_s"] / kd_p50
    ece = {"teacher": teacher_row["ece"], **{k: round(statistics.mean(r["ece"] for r in students[k]), 4) for k in arms}}
    from kdpipe.storage import open_store

    bpt = {name: round(m.bytes / max(m.num_target_tokens, 1), 2) for name, m in (("topk", open_store(topk)), ("sampled", open_store(sampled)))}
    result = {
        "teacher": teacher_row,
        "students": students,
        "teacher_vs_sft_ref": teacher_vs_sft,
        "kd_vs_seqkd": kd_vs_seqkd,
        "kd_vs_sft_ref": kd_vs_sft,
        "kd_sampled_vs_kd": samp_vs_kd,
        "nll_ref": {"teacher": teacher_row["nll_ref"], **nll},
        "retention": round(kd_mean / teacher_row["rougeL"], 4) if teacher_row["rougeL"] else None,
        "retention_by_arm": retention,
        # the miniature's design (issue 20): pretrained bases, the seeds' size ratio
        "pretrained_bases": T["config"]["pretrained_bases"],
        "size_ratio_non_embedding": T["size_ratio"],
        "bases": {n: {"ppl_heldout": b["ppl_heldout"], "seconds": b["seconds"], "steps": b["config"]["steps"]}
                  for n, b in sorted(T["bases"].items())},
        "speedup": round(speedup, 3),
        "ece": ece,
        "store_bytes_per_token": bpt,
        # why kd_sampled's ECE is (not) below kd's: what each store says about the teacher's top-1 probability
        "sampled_store_probe": sampled_store_probe(topk, sampled),
        "settings": {
            "kd": chosen, "kd_sampled": sampled_setting, "sweep": sweep_info, "seeds": seeds, "student_steps": args.student_steps, "student_lr": args.student_lr,
            "tokens_per_batch": args.tokens_per_batch, "top_k": args.top_k, "draws": args.draws,
            "max_new_tokens": args.max_new_tokens, "eval_samples": reports[seeds[0]]["data"]["num_examples"],
            "transfer_docs": len(T["transfer"]), "train_docs": len(T["corpus"]["train"]),
            "student": f"{T['config']['student_layers']}x{T['config']['student_hidden']}", "vocab": T["config"]["vocab_size"],
            "max_doc_chars": T["config"]["max_doc_chars"], "teacher_seconds": T["teacher_seconds"],
            "ece_bins": 15, "cores": os.cpu_count(), "eval_engine": args.eval_engine, "jobs": args.jobs, "teacher_outputs_identical_across_seed_reports": teacher_same,
            "build_seconds": timings.d,
        },
        "goals": {},
        "seconds": round(time.perf_counter() - t0, 1),
        # this invocation reused what earlier ones built: the from-nothing cost is the sum of build times
        "seconds_from_nothing": round(teacher_build_s + sum(b["seconds"] for b in T["bases"].values()) + sum(timings.d.values()), 1),
        "reports": [str(out / f"report-s{s}" / "report.md") for s in seeds],
    }
    result["goals"] = {
        "teacher_beats_sft_ref_ci_above_0": teacher_vs_sft["ci"][0] > 0,
        "kd_beats_seqkd_4_of_5_and_mean_ci_above_0": kd_vs_seqkd["wins"] >= math.ceil(0.8 * len(seeds)) and kd_vs_seqkd["ci"][0] > 0,
        "kd_beats_sft_ref_on_mean": kd_vs_sft["mean_diff"] > 0,
        "kd_lower_nll_than_seqkd_4_of_5": sum(a < b for a, b in zip(nll["kd"], nll["seqkd"])) >= math.ceil(0.8 * len(seeds)),
        "retention_ge_90pct": (result["retention"] or 0) >= 0.9,
        # within kd's CI or better: the paired CI of kd_sampled - kd reaches 0 or above
        "kd_sampled_within_kd_ci_or_better": samp_vs_kd["ci"][1] >= 0,
        "sampled_bytes_le_quarter_of_topk": bpt["sampled"] <= bpt["topk"] / 4,
        "kd_sampled_lower_ece_than_kd": ece["kd_sampled"] < ece["kd"],
        "speedup_ge_2x": speedup >= 2.0,
        "size_ratio_in_seeds_range_8_to_14": 8 <= T["size_ratio"] <= 14,
        # the whole benchmark (5 seeds) from nothing; a run over fewer seeds cannot claim it
        "seconds_le_90min": result["seconds_from_nothing"] <= 90 * 60 and len(seeds) >= 5,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
