"""Quality benchmark: the demo setting at a larger budget, 5 seeds.

One teacher is built and trained on the shipped corpus, phase one runs once under vLLM, then for
each seed a KD student (alpha < 1) and a CE-only student (alpha = 1) train on the same store for
the same steps from the same (seeded) initialization. Teacher and all students are evaluated
together on the held-out documents under the same engine settings.

Goals (issue 5): KD beats CE on ROUGE-L in >= 4/5 seeds and on the mean; KD retains >= 90% of the
teacher's ROUGE-L; the student is >= 2x faster than the teacher per request (p50 latency).
The last line is one JSON object.

    python benchmarks/bench_quality.py [--out bench-output/quality] [--seeds 0,1,2,3,4] [--student-steps N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pipeline/demo.py
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-output/quality")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--teacher-steps", type=int, default=700)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-samples", type=int, default=80)
    args = ap.parse_args()

    from kdpipe.pipeline.demo import DemoConfig, build_models, read_corpus, corpus_path, train_teacher
    from kdpipe.pipeline.evaluate import EvalConfig, evaluate
    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import generate_logits
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train
    from kdpipe.storage import finalize_store

    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig(out=str(out), budget="large", teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                     alpha=args.alpha, temperature=args.temperature)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = read_corpus(corpus_path(cfg))
    train_rows = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] != "train"][: args.eval_samples]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))

    teacher_init, _ = build_models(cfg, rows, out)
    teacher = out / "models" / "teacher"
    if not (teacher / "model.safetensors").is_file():
        log(f"training the teacher ({args.teacher_steps} steps)")
        train_teacher(teacher_init, teacher, train_rows, args.teacher_steps, cfg.teacher_lr, cfg.batch_size, 0, log)
    store = out / "store"
    if not (store / "manifest.json").is_file():
        log("phase one")
        generate_logits(GenerateConfig(
            teacher=str(teacher), data=str(out / "train.jsonl"), out=str(store), recipe="summarize", split="train",
            text_field="document", id_field="id", dtype="float32", max_model_len=512, enforce_eager=True,
            codec="topk", top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, seed=0, progress=False,
        ))
        finalize_store(str(store))

    models, names = [str(teacher)], ["teacher"]
    train_seconds = {}
    for seed in seeds:
        init = out / "models" / f"student-init-{seed}"
        if not (init / "model.safetensors").is_file():
            build_model(init, teacher, TinyModelConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.student_hidden, intermediate_size=4 * cfg.student_hidden,
                num_hidden_layers=cfg.student_layers, num_attention_heads=cfg.student_hidden // 32,
                num_key_value_heads=cfg.student_hidden // 32, max_position_embeddings=512, seed=1000 + seed,
            ))
        for kind, alpha in (("kd", args.alpha), ("ce", 1.0)):
            run = out / "runs" / f"{kind}-s{seed}"
            if not (run / "final" / "config.json").is_file():
                log(f"seed {seed}: {kind} student (alpha={alpha}, {args.student_steps} steps)")
                ts = time.perf_counter()
                train(TrainConfig(
                    student=str(init), stores=(str(store),), out=str(run), alpha=alpha, temperature=args.temperature,
                    lr=cfg.student_lr, warmup_steps=max(1, args.student_steps // 20), steps=args.student_steps,
                    tokens_per_batch=2048, seed=seed, save_every=0, device="cpu",
                ))
                train_seconds[run.name] = round(time.perf_counter() - ts, 1)
            models.append(str(run))
            names.append(run.name)

    log("evaluation")
    report = evaluate(EvalConfig(
        models=tuple(models), names=tuple(names), data=str(out / "heldout.jsonl"), out=str(out / "report"), split="",
        baseline=f"ce-s{seeds[0]}", stores=(str(store),), max_new_tokens=cfg.max_new_tokens, max_model_len=512,
    ))
    by = {m["name"]: m for m in report["models"]}
    rl = lambda n: by[n]["quality"]["rougeL"]["mean"]  # noqa: E731
    per_seed = [{"seed": s, "teacher_rougeL": round(rl("teacher"), 4), "kd_rougeL": round(rl(f"kd-s{s}"), 4),
                 "ce_rougeL": round(rl(f"ce-s{s}"), 4)} for s in seeds]
    kd_mean = statistics.mean(r["kd_rougeL"] for r in per_seed)
    ce_mean = statistics.mean(r["ce_rougeL"] for r in per_seed)
    t_p50 = by["teacher"]["latency"]["p50_s"]
    kd_p50 = statistics.median(by[f"kd-s{s}"]["latency"]["p50_s"] for s in seeds)
    result = {
        "seeds": per_seed,
        "kd_wins": sum(r["kd_rougeL"] > r["ce_rougeL"] for r in per_seed),
        "kd_mean_rougeL": round(kd_mean, 4),
        "ce_mean_rougeL": round(ce_mean, 4),
        "retention": round(kd_mean / rl("teacher"), 4),
        "speedup": round(t_p50 / kd_p50, 3),
        "teacher_p50_s": round(t_p50, 5),
        "student_p50_s": round(kd_p50, 5),
        "teacher_tokens_per_s": round(by["teacher"]["latency"]["tokens_per_s"], 1),
        "student_tokens_per_s": round(statistics.median(by[f"kd-s{s}"]["latency"]["tokens_per_s"] for s in seeds), 1),
        "goals": {},
        "settings": {"teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "alpha": args.alpha,
                     "temperature": args.temperature, "eval_samples": len(held), "top_k": cfg.top_k,
                     "teacher": f"{cfg.teacher_layers}x{cfg.teacher_hidden}", "student": f"{cfg.student_layers}x{cfg.student_hidden}"},
        "train_seconds": train_seconds,
        "seconds": round(time.perf_counter() - t0, 1),
        "report": str(out / "report" / "report.md"),
    }
    result["goals"] = {
        "kd_beats_ce_4_of_5": result["kd_wins"] >= 4,
        "kd_beats_ce_on_mean": kd_mean > ce_mean,
        "retention_ge_90pct": result["retention"] >= 0.9,
        "speedup_ge_2x": result["speedup"] >= 2.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
