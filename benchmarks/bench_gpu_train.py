"""`kdpipe train-student` itself on one GPU at 1B scale: tokens/s, step times, data wait, MFU, resume.

bench_gpu.py times one step of a 2-layer model in a loop of its own; this runs the whole command
users run: the store read from disk by the streaming reader, collate, the prefetch thread, the
per-step all-reduce and logging, checkpointing and --resume, each run a fresh `kdpipe
train-student` process (the real CLI, `python -c "...cli.main()" train-student ...`).

Setup, all under --out: a tokenizer with Llama-3.2's vocabulary size (128,256; a WordLevel
vocabulary built here, no download), a student with Llama-3.2-1B's shape (16 layers, hidden 2048,
32 heads, 8 KV heads, MLP 8192, tied embeddings; random init, saved in bf16), and a topk store
(top-64 + tail) written with the store API (ShardWriter, finalize_store) for ~2.1M target tokens
in 1,024 sequences of 2,048 tokens (random tokens, a synthetic teacher distribution: what is
measured is throughput, not learning).

Runs, each 60 optimizer steps of 8 × 2,048 tokens (16,376 target tokens), timed after the first 10:
  kd     train-student --alpha 0.5 (forward KL, bucket tail, T = 1, the CUDA loss defaults) with
         --save-every 40: one checkpoint within the run (and one at the end)
  resume checkpoint-60 and final removed, train-student --resume: steps 41-60 again from
         checkpoint-40; their losses must equal the kd run's (the curve continues exactly)
  ce     train-student --alpha 1 on the same store (CE only; the teacher columns are not read)
  plain  the floor: the same batches (read ahead from the store, not timed) through a plain loop,
         HF `model(input_ids, labels=...)` + torch AdamW, bf16 autocast over float32 weights as
         train-student, in this process
Step times and data wait come from each run's RUN/metrics.jsonl (step_s, data_wait_s: the time in
next(data), max_memory_gib), which train-student writes for every step.

Figures: tokens/s (input tokens over the timed steps' wall time), step median / p90, peak memory
(the allocator's high-water mark), data-wait share (Σ data_wait_s / Σ step_s), MFU = tokens/s ×
FLOPs per token / the bf16 rate measured at start on an 8192³ matmul. FLOPs per token =
6·N (N = the weights of every matmul: attention and MLP projections and the lm_head, 1.24e9) +
12·L·H·T (attention scores and values, forward + backward, PaLM's appendix B; no causal discount).
Goals (last-line JSON "goals"): kd tokens/s ≥ 0.97 × ce and ≥ 0.95 × plain; data wait < 2% of
step time; MFU ≥ 40%; resumed losses equal to the uninterrupted run's (max relative difference
≤ 1e-6; "resume_bitwise" says whether they are identical).

Needs torch (CUDA) + transformers + the store's numpy, pyarrow, xxhash, and the CLI's click and tomli-w
(small pure-Python wheels); no `pip install` of kdpipe (the checkout goes on the path as `kdpipe`). One H200: < 8 minutes.
`--smoke` runs the same code on CPU with a tiny shape (a test runs it): figures mean nothing there,
goals other than resume are null.

Last line: {"device", "date", "torch", "transformers", "shape", "matmul_tflops", "flops_per_token",
"runs": {"kd"|"ce"|"plain": {"tokens_per_s", "step_median_s", "step_p90_s", "peak_gib",
"data_wait_share", "mfu"}}, "kd_vs_ce", "kd_vs_plain", "resume_max_rel_diff", "resume_bitwise",
"goals", "seconds", "smoke"}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256, seq=2048, seqs=1024,
            rows_per_step=8, top_k=64, steps=60, warm=10, save_at=40)
SMOKE = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1000, seq=64, seqs=64,
             rows_per_step=4, top_k=8, steps=8, warm=2, save_at=5)
RUN_FIELDS = ("tokens_per_s", "step_median_s", "step_p90_s", "peak_gib", "data_wait_share", "mfu")
FIELDS = ("device", "date", "torch", "transformers", "shape", "matmul_tflops", "flops_per_token", "runs", "kd_vs_ce",
          "kd_vs_plain", "resume_max_rel_diff", "resume_bitwise", "goals", "seconds", "smoke")
GOALS = ("kd_ge_0.97x_ce", "kd_ge_0.95x_plain", "data_wait_lt_2pct", "mfu_ge_40pct", "resume_exact")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MARKER = ".bench_gpu_train"


def _kdpipe_path() -> str:
    """A folder holding a link `kdpipe` -> this checkout (the repository root is the kdpipe namespace)."""
    try:
        import kdpipe.pipeline

        return str(Path(kdpipe.pipeline.__file__).resolve().parents[2])
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="kdpipe-path-"))
        (shim / "kdpipe").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
        sys.path.insert(0, str(shim))
        return str(shim)


def log(msg: str) -> None:
    print(f"[bench_gpu_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- setup


def build_tokenizer(out: Path, vocab: int):
    """A WordLevel tokenizer of exactly `vocab` ids ("w4" ... and the specials), saved as a fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(out)
    assert len(fast) == vocab
    return fast


def build_student(out: Path, shape: dict, tok) -> int:
    """Llama-3.2-1B's shape, random init, saved in bf16; returns N, the weights of every matmul (lm_head included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(2048, shape["seq"]),
                      rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    layers = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    return layers + shape["vocab"] * shape["hidden"]


def build_store(out: Path, shape: dict, tok) -> int:
    """A finalized topk store: `seqs` sequences of `seq` random tokens, a synthetic top-k + tail per target."""
    import numpy as np

    from kdpipe.storage import CodecConfig, ShardWriter, StoreMeta, finalize_store, tokenizer_fingerprint

    V, K, T = shape["vocab"], shape["top_k"], shape["seq"]
    meta = StoreMeta(teacher="bench-synthetic-teacher", teacher_revision=None,
                     tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=V, recipe="bench", recipe_params={},
                     codec=CodecConfig(name="topk", top_k=K), dataset_fingerprint=f"bench-gpu-train-{shape['seqs']}",
                     generation_params={})
    rng = np.random.default_rng(0)
    pos = np.arange(1, T)  # every position after the first is a target
    gap = max(1, min(1000, (V - len(SPECIALS)) // (2 * K)))
    with ShardWriter(out, meta, task_index=0, num_tasks=1) as w:
        for i in range(shape["seqs"]):
            ids = rng.integers(len(SPECIALS), V, T)
            ids[0] = tok.bos_token_id
            # [P, K] distinct ids per row (increasing by random gaps, as incompressible as real ids), the
            # teacher's top-1 the next token; log-probs sorted, varying per row, 10% tail mass
            start = rng.integers(len(SPECIALS), V - K * gap, (T - 1, 1))
            top = start + np.cumsum(rng.integers(1, gap + 1, (T - 1, K)), axis=1) - 1
            top[:, 1:] = np.where(top[:, 1:] == ids[1:, None], len(SPECIALS) - 1, top[:, 1:])  # no id twice
            top[:, 0] = ids[1:]
            z = -np.cumsum(rng.exponential(0.3, (T - 1, K)), axis=1)  # [P, K] decreasing logits
            lp = (z - np.log(np.exp(z).sum(axis=1, keepdims=True)) + np.log(0.9)).astype(np.float32)
            w.add(f"b{i:05d}", ids, pos, top, lp)
    finalize_store(out)
    return shape["seqs"] * (T - 1)


def matmul_tflops(device) -> float:
    """The bf16 rate on one large matmul (8192³ on CUDA), TFLOP/s: the MFU denominator."""
    import torch

    n = 8192 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# ------------------------------------------------------------------------------- runs


def train_student(py_path: str, args: list[str], out: Path, log_file: Path) -> None:
    """One `kdpipe train-student` process (the CLI's main), its output in log_file."""
    env = {**os.environ, "PYTHONPATH": py_path + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor-cache"), "KDPIPE_REPORT_TO": "none"}
    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'kdpipe'; from kdpipe.pipeline.cli import main; "
           "sys.exit(main())", "train-student", *args]
    with open(log_file, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"bench_gpu_train: train-student failed ({p.returncode}); see {log_file}:\n"
                         + "".join(log_file.read_text().splitlines(True)[-15:]))


def summarize(rows: list[dict], warm: int, flops_per_token: float, tflops: float) -> dict:
    """Per-run figures from metrics.jsonl rows (training lines) after the first `warm` steps."""
    timed = [r for r in rows if "split" not in r and r["step"] > warm]
    steps = sorted(r["step_s"] for r in timed)
    total = sum(steps)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in timed)
    tps = tokens / total
    peak = max((r.get("max_memory_gib") for r in timed if r.get("max_memory_gib") is not None), default=None)
    return {"tokens_per_s": round(tps, 1), "step_median_s": round(statistics.median(steps), 4),
            "step_p90_s": round(steps[min(len(steps) - 1, int(0.9 * len(steps)))], 4),
            "peak_gib": None if peak is None else round(peak, 2),
            "data_wait_share": round(sum(r["data_wait_s"] for r in timed) / total, 4),
            "mfu": round(tps * flops_per_token / (tflops * 1e12), 4), "steps_timed": len(timed)}


def plain_loop(student: Path, store: Path, shape: dict, device, warm: int, flops_per_token: float, tflops: float) -> dict:
    """The floor: HF model(labels=...) + AdamW over the same rows (read ahead, not timed), bf16 autocast."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdpipe.storage.reader import StoreReader

    it = iter(StoreReader(str(store), shuffle=False))
    rows = shape["rows_per_step"]
    batches = []
    for _ in range(shape["steps"]):
        ids = torch.stack([torch.as_tensor(next(it).input_ids, dtype=torch.long) for _ in range(rows)])  # [B, T]
        batches.append(ids.to(device))
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).to(device)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out = []
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = float(loss.detach())  # waits for the device
        dt = time.perf_counter() - t0
        out.append({"step": i + 1, "step_s": dt, "data_wait_s": 0.0, "tokens_per_s": ids.numel() / dt, "loss": loss_v,
                    "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None})
    del model, opt
    return summarize(out, warm, flops_per_token, tflops)


def read_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="one folder for everything: tokenizer, student, store, runs, result")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU: the code path, not figures")
    ap.add_argument("--keep", action="store_true", help="keep the runs' checkpoints and final models (GBs at 1B)")
    a = ap.parse_args(argv)
    t_start = time.time()
    py_path = _kdpipe_path()
    import torch
    import transformers

    shape = dict(SMOKE if a.smoke else FULL)
    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        raise SystemExit("bench_gpu_train: no CUDA device; run with --smoke for the tiny CPU shape")
    device = torch.device("cuda" if cuda else "cpu")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SystemExit(f"bench_gpu_train: {out} exists and is not an earlier output of this benchmark; "
                             "choose a new --out")
        shutil.rmtree(out)  # an earlier run of this benchmark: start over
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by benchmarks/bench_gpu_train.py; rerunning it with this --out replaces it\n")
    tflops = matmul_tflops(device)
    log(f"{device}: {tflops:.1f} TFLOP/s on one matmul")
    tok = build_tokenizer(out / "tokenizer", shape["vocab"])
    n_matmul = build_student(out / "student", shape, tok)
    flops_per_token = 6 * n_matmul + 12 * shape["layers"] * shape["hidden"] * shape["seq"]
    log(f"student: {n_matmul / 1e9:.3f}e9 matmul weights, {flops_per_token / 1e9:.2f} GFLOP per token")
    t0 = time.time()
    n_targets = build_store(out / "store", shape, tok)
    log(f"store: {n_targets} target tokens in {time.time() - t0:.0f} s")

    tokens_per_batch = shape["rows_per_step"] * shape["seq"]
    common = ["--student", str(out / "student"), "--store", str(out / "store"), "--steps", str(shape["steps"]),
              "--tokens-per-batch", str(tokens_per_batch), "--lr", "1e-4", "--warmup-steps", "5", "--seed", "0",
              "--shuffle-buffer", "64", "--log-every", "10", "--device", "cuda" if cuda else "cpu"]
    runs: dict[str, dict] = {}
    kd_run, ce_run = out / "runs" / "kd", out / "runs" / "ce"
    (out / "runs").mkdir()
    log("kd: train-student --alpha 0.5")
    train_student(py_path, common + ["--out", str(kd_run), "--alpha", "0.5", "--save-every", str(shape["save_at"])],
                  out, out / "runs" / "kd.log")
    kd_rows = read_rows(kd_run)
    runs["kd"] = summarize(kd_rows, shape["warm"], flops_per_token, tflops)
    log(f"kd: {runs['kd']}")
    # --resume from checkpoint-<save_at>: the last steps again, their losses against the uninterrupted run's
    for d in kd_run.glob("checkpoint-*"):
        if d.name != f"checkpoint-{shape['save_at']}":
            shutil.rmtree(d)
    shutil.rmtree(kd_run / "final", ignore_errors=True)
    (kd_run / "metrics.uninterrupted.jsonl").write_text((kd_run / "metrics.jsonl").read_text())
    log(f"resume: train-student --resume from checkpoint-{shape['save_at']}")
    train_student(py_path, common + ["--out", str(kd_run), "--alpha", "0.5", "--save-every", str(shape["save_at"]),
                                     "--resume"], out, out / "runs" / "kd-resume.log")
    resumed = {r["step"]: r["loss"] for r in read_rows(kd_run) if "split" not in r and r["step"] > shape["save_at"]}
    want = {r["step"]: r["loss"] for r in kd_rows if "split" not in r and r["step"] > shape["save_at"]}
    if sorted(resumed) != sorted(want):
        raise SystemExit(f"bench_gpu_train: resumed steps {sorted(resumed)} != {sorted(want)}")
    rel = max(abs(resumed[s] - want[s]) / max(abs(want[s]), 1e-12) for s in want)
    bitwise = all(resumed[s] == want[s] for s in want)
    log(f"resume: max relative loss difference {rel:.3g} (bitwise equal: {bitwise})")
    if not a.keep:
        for d in list(kd_run.glob("checkpoint-*")) + [kd_run / "final"]:
            shutil.rmtree(d, ignore_errors=True)

    log("ce: train-student --alpha 1")
    train_student(py_path, common + ["--out", str(ce_run), "--alpha", "1.0", "--save-every", "0"], out,
                  out / "runs" / "ce.log")
    runs["ce"] = summarize(read_rows(ce_run), shape["warm"], flops_per_token, tflops)
    log(f"ce: {runs['ce']}")
    if not a.keep:
        shutil.rmtree(ce_run / "final", ignore_errors=True)
    log("plain: HF model(labels=...) + AdamW")
    runs["plain"] = plain_loop(out / "student", out / "store", shape, device, shape["warm"], flops_per_token, tflops)
    log(f"plain: {runs['plain']}")

    kd_vs_ce = runs["kd"]["tokens_per_s"] / runs["ce"]["tokens_per_s"]
    kd_vs_plain = runs["kd"]["tokens_per_s"] / runs["plain"]["tokens_per_s"]
    real = cuda and not a.smoke

    def goal(ok: bool):
        return ok if real else None

    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": {**shape, "target_tokens_in_store": n_targets, "matmul_weights": n_matmul},
        "matmul_tflops": round(tflops, 3), "flops_per_token": flops_per_token, "runs": runs,
        "kd_vs_ce": round(kd_vs_ce, 4), "kd_vs_plain": round(kd_vs_plain, 4),
        "resume_max_rel_diff": rel, "resume_bitwise": bitwise,
        "goals": {"kd_ge_0.97x_ce": goal(kd_vs_ce >= 0.97), "kd_ge_0.95x_plain": goal(kd_vs_plain >= 0.95),
                  "data_wait_lt_2pct": goal(runs["kd"]["data_wait_share"] < 0.02),
                  "mfu_ge_40pct": goal(runs["kd"]["mfu"] >= 0.40), "resume_exact": rel <= 1e-6},
        "seconds": round(time.time() - t_start, 1), "smoke": bool(a.smoke),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
