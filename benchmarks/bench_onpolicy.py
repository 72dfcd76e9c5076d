"""On-policy rounds vs off-policy KD at an equal budget (issue 14's benchmark).

Real corpus and teacher of the quality benchmark (benchmarks/qualitylib.py: the Debian package
descriptions, its cached teacher; trained first when the cache is empty, and said so). Per seed,
two arms share the student initialization, the number of student optimizer steps S and the
number of teacher-scored rows (sequences):

  off_policy  KD for S steps on the teacher's greedy summaries of the transfer set (store off)
              + the teacher's own sampled summaries of the round prompts (store off_extra: as
              many rows as the on-policy rounds score, so both arms get the same teacher rows);
  on_policy   KD for S/2 steps on store off, then R rounds: the student samples N completions
              per round prompt under the on-policy recipe, the teacher scores them, and the
              student trains S/(2R) steps on that store (reverse KL, alpha 0; a fresh optimizer
              and schedule per round, from the previous round's final weights).

Measured on the held-out split: ROUGE-L of greedy summaries, and `rkl_own` = the exposure-bias
measure: the student samples its own held-out summaries (temperature 1, seeded) and the teacher
scores them: the mean per-token KL(q_student ‖ p_teacher) over the full vocabulary, exact (both
models' full distributions by forward pass). Round-by-round curves of the on-policy arm are
reported. Goals (issue 14): on-policy ROUGE-L beats off-policy in >= 4/5 seeds and on the mean
with the paired 95% CI above 0; lower rkl_own; <= 60 minutes on 2 cores.

    python benchmarks/bench_onpolicy.py [--seeds 0,1,2,3,4] [--steps 200] [--rounds 2] [--reduced]

Knobs of the rounds (the literature's: Agarwal et al.'s GKD, Thinking Machines' on-policy distillation), to be
chosen on the VALIDATION split (--split validation; the held-out split once, with the chosen setting):
  --round-divergence  reverse_kl (default: over the teacher's top-k + one tail bucket), generalized_jsd (--jsd-beta),
                      forward_kl, or reverse_kl_sampled_token (the per-token estimator of the FULL-vocabulary
                      KL(q‖p) at the sampled token, as in Thinking Machines' on-policy distillation);
  --round-mix W       each round also trains on store off at weight W against the round's store at 1 (0 = none):
                      the share of on-policy data is 1 / (1 + W);
  --round-temperature the student's sampling temperature in the rounds (1 = its own distribution);
  --round-lr          the rounds' learning rate (default: --lr);
  --round-top-k       entries the teacher keeps per position of the student's samples (default: --top-k): the
                      rounds' reverse KL sees only how much mass the student puts in the teacher's tail, not where,
                      so a wider top-k constrains more of what rkl_own measures.
Arm A and the first S/2 steps of arm B do not depend on them and are reused; each setting's rounds live under
seed-N/round-R<tag> (tag empty for the defaults).

--reduced: the same corpus with a smaller teacher (3x96, 300 steps, cached under OUT) and a
400-document transfer set, for a check on a busy machine (its JSON says reduced: true; its
figures are not the benchmark's).
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qualitylib import ensure_teacher, recorded_settings  # noqa: E402


def log(s: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ phase one
def gen_config(teacher: Path, data: Path, out: Path, args, **kw):
    from kdpipe.pipeline.generate.config import GenerateConfig

    base = dict(teacher=str(teacher), data=str(data), out=str(out), text_field="document", id_field="id", dtype="float32",
                max_model_len=512, enforce_eager=True, max_new_tokens=args.max_new_tokens, top_k=args.top_k, seed=0,
                progress=False, engine=args.engine)
    base.update(kw)
    return GenerateConfig(**base)


def make_store(cfg, teacher_engine=None) -> tuple[Path, int]:
    """Phase one + finalize (a finished store is reused); -> (store, teacher-scored target tokens)."""
    from kdpipe.pipeline.generate.run import generate_logits
    from kdpipe.storage import finalize_store, open_store

    store = Path(cfg.out)
    if not (store / "manifest.json").is_file():
        if store.exists():
            shutil.rmtree(store)
        t0 = time.perf_counter()
        generate_logits(cfg, engine=teacher_engine)
        finalize_store(str(store))
        log(f"store {store.name}: {time.perf_counter() - t0:.0f} s")
    m = open_store(store)
    return store, m.num_target_tokens


# ------------------------------------------------------------------------------------ phase two
def train_run(student: Path, stores: list[Path], out: Path, steps: int, args, seed: int, **kw) -> Path:
    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train

    if (out / "final" / "config.json").is_file():
        return out / "final"
    if out.exists():
        shutil.rmtree(out)
    kw.setdefault("lr", args.lr)
    cfg = TrainConfig(student=str(student), stores=tuple(map(str, stores)), out=str(out), steps=steps,
                      warmup_steps=max(1, steps // 20), tokens_per_batch=args.tokens_per_batch, seed=seed, save_every=0,
                      device="cpu", **kw)
    t0 = time.perf_counter()
    res = train(cfg)
    log(f"train {out.parent.name}/{out.name}: {steps} steps, {time.perf_counter() - t0:.0f} s, last loss {res.last['loss']:.4f}")
    return res.final


# ------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """ROUGE-L of greedy summaries and rkl_own (teacher-scored own samples) on the held-out prompts."""

    def __init__(self, teacher: Path, heldout: list[dict], args) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE
        from kdpipe.pipeline.prompts import Prompter

        self.torch, self.args = torch, args
        self.tok = AutoTokenizer.from_pretrained(teacher)
        prompter = Prompter(self.tok, True, None)
        self.prompts = [prompter.ids(DEFAULT_SUMMARIZE_TEMPLATE.replace("{text}", r["document"])) for r in heldout]
        self.refs = [r["summary"] for r in heldout]
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()

    def _generate(self, model, sample: bool, seed: int) -> list[list[int]]:
        torch = self.torch
        out = []
        eos = self.tok.convert_tokens_to_ids("<|end|>") if "<|end|>" in self.tok.get_vocab() else None
        stop = [t for t in (self.tok.eos_token_id, eos) if t is not None]
        for i in range(0, len(self.prompts), 32):
            batch = self.prompts[i : i + 32]
            L = max(map(len, batch))
            pad = self.tok.pad_token_id or 0
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch])
            if sample:
                torch.manual_seed(seed * 100003 + i)
            with torch.inference_mode():
                g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.args.max_new_tokens,
                                   do_sample=sample, temperature=1.0 if sample else None, top_p=1.0 if sample else None,
                                   top_k=0 if sample else None,
                                   eos_token_id=stop, pad_token_id=pad)
            for row in g[:, L:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
                out.append(row[:cut])
        return out

    def rouge_l(self, model) -> float:
        from kdpipe.pipeline.evaluate.metrics import rouge_scores

        gens = self._generate(model, sample=False, seed=0)
        texts = [self.tok.decode(g, skip_special_tokens=True) for g in gens]
        return float(rouge_scores(texts, self.refs)["rougeL"].mean())

    def rkl_own(self, model, seed: int) -> float:
        """Mean over the student's own sampled tokens of KL(q(.|prefix) ‖ p_teacher(.|prefix)), full vocabulary."""
        torch = self.torch
        gens = self._generate(model, sample=True, seed=seed)
        total, n = 0.0, 0
        for p, g in zip(self.prompts, gens):
            if not g:
                continue
            seq = torch.tensor([p + g])
            with torch.inference_mode():
                lq = torch.log_softmax(model(input_ids=seq).logits[0, len(p) - 1 : -1].double(), -1)  # [P, V]
                lp = torch.log_softmax(self.teacher(input_ids=seq).logits[0, len(p) - 1 : -1].double(), -1)
            V = min(lq.shape[-1], lp.shape[-1], len(self.tok))
            lq = lq[:, :V] - torch.logsumexp(lq[:, :V], -1, keepdim=True)
            lp = lp[:, :V] - torch.logsumexp(lp[:, :V], -1, keepdim=True)
            total += float((lq.exp() * (lq - lp)).sum())
            n += len(g)
        return total / max(n, 1)

    def measure(self, model_dir: Path, seed: int) -> dict:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.torch.float32).eval()
        return {"rougeL": self.rouge_l(model), "rkl_own": self.rkl_own(model, seed)}


def paired_ci(diffs: list[float]) -> list[float] | None:
    """95% t-interval of the mean paired difference (None with fewer than 2 seeds)."""
    if len(diffs) < 2:
        return None
    from scipy import stats

    m, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    h = float(stats.t.ppf(0.975, len(diffs) - 1)) * se
    return [m - h, m + h]


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-output/onpolicy")
    ap.add_argument("--quality-root", default="bench-output/quality", help="the quality benchmark's cache (teacher, corpus)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=200, help="S: student optimizer steps of each arm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--round-prompts", type=int, default=256, help="prompts per on-policy round (from the transfer set)")
    ap.add_argument("--heldout", type=int, default=128, help="held-out documents evaluated")
    ap.add_argument("--transfer-max", type=int, default=None, help="use only the first N transfer documents (both arms)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    ap.add_argument("--alpha", type=float, default=0.5, help="off-policy KD's CE weight (on-policy rounds: alpha 0)")
    ap.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    ap.add_argument("--reduced", action="store_true", help="small teacher + budgets (quick check; not the benchmark's figures)")
    ap.add_argument("--split", default="heldout", choices=("heldout", "validation"),
                    help="where ROUGE-L and rkl_own are measured: validation to choose the round knobs, heldout once")
    ap.add_argument("--round-divergence", default="reverse_kl",
                    choices=("reverse_kl", "generalized_jsd", "forward_kl", "reverse_kl_sampled_token"))
    ap.add_argument("--jsd-beta", type=float, default=0.5)
    ap.add_argument("--round-mix", type=float, default=0.0, help="weight of store off in each round (0 = rounds on their own samples only)")
    ap.add_argument("--round-temperature", type=float, default=1.0, help="the student's sampling temperature in the rounds")
    ap.add_argument("--round-lr", type=float, default=None, help="the rounds' lr (default: --lr)")
    ap.add_argument("--round-top-k", type=int, default=None, help="the rounds' top-k (default: --top-k)")
    args = ap.parse_args()
    t_start = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.steps % (2 * args.rounds):
        ap.error(f"--steps {args.steps} must be a multiple of 2 x --rounds = {2 * args.rounds}")
    out = Path(args.out)
    overrides: dict = {}
    root = Path(args.quality_root)
    if args.reduced:
        root = out / "quality-reduced"
        # The real (Debian) corpus, a smaller teacher trained for fewer steps, a smaller transfer set.
        overrides = dict(teacher_layers=3, teacher_hidden=96, teacher_steps=300, transfer_max=400)
    if not args.reduced and (root / "teacher" / "quality-teacher.json").is_file():
        # Read-only use of the shared cache: ask for exactly the recorded settings, so this never
        # retrains (overwrites) the quality benchmark's teacher when its defaults change later.
        overrides = recorded_settings(root)
    q = ensure_teacher(root, log=log, **overrides)
    if q["teacher_seconds"]:
        log(f"trained the quality teacher first (cache was empty or stale): {q['teacher_seconds']:.0f} s")
    teacher = q["teacher"]
    transfer = q["transfer"][: args.transfer_max] if args.transfer_max else q["transfer"]
    transfer_file = write_jsonl(out / "data" / "transfer.jsonl", transfer)
    eval_rows = q["corpus"][args.split][: args.heldout]  # --split validation: to choose the rounds' knobs
    if args.round_mix < 0 or args.round_temperature <= 0 or not 0 < args.jsd_beta < 1:
        ap.error("--round-mix must be >= 0, --round-temperature > 0, --jsd-beta in (0, 1)")
    knobs = {"divergence": args.round_divergence, "jsd_beta": args.jsd_beta if args.round_divergence == "generalized_jsd" else None,
             "mix": args.round_mix, "temperature": args.round_temperature, "lr": args.round_lr or args.lr,
             "top_k": args.round_top_k or args.top_k}
    defaults = {"divergence": "reverse_kl", "jsd_beta": None, "mix": 0.0, "temperature": 1.0, "lr": args.lr, "top_k": args.top_k}
    tag = "" if knobs == defaults else "-" + "-".join(f"{k}{v}" for k, v in knobs.items() if v != defaults[k])

    teacher_engine = None
    if args.engine == "vllm":
        from transformers import AutoTokenizer

        from kdpipe.pipeline.generate.engines import VllmEngine

        # temperature 1: the engine serves the greedy store and the sampled off_extra store
        ecfg = gen_config(teacher, out / "x.jsonl", out / "x", args, temperature=1.0, top_k=max(args.top_k, knobs["top_k"]))
        teacher_engine = VllmEngine.from_config(ecfg, 512, len(AutoTokenizer.from_pretrained(teacher)))

    # Round prompts: a seeded disjoint subset of the transfer set per round (the same for every seed).
    import random

    order = list(range(len(transfer)))
    random.Random(1).shuffle(order)
    M = min(args.round_prompts, len(transfer) // args.rounds)
    round_rows = [[transfer[i] for i in order[r * M : (r + 1) * M]] for r in range(args.rounds)]
    prompts_files = [write_jsonl(out / "data" / f"round-{r + 1}.jsonl", rows) for r, rows in enumerate(round_rows)]
    # Arm A's extra teacher rows: the teacher samples the same prompts as often as the rounds score them.
    extra_rows = [dict(r, id=f"{r['id']}@r{k + 1}") for k, rows in enumerate(round_rows) for r in rows]
    extra_file = write_jsonl(out / "data" / "off-extra.jsonl", extra_rows)

    store_off, tok_off = make_store(gen_config(teacher, transfer_file, out / "stores" / "off", args), teacher_engine)
    store_extra, tok_extra = make_store(gen_config(teacher, extra_file, out / "stores" / "off-extra", args, temperature=1.0, seed=1),
                                        teacher_engine)
    ev = Evaluator(teacher, eval_rows, args)
    half, per_round = args.steps // 2, args.steps // (2 * args.rounds)
    res = {"off_policy": {"rougeL": [], "rkl_own": []}, "on_policy": {"rougeL": [], "rkl_own": []}}
    curves, teacher_tokens = [], {"off_policy": [], "on_policy": []}
    for seed in seeds:
        init = q["student_init"](seed)
        sd = out / f"seed-{seed}"
        # ---- arm A: off-policy KD for S steps on the teacher's rows (same count as arm B's)
        a = train_run(init, [store_off, store_extra], sd / "off_policy", args.steps, args, seed, alpha=args.alpha,
                      divergence="forward_kl", store_weights=(1.0, len(extra_rows) / max(len(transfer), 1)))
        ma = ev.measure(a, seed)
        # ---- arm B: off-policy KD for S/2 steps, then R on-policy rounds of S/(2R) steps
        model = train_run(init, [store_off], sd / "half", half, args, seed, alpha=args.alpha, divergence="forward_kl")
        curve = [{"round": 0, "steps": half, **ev.measure(model, seed)}]
        tok_b = tok_off
        for r in range(1, args.rounds + 1):
            rd = sd / f"round-{r}{tag}"
            cfg = gen_config(teacher, prompts_files[r - 1], rd / "store", args, recipe="on-policy", sampler=str(model),
                             samples_per_prompt=args.samples_per_prompt, sampling_temperature=knobs["temperature"], seed=seed,
                             top_k=knobs["top_k"])
            store, tok = make_store(cfg, teacher_engine)
            tok_b += tok
            stores, weights = ([store, store_off], {"store_weights": (1.0, knobs["mix"])}) if knobs["mix"] else ([store], {})
            model = train_run(model, stores, rd / "run", per_round, args, seed, alpha=0.0, lr=knobs["lr"],
                              divergence=knobs["divergence"], jsd_beta=args.jsd_beta, **weights)
            curve.append({"round": r, "steps": half + r * per_round, "teacher_tokens": tok, **ev.measure(model, seed)})
            log(f"seed {seed} round {r}: {curve[-1]}")
        mb = {k: curve[-1][k] for k in ("rougeL", "rkl_own")}
        for arm, m in (("off_policy", ma), ("on_policy", mb)):
            res[arm]["rougeL"].append(round(m["rougeL"], 5))
            res[arm]["rkl_own"].append(round(m["rkl_own"], 5))
        teacher_tokens["off_policy"].append(tok_off + tok_extra)
        teacher_tokens["on_policy"].append(tok_b)
        curves.append({"seed": seed, "curve": curve})
        log(f"seed {seed}: off {ma}  on {mb}")
    if teacher_engine is not None:
        teacher_engine.close()

    diffs = [b - a for a, b in zip(res["off_policy"]["rougeL"], res["on_policy"]["rougeL"])]
    wins = sum(d > 0 for d in diffs)
    ci = paired_ci(diffs)
    rkl_lower = statistics.mean(res["on_policy"]["rkl_own"]) < statistics.mean(res["off_policy"]["rkl_own"])
    seconds = round(time.time() - t_start, 1)
    n = len(seeds)
    goals = {
        "wins_4_of_5": wins >= math.ceil(0.8 * n) if n >= 5 else None,
        "mean_ci_above_0": (ci[0] > 0) if ci else None,
        "lower_rkl_own": rkl_lower,
        "under_60_min": seconds <= 3600,
    }
    result = {
        **res, "wins": wins, "mean_diff": round(statistics.mean(diffs), 5), "ci": [round(x, 5) for x in ci] if ci else None,
        "rounds": args.rounds, "teacher_tokens": {k: round(statistics.mean(v)) for k, v in teacher_tokens.items()},
        "curves": curves, "goals": goals, "seconds": seconds,
        "settings": {"seeds": seeds, "steps": args.steps, "rounds": args.rounds, "samples_per_prompt": args.samples_per_prompt,
                     "round_prompts": M, "transfer_docs": len(transfer), "split": args.split, "eval_docs": len(eval_rows),
                     "round_knobs": knobs, "max_new_tokens": args.max_new_tokens, "top_k": args.top_k,
                     "engine": args.engine, "alpha_off_policy": args.alpha, "reduced": args.reduced,
                     "teacher": str(teacher), "teacher_config": q["config"]},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
