"""Cross-tokenizer KD (issue 13): each --cross-tokenizer option against the sequence-level fallback.

The quality benchmark's corpus (Debian package descriptions) and its cached teacher
(`qualitylib.ensure_teacher`: byte-level BPE tokenizer A, trained first when the cache is empty,
and the log says so). The student has tokenizer B: a Unigram tokenizer with byte fallback, of
another size, trained on other text (the validation split and every second training pair). Phase
one (vLLM, summarize recipe) runs once on the transfer set; then for each seed one student per
option (span, uld, hybrid, alpha 0.5) and the fallback (alpha 1: CE on the teacher's text,
retokenized for B), all at equal steps from the same initialization, scored by ROUGE-L against
the human synopses of held-out documents (greedy decoding, transformers).

Also measured: the step time of a cross-tokenizer step against a same-tokenizer KD step at equal
target tokens (forward + backward of the same student B on the same micro-batch, the latter with K
teacher entries per token in B's own vocabulary; alignment runs in the data thread, so it is timed
separately), the alignment throughput (target tokens per CPU second of one thread: the collate
stage, first pass and with prompts memoized), the share of 1:1 groups and of the teacher's mass mapped.

    python benchmarks/bench_xtok.py                              # the full protocol
    python benchmarks/bench_xtok.py --seeds 0,1 --steps 120 ...  # reduced: "reduced" is in the JSON

The last line of stdout is one JSON object:
{"options": {name: {"rougeL": [per seed], ...}}, "fallback": {...}, "best", "wins", "mean_diff", "ci",
 "step_time_ratio", "align_tokens_per_s", "one_to_one_share", "mapped_mass", "goals", "settings"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

OPTIONS = ("span", "uld", "hybrid")
# two-sided 95% t quantiles by degrees of freedom (paired CI over seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def log(s: str) -> None:
    print(f"[bench_xtok {time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


def student_tokenizer(out: Path, corpus: dict, vocab: int) -> Path:
    from kdpipe.pipeline.tiny import build_unigram_tokenizer

    d = out / "tokenizer-b"
    if not (d / "tokenizer.json").is_file():
        texts = [r["document"] + "\n" + r["summary"] for r in corpus["validation"]]
        texts += [r["document"] + "\n" + r["summary"] for r in corpus["train"][1::2]]
        build_unigram_tokenizer(d, texts, vocab_size=vocab)
    return d


def ensure_store(out: Path, teacher: Path, data: Path, args) -> Path:
    from kdpipe.pipeline.generate.config import GenerateConfig
    from kdpipe.pipeline.generate.run import generate_logits
    from kdpipe.storage import finalize_store

    store = out / "stores" / f"summarize-k{args.top_k}-n{args.transfer_limit or 'all'}"
    if (store / "manifest.json").is_file():
        log(f"store {store.name}: finalized, reused")
        return store
    shutil.rmtree(store, ignore_errors=True)
    log(f"phase one: {store.name}")
    t0 = time.perf_counter()
    generate_logits(GenerateConfig(
        teacher=str(teacher), data=str(data), out=str(store), split="train", text_field="document", id_field="id",
        dtype="float32", max_model_len=512, enforce_eager=True, max_new_tokens=args.max_new_tokens, seed=0,
        top_k=args.top_k, limit=args.transfer_limit, progress=False,
    ))
    finalize_store(str(store))
    log(f"store {store.name}: {time.perf_counter() - t0:.0f} s")
    return store


def train_run(run: Path, init: Path, store: Path, seed: int, args, **kw) -> Path:
    from qualitylib import finished_run_is

    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train

    cfg = TrainConfig(student=str(init), stores=(str(store),), out=str(run), lr=args.lr,
                      warmup_steps=max(1, args.steps // 20), steps=args.steps, tokens_per_batch=args.tokens_per_batch,
                      seed=seed, save_every=0, device="cpu", **kw)
    if finished_run_is(run, cfg):
        return run / "final"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    train(cfg)
    log(f"{run.name}: {time.perf_counter() - t0:.0f} s")
    return run / "final"


def student_prompts(teacher_tok, student_tok, docs: list[str]) -> list[list[int]]:
    """The student's prompt exactly as training built it (xtok.Aligner / Retokenize): the teacher's
    chat-templated prompt decoded without special tokens, re-encoded by the student."""
    from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE
    from kdpipe.pipeline.prompts import Prompter

    prompter = Prompter(teacher_tok, True, None)
    out = []
    for d in docs:
        text = teacher_tok.decode(prompter.ids(DEFAULT_SUMMARIZE_TEMPLATE.replace("{text}", d)), skip_special_tokens=True)
        p = student_tok(text, add_special_tokens=True)["input_ids"]
        out.append(p or [student_tok.bos_token_id])
    return out


def rouge_l(model_dir: Path, prompts: list[list[int]], refs: list[str], max_new: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.pipeline.evaluate.metrics import rouge_scores

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    preds = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        L = max(len(p) for p in chunk)
        ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        preds += [tok.decode(g[L:], skip_special_tokens=True).strip() for g in gen]
    return [float(x) for x in rouge_scores(preds, refs)["rougeL"]]


def alignment_figures(store: Path, teacher_tok, student_tok, option: str, rows: int, batch_rows: int = 32) -> dict:
    """Alignment throughput of the collate stage, in target tokens per CPU second of this process (one
    thread: per core, whatever else the machine runs), on the first `rows` rows, and the shares.

    cold: the first pass (every student prompt retokenized); warm: a second pass (prompts memoized, as
    in every epoch after the first)."""
    import torch

    from kdpipe.pipeline.train.xtok.align import Aligner
    from kdpipe.pipeline.train.xtok.collate import XCollate, alignment_summary
    from kdpipe.storage import StoreReader

    recs = []
    for r in StoreReader(str(store), shuffle=False):
        recs.append(r)
        if len(recs) >= rows:
            break
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    xc = XCollate(Aligner(student_tok, teacher_tok, identical=False), option, 1.0, 0.9, 0)
    n = sum(len(r.target_positions) for r in recs)
    out = {}
    for name in ("cold", "warm"):
        t0 = time.process_time()
        stats = [xc(recs[i:i + batch_rows]).stats for i in range(0, len(recs), batch_rows)]
        out[name] = n / max(time.process_time() - t0, 1e-9)
    return {"align_tokens_per_s": out["cold"], "align_tokens_per_s_warm": out["warm"], "teacher_target_tokens": n,
            "rows": len(recs), **alignment_summary(stats)}


def step_time_ratio(store: Path, init_b: Path, teacher_tok, student_tok, args, option: str, reps: int = 7) -> dict:
    """Forward + backward of one micro-batch of the student B, per target token: the cross-tokenizer
    loss on the aligned rows against same-tokenizer KD on the same student tokens (the same model,
    input ids and N target tokens, with K teacher entries per token in the student's own vocabulary).

    Runs alternate between the two, and the median is taken, so the shared machine's load hits both alike.
    Alignment is not in either: it runs in the data thread (see alignment_figures)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdpipe.pipeline.train.chunked import LossSpec
    from kdpipe.pipeline.train.student_loss import StudentLoss, batch_inputs
    from kdpipe.pipeline.train.xtok.align import Aligner
    from kdpipe.pipeline.train.xtok.collate import XCollate
    from kdpipe.storage import StoreReader

    recs = []
    for r in StoreReader(str(store), shuffle=False):
        recs.append(r)
        if sum(len(x.input_ids) for x in recs) >= args.tokens_per_batch:
            break
    xb = XCollate(Aligner(student_tok, teacher_tok, identical=False), option, 1.0, 0.9, 0)(recs)
    N, K = xb.num_targets, xb.xtok["kd_ids"].shape[1]
    V = len(student_tok)
    g = torch.Generator().manual_seed(0)
    same = batch_inputs(xb, torch.device("cpu"), False)
    same.update(teacher_ids=torch.randint(0, V, (N, K), generator=g),
                teacher_logprobs=torch.log_softmax(torch.randn(N, K + 1, generator=g) * 3, -1)[:, :K].sort(-1, descending=True).values,
                teacher_tail=torch.full((N,), 0.05))
    cross = batch_inputs(xb, torch.device("cpu"), True)
    model = AutoModelForCausalLM.from_pretrained(init_b, dtype=torch.float32)
    spec = LossSpec(alpha=0.5, chunk_size=1024)
    mods = {"same_tokenizer": (StudentLoss(model, V, spec), same), "cross_tokenizer": (StudentLoss(model, V, spec, option), cross)}
    times: dict[str, list[float]] = {k: [] for k in mods}
    for i in range(reps + 1):
        for name, (mod, inputs) in mods.items():
            t0 = time.perf_counter()
            mod(**inputs)["loss"].backward()
            model.zero_grad(set_to_none=True)
            if i:
                times[name].append(time.perf_counter() - t0)
    out = {k: {"step_s": sorted(v)[len(v) // 2], "target_tokens": N} for k, v in times.items()}
    out["ratio"] = out["cross_tokenizer"]["step_s"] / out["same_tokenizer"]["step_s"]
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, list[float]]:
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, [float("nan"), float("nan")]
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    h = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean, [mean - h, mean + h]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-output/xtok")
    ap.add_argument("--quality-root", default="bench-output/quality",
                    help="qualitylib cache of the teacher and corpus (shared with bench_quality; trained if empty)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tokens-per-batch", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--transfer-limit", type=int, default=None, help="first N transfer documents only (reduced run)")
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--student-vocab", type=int, default=3000, help="tokenizer B's size (Unigram + byte fallback)")
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a qualitylib.QualitySettings field (another --quality-root then: the shared cache is read-only)")
    args = ap.parse_args()
    t_start = time.perf_counter()

    from qualitylib import ensure_teacher, recorded_settings
    from transformers import AutoTokenizer

    seeds = [int(s) for s in args.seeds.split(",")]
    options = [o for o in args.options.split(",") if o]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if not overrides and recorded_settings(Path(args.quality_root)):
        # The cached teacher's own settings, so its hash matches and it (and its bases) are reused, never retrained here.
        overrides = recorded_settings(Path(args.quality_root))
        log(f"reusing the cached teacher under {args.quality_root} with its settings {overrides}")
    T = ensure_teacher(Path(args.quality_root), log=log, **overrides)
    if T["teacher_seconds"]:
        log(f"the teacher cache was empty: trained it first ({T['teacher_seconds']:.0f} s)")
    tok_a = AutoTokenizer.from_pretrained(T["teacher"])
    tok_b_dir = student_tokenizer(out, T["corpus"], args.student_vocab)
    tok_b = AutoTokenizer.from_pretrained(tok_b_dir)
    log(f"tokenizer A: byte-level BPE {len(tok_a)}; tokenizer B: Unigram + byte fallback {len(tok_b)}")
    store = ensure_store(out, T["teacher"], T["data"]["transfer"], args)

    held = T["corpus"]["heldout"][: args.eval_samples]
    prompts = student_prompts(tok_a, tok_b, [r["document"] for r in held])
    refs = [r["summary"] for r in held]
    scores: dict[str, list[float]] = {o: [] for o in options + ["fallback"]}
    per_example: dict[str, list[list[float]]] = {o: [] for o in scores}
    for seed in seeds:
        # the student's base in tokenizer B: pretrained on the same text as every base, in its own tokenization
        init = T["student_init"](seed, tokenizer=tok_b_dir)
        for name in scores:
            kw = dict(alpha=1.0) if name == "fallback" else dict(alpha=0.5, cross_tokenizer=name)
            final = train_run(out / "runs" / f"{name}-s{seed}", init, store, seed, args, **kw)
            r = rouge_l(final, prompts, refs, args.max_new_tokens)
            per_example[name].append(r)
            scores[name].append(sum(r) / len(r))
            log(f"seed {seed} {name}: ROUGE-L {scores[name][-1]:.4f}")
        print(json.dumps({"seed": seed, "partial": True, **{k: round(v[-1], 4) for k, v in scores.items()}}), flush=True)

    means = {k: sum(v) / len(v) for k, v in scores.items()}
    best = max(options, key=lambda o: means[o])
    wins = sum(b > f for b, f in zip(scores[best], scores["fallback"]))
    mean_diff, ci = paired(scores[best], scores["fallback"])
    al = alignment_figures(store, tok_a, tok_b, "hybrid", rows=512)  # hybrid: its mapped-group share at the threshold
    st = step_time_ratio(store, T["student_init"](seeds[0], tokenizer=tok_b_dir), tok_a, tok_b, args, best)
    n = len(seeds)
    reduced = n < 5 or args.steps < 300 or args.transfer_limit is not None or args.eval_samples < 300
    minutes = (time.perf_counter() - t_start) / 60
    goals = {
        "best_beats_fallback_in_4_of_5_seeds": (wins >= 4) if n == 5 else None,
        "mean_ci_above_0": bool(ci[0] > 0) if n >= 2 else None,
        "step_time_ratio_le_1_3": st["ratio"] <= 1.3,
        "align_ge_200k_tokens_per_s_per_core": al["align_tokens_per_s"] >= 200_000,
        "under_60_minutes": minutes <= 60,
    }
    print(json.dumps({
        "options": {o: {"rougeL": [round(x, 4) for x in scores[o]], "mean": round(means[o], 4)} for o in options},
        "fallback": {"rougeL": [round(x, 4) for x in scores["fallback"]], "mean": round(means["fallback"], 4)},
        "best": best, "wins": wins, "seeds": n, "mean_diff": round(mean_diff, 4), "ci": [round(x, 4) for x in ci],
        "step_time_ratio": round(st["ratio"], 3), "step_times": st,
        "align_tokens_per_s": round(al["align_tokens_per_s"]), "align_tokens_per_s_warm": round(al["align_tokens_per_s_warm"]),
        "one_to_one_share": round(al["one_to_one_share"], 4),
        "mapped_group_share": round(al["mapped_group_share"], 4), "mapped_mass": round(al["mapped_mass"], 4),
        "goals": goals, "minutes": round(minutes, 1),
        "settings": {"reduced": reduced, "seeds": seeds, "steps": args.steps, "lr": args.lr, "alpha": 0.5,
                     "tokens_per_batch": args.tokens_per_batch, "top_k": args.top_k, "transfer_limit": args.transfer_limit,
                     "eval_samples": len(held), "max_new_tokens": args.max_new_tokens, "tokenizer_a": len(tok_a),
                     "tokenizer_b": len(tok_b), "teacher": str(T["teacher"]), "teacher_hash": T["teacher_hash"][:12],
                     "quality_settings": overrides, "teacher_trained_here_s": T["teacher_seconds"],
                     "load_average": os.getloadavg()[0]},
    }))


if __name__ == "__main__":
    main()
