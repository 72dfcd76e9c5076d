"""What the KD loss costs on top of plain CE fine-tuning, on CPU.

A student with a 32k vocabulary (Llama, 2 layers, hidden 256), a batch of 2 sequences of 512
tokens (1022 target tokens), one training step = forward + backward + AdamW step, through the
same `StudentLoss` module train-student uses:

  ce     chunked CE alone (alpha = 1: the teacher tensors are not even read)
  kd     alpha = 0.5, forward KL, k = 64, bucket tail, T = 1 (the default KD setting; loss_backward recompute)
  kd_if  the same with loss_backward = in_forward (gradients per chunk in the forward pass, fused.py):
         which of the two the CPU default should be (config.loss_defaults)
  naive  KD by materializing dense [N, V] teacher and student probability tensors from full
         [B, T, V] logits (what the chunked sparse loss avoids)
  hf_ce  transformers' own `model(labels=...)` loss: plain fine-tuning as most trainers do it

Memory: each variant in its own subprocess (a fresh allocator, MALLOC_MMAP_THRESHOLD_ fixed so
that RSS follows live memory), two steps; the process's RSS
high-water mark (getrusage ru_maxrss) minus its RSS just before the first step (after gc +
malloc_trim) = the memory the step itself needs (gradients, AdamW state, activations, logits).
The whole-process peak is reported too (process_mem_ratio). Time: all variants in one process
after a warm-up step each, interleaved for `--rounds` rounds so that load from other processes
hits them alike; the minimum per variant is kept. time_ratio uses the process CPU time of the
step (with --threads 1, the step's own work: this benchmark runs on shared 2-core machines where
wall time mostly measures the other processes); wall-clock ratios are reported beside it.

Last line: {"time_ratio": kd/ce (CPU time), "mem_ratio": kd/ce, "naive_time_ratio": naive/ce,
"naive_mem_ratio": naive/ce, ...}; hf_ce ratios are extra keys (kd vs transformers' CE).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time

V, H, LAYERS, B, T, K = 32000, 256, 2, 2, 512, 64
VARIANTS = ("ce", "kd", "kd_if", "naive", "hf_ce")


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def build(threads: int, chunk: int = 1024):
    """The student, the batch, the teacher targets, and a step function per variant."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdpipe.pipeline.train.chunked import LossSpec
    from kdpipe.pipeline.train.student_loss import StudentLoss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=688, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    input_ids = torch.randint(0, V, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    pred_index = torch.cat([b * T + torch.arange(0, T - 1) for b in range(B)])  # [N] every position predicts
    target_ids = input_ids.view(-1)[pred_index + 1]
    n = pred_index.numel()
    # Teacher top-64 ids / log-probs / tail, built in small chunks (no [N, V] tensor during setup).
    ids, lps, tails = [], [], []
    for s in range(0, n, 64):
        lp = torch.log_softmax(torch.randn(min(64, n - s), V) * 2, -1)
        v, i = lp.topk(K, -1)
        ids.append(i), lps.append(v), tails.append((1 - v.exp().sum(-1)).clamp_min(0))
    teacher_ids, teacher_lp, teacher_tail = torch.cat(ids), torch.cat(lps), torch.cat(tails)
    del ids, lps, tails, lp
    labels = torch.full_like(input_ids, -100)
    labels.view(-1)[pred_index + 1] = target_ids
    modules = {name: StudentLoss(model, V, LossSpec(alpha=alpha, temperature=1.0, divergence="forward_kl",
                                                    tail_mode="bucket", backward=backward,
                                                    chunk_size=chunk))
               for name, alpha, backward in (("ce", 1.0, "recompute"), ("kd", 0.5, "recompute"),
                                             ("kd_if", 0.5, "in_forward"))}

    def loss_ce():
        return modules["ce"](input_ids, attention_mask, pred_index, target_ids)["loss"] / n

    def loss_kd():
        return modules["kd"](input_ids, attention_mask, pred_index, target_ids, teacher_ids, teacher_lp, teacher_tail)["loss"] / n

    def loss_kd_if():
        return modules["kd_if"](input_ids, attention_mask, pred_index, target_ids, teacher_ids, teacher_lp, teacher_tail)["loss"] / n

    def loss_naive():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # [B, T, V]
        z = logits.view(-1, V)[pred_index]  # [N, V]
        log_q = torch.log_softmax(z, -1)  # [N, V] dense student log-probabilities
        p = torch.zeros_like(log_q).scatter_(1, teacher_ids, teacher_lp.exp())  # [N, V] dense teacher probabilities
        p = p + (p == 0) * (teacher_tail / (V - K)).unsqueeze(-1)  # tail spread over the other ids
        kl = (p * (p.clamp_min(1e-30).log() - log_q)).sum(-1)
        ce = -log_q.gather(-1, target_ids[:, None]).squeeze(-1)
        return (0.5 * ce + 0.5 * kl).sum() / n

    def loss_hf_ce():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fns = {"ce": loss_ce, "kd": loss_kd, "kd_if": loss_kd_if, "naive": loss_naive, "hf_ce": loss_hf_ce}

    def step(name: str) -> float:
        loss = fns[name]()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def measure_memory(name: str, threads: int, chunk: int) -> dict:
    """One variant in this (fresh) process: RSS high-water of a step over the RSS before it."""
    step = build(threads, chunk)
    _trim()
    rss0 = _rss_kb()
    step(name)
    step(name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": name, "step_peak_mb": (peak - rss0) / 1024, "process_peak_mb": peak / 1024, "rss_before_mb": rss0 / 1024}


def measure_time(rounds: int, threads: int, chunk: int) -> dict:
    """All variants in one process, interleaved round by round (load drifts hit them alike); min per variant."""
    step = build(threads, chunk)
    names = VARIANTS
    for nm in names:
        step(nm)  # warm-up (AdamW state, allocator)
    cpu: dict[str, list[float]] = {nm: [] for nm in names}
    wall: dict[str, list[float]] = {nm: [] for nm in names}
    for _ in range(rounds):
        for nm in names:
            c0, w0 = time.process_time(), time.perf_counter()
            step(nm)
            cpu[nm].append(time.process_time() - c0)
            wall[nm].append(time.perf_counter() - w0)
    return {"cpu": cpu, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per variant (interleaved); min is kept")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; with 1 the CPU time of a step is its work, whatever else runs on the machine")
    ap.add_argument("--chunk-size", type=int, default=1024,
                    help="loss_chunk_size of every variant (1022 target tokens: below 1022 the chunks are checkpointed)")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_of:
        print(json.dumps(measure_memory(a.memory_of, a.threads, a.chunk_size)))
        return
    mem = {}
    for v in VARIANTS:
        # A fixed mmap threshold: every large tensor is its own mapping, returned to the OS when freed,
        # so RSS follows live memory. With glibc's default (dynamic) threshold, freed [N, V] buffers
        # stay in the heap and the same step measures ±50 MB apart from run to run.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        p = subprocess.run([sys.executable, __file__, "--memory-of", v, "--threads", str(a.threads), "--chunk-size", str(a.chunk_size)],
                           capture_output=True, text=True, check=True, env=env)
        mem[v] = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(mem[v]), file=sys.stderr)
    times = measure_time(a.rounds, a.threads, a.chunk_size)
    print(json.dumps({"times_s": times}), file=sys.stderr)
    t = {v: min(x) for v, x in times["cpu"].items()}
    tw = {v: min(x) for v, x in times["wall"].items()}
    m = {v: r["step_peak_mb"] for v, r in mem.items()}
    pm = {v: r["process_peak_mb"] for v, r in mem.items()}
    out = {
        "time_ratio": round(t["kd"] / t["ce"], 4),
        "mem_ratio": round(m["kd"] / m["ce"], 4),
        "naive_time_ratio": round(t["naive"] / t["ce"], 4),
        "naive_mem_ratio": round(m["naive"] / m["ce"], 4),
        "process_mem_ratio": round(pm["kd"] / pm["ce"], 4),
        "wall_time_ratio": round(tw["kd"] / tw["ce"], 4),
        "naive_wall_time_ratio": round(tw["naive"] / tw["ce"], 4),
        "kd_in_forward_vs_recompute_time_ratio": round(t["kd_if"] / t["kd"], 4),
        "kd_in_forward_vs_recompute_mem_ratio": round(m["kd_if"] / m["kd"], 4),
        "kd_vs_hf_ce_time_ratio": round(t["kd"] / t["hf_ce"], 4),
        "kd_vs_hf_ce_mem_ratio": round(m["kd"] / m["hf_ce"], 4),
        "cpu_time_s": {k: round(x, 4) for k, x in t.items()},
        "wall_time_s": {k: round(x, 4) for k, x in tw.items()},
        "threads": a.threads, "chunk_size": a.chunk_size,
        "step_peak_mb": {k: round(x, 1) for k, x in m.items()},
        "vocab": V, "seq_len": T, "batch": B, "top_k": K, "target_tokens": B * (T - 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
