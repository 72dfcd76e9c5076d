"""Phase two at real scale on one GPU (issue 16): the KD step against the CE step, and the loss alone.

The student has Llama-3-8B's vocabulary (128,256) and hidden size (4096) but 2 decoder layers,
random init, bf16 weights (AdamW states bf16 too), bf16 autocast with the loss in float32, as
train-student runs it on CUDA. A step holds 8,192 target tokens (4 sequences of 2,049 tokens:
every position after the first is a target), with k = 64 teacher entries + the tail per target
read from a synthetic top-k store that this script writes itself (ShardWriter -> finalize ->
StoreReader -> collate: the store API phase two reads).

Each step is forward + loss + backward + AdamW step; after `--warmup` steps (torch.compile runs
there), the median of `--steps` steps, with the peak of torch.cuda.max_memory_allocated over the
measured steps (GiB, 2^30 bytes; a fresh model and optimizer per variant):

  ce          the student's own loss: transformers' `model(labels=...)` (full [B, T, V] logits)
  kd          kdpipe's chunked KD through StudentLoss: alpha 0.5, forward KL, bucket tail, T = 1
  kd_t2       the same at T = 2 (a second, tempered logsumexp per chunk)
  dense       KD through the dense reference path (losses.distillation_loss_parts on [N, V] logits)
  fsdp_kd     kd with the StudentLoss wrapped by FSDP2 (fully_shard per decoder layer + root), 1 GPU
  chunked_ce  kdpipe's chunked CE alone (alpha 1; extra)
  kd_other_backward   kd with the other LossSpec.backward mode (extra)

loss_only: the KD loss + backward alone, the lm_head matmul included, as Liger-Kernel measures
its fused-linear distillation losses: hidden [8192, 4096] and lm_head [128256, 4096] in bf16,
both requiring grad, through `chunked_loss_parts`, for each of `--chunk-sizes` × `--backwards`
(LossSpec.backward: "recompute" = checkpointed chunks, logits recomputed in backward, 4 matmuls
per chunk; "in_forward" = gradients computed in the forward pass, 3 matmuls, fused.py); the
fastest sets `chunk_size` and `backward` for the kd steps, and `kd_other_backward` repeats the
kd step with the other backward mode. Liger's published figure for its chunked JSD at this shape
on an H100 is 60.7 ms and 11.1 GB; note that Liger's loss also runs the teacher's lm_head
(its teacher input is hidden states), while kdpipe reads the teacher's top-k from the store.
Each config's `extra_gb` is its peak minus what the inputs (h, W, the batch) hold; the goal
`loss_only_within_3pct_le_3gib_extra` (issue 22 §3) asks for one config within 3% of the fastest
time with at most 3 GiB extra (`loss_only_lean_configs` lists them).

`--smoke` runs the same code on a small shape on CPU (a test runs it so this file cannot rot);
its figures mean nothing, and the goals are null. Imports: torch, transformers, kdpipe only.

Last line: {"device", "vocab", "tokens", "ce_ms", "kd_ms", "kd_t2_ms", "dense_ms", "fsdp_kd_ms",
"ce_peak_gb", "kd_peak_gb", "time_ratio", "mem_ratio", "loss_only_ms", "goals": {...}, ...extras}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(vocab=128256, hidden=4096, intermediate=14336, layers=2, heads=32, kv_heads=8, batch=4, seq=2049, k=64)
SMOKE = dict(vocab=1024, hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, batch=2, seq=65, k=8)
LIGER_JSD_H100 = {"ms": 60.7, "gb": 11.1}  # Liger-Kernel fused linear JSD, 8192 tokens x 128k vocab, H100
GOAL_RATIO = 1.10


def _kdpipe_importable() -> None:
    """Run from a bare checkout too (a GPU machine with torch + transformers but no `pip install -e`):
    the repository root is the `kdpipe` namespace (pyproject's package-dir), so put a link named
    kdpipe to it on sys.path."""
    try:
        import kdpipe.pipeline  # noqa: F401
        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    shim = Path(tempfile.mkdtemp(prefix="kdpipe-path-"))
    (shim / "kdpipe").symlink_to(root, target_is_directory=True)
    sys.path.insert(0, str(shim))


def log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- inputs


def synthetic_store(out: Path, shape: dict, seed: int = 0) -> Path:
    """A finalized top-k store of `batch` sequences of `seq` random tokens, every position after the first a target.

    The teacher distribution at each target is a random softmax (scale 3: peaked, with a real
    tail); its top-k ids and log-probs are what ShardWriter encodes.
    """
    import numpy as np
    import torch

    from kdpipe.storage import CodecConfig, ShardWriter, StoreMeta, finalize_store

    V, T, K = shape["vocab"], shape["seq"], shape["k"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)  # token ids
    g_dev = torch.Generator(device=dev).manual_seed(seed)  # teacher logits, drawn where they are used
    meta = StoreMeta(teacher="synthetic", teacher_revision=None, tokenizer_fingerprint="synthetic", vocab_size=V,
                     recipe="synthetic", recipe_params={}, codec=CodecConfig(name="topk", top_k=K),
                     dataset_fingerprint=f"bench-gpu-{V}-{T}-{K}-{seed}", generation_params={})
    with ShardWriter(out, meta) as w:
        for b in range(shape["batch"]):
            ids = torch.randint(0, V, (T,), generator=g)
            top_ids, top_lp = [], []
            for s in range(1, T, 256):  # [256, V] at a time: no [T, V] tensor
                n = min(256, T - s)
                logits = torch.randn(n, V, generator=g_dev, device=dev) * 3.0
                lp, ix = torch.log_softmax(logits, -1).topk(K, -1)
                top_ids.append(ix.cpu()), top_lp.append(lp.cpu())
            w.add(f"seq{b}", ids.tolist(), np.arange(1, T), torch.cat(top_ids).numpy(), torch.cat(top_lp).numpy())
    finalize_store(out)
    return out


def read_batch(store: Path):
    from kdpipe.storage.batch import collate
    from kdpipe.storage.reader import StoreReader

    return collate(list(StoreReader(str(store), shuffle=False)), pad_id=0)


def build_model(shape: dict, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(4096, shape["seq"]),
                      tie_word_embeddings=False, use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train()


# ------------------------------------------------------------------------------- timing


class Clock:
    def __init__(self, device) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def allocated_gb(self) -> float | None:
        return self.torch.cuda.memory_allocated() / 2**30 if self.cuda else None


def measure(step, clock: Clock, warmup: int, steps: int) -> tuple[float, float | None]:
    """(median ms of `steps` calls after `warmup`, peak GiB over the measured calls)."""
    for _ in range(warmup):
        step()
    clock.reset_peak()
    times = []
    for _ in range(steps):
        clock.sync()
        t0 = time.perf_counter()
        step()
        clock.sync()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), clock.peak_gb()


def free(clock: Clock) -> None:
    gc.collect()
    if clock.cuda:
        clock.torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- the variants


def train_step_fn(variant: str, shape: dict, batch, device, dtype, spec_kw: dict, pg_file: str | None = None,
                  other_backward: str = "recompute"):
    """A closure running one optimizer step of `variant` on a fresh model (see module doc)."""
    import torch

    from kdpipe.pipeline.train.chunked import LossSpec
    from kdpipe.pipeline.train.losses import distillation_loss_parts
    from kdpipe.pipeline.train.student_loss import StudentLoss

    V = shape["vocab"]
    model = build_model(shape, device, dtype)
    b = batch.to(device)
    n = b.num_targets
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if variant == "ce":
        labels = torch.full_like(b.input_ids, -100)
        labels.view(-1)[b.pred_index + 1] = b.target_ids  # transformers shifts labels by one itself

        def loss():
            return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
        module = model
    elif variant == "dense":
        def loss():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # [B, T, V]
            z = logits.reshape(-1, logits.shape[-1]).index_select(0, b.pred_index)  # [N, V]
            parts = distillation_loss_parts(z.float(), b.target_ids, b.teacher_ids, b.teacher_logprobs, b.teacher_tail,
                                            alpha=0.5, temperature=1.0, divergence="forward_kl", tail_mode="bucket")
            return parts["loss"] / n
        module = model
    else:
        alpha = 1.0 if variant == "chunked_ce" else 0.5
        temperature = 2.0 if variant == "kd_t2" else 1.0
        kw = {**spec_kw, "backward": other_backward} if variant == "kd_other_backward" else spec_kw
        module = StudentLoss(model, V, LossSpec(alpha=alpha, temperature=temperature, **kw))
        if variant == "fsdp_kd":
            from torch.distributed.fsdp import fully_shard

            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                                     init_method=f"file://{pg_file}", rank=0, world_size=1)
            for m in module.modules():
                if type(m).__name__ == "LlamaDecoderLayer":
                    fully_shard(m)
            fully_shard(module)
        teacher = alpha < 1.0
        inputs = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "pred_index": b.pred_index,
                  "target_ids": b.target_ids}
        if teacher:
            inputs.update(teacher_ids=b.teacher_ids, teacher_logprobs=b.teacher_logprobs, teacher_tail=b.teacher_tail)

        def loss():
            return module(**inputs)["loss"] / n
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5, foreach=True)

    def step():
        with autocast:
            out = loss()
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def close():
        nonlocal model, module, opt
        del model, module, opt
    return step, close


def loss_only_fn(shape: dict, batch, device, dtype, spec_kw: dict):
    """The KD loss + backward alone, lm_head included: chunked_loss_parts on [N, H] hidden states."""
    import torch

    from kdpipe.pipeline.train.chunked import LossSpec, chunked_loss_parts

    torch.manual_seed(1)
    N, H, V = batch.num_targets, shape["hidden"], shape["vocab"]
    h = (torch.randn(N, H, device=device) * 1.0).to(dtype).requires_grad_()  # [N, H]
    w = (torch.randn(V, H, device=device) * 0.02).to(dtype).requires_grad_()  # [V, H]
    b = batch.to(device)
    spec = LossSpec(alpha=0.5, temperature=1.0, **spec_kw)

    def step():
        parts = chunked_loss_parts(h, w, V, b.target_ids, b.teacher_ids, b.teacher_logprobs, b.teacher_tail, spec)
        (parts["loss"] / N).backward()
        h.grad = None
        w.grad = None
    return step


# ------------------------------------------------------------------------------- main


def run(args) -> dict:
    import torch

    t_start = time.perf_counter()
    shape = dict(SMOKE if args.smoke else FULL)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if not cuda and not args.smoke:
        raise SystemExit("bench_gpu: no CUDA device; run with --smoke for the small CPU shape")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if hasattr(torch, "_dynamo"):  # chunk sizes x temperatures x grad modes: more graphs than the default limit
        cfg = torch._dynamo.config
        setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 64)
    chunk_sizes = [int(c) for c in (args.chunk_sizes or ("64" if args.smoke else "1024,4096")).split(",")]
    warmup, steps = (1, 1) if args.smoke else (args.warmup, args.steps)
    clock = Clock(device)
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-bench-gpu-"))
    log(f"device {device} ({torch.cuda.get_device_name(0) if cuda else 'cpu'}), shape {shape}, compile {args.compile}")

    store = synthetic_store(tmp / "store", shape)
    batch = read_batch(store)
    log(f"store: {batch.num_targets} target tokens x k={batch.teacher_ids.shape[1]}")
    over = lambda: time.perf_counter() - t_start > args.budget_s  # noqa: E731
    skipped: list[str] = []

    from kdpipe.pipeline.train.chunked import LossSpec, compile_wanted

    # ---- the loss alone, per backward mode x chunk size (the fastest sets both for the steps)
    backwards = args.backwards.split(",")
    by_config: dict[str, dict] = {}
    for mode in backwards:
        for c in chunk_sizes:
            key = f"{mode}/{c}"
            if over():
                skipped.append(f"loss_only {key}")
                continue
            kw = {"chunk_size": c, "compile": args.compile, "backward": mode}
            fn = loss_only_fn(shape, batch, device, dtype, kw)
            inputs_gb = clock.allocated_gb()  # h, W and the batch: "extra" = the peak beyond them
            ms, gb = measure(fn, clock, warmup + 1, steps)
            extra = None if gb is None else round(gb - inputs_gb, 3)
            by_config[key] = {"ms": ms, "peak_gb": gb, "extra_gb": extra}
            log(f"loss_only {key}: {ms:.2f} ms, peak {gb} GiB, extra {extra} GiB")
            free(clock)
    best = min(by_config, key=lambda k: by_config[k]["ms"]) if by_config else f"{backwards[0]}/{chunk_sizes[0]}"
    # issue 22 §3: a setting within 3% of the fastest time holding at most 3 GiB beyond its inputs
    lean = [k for k, r in by_config.items() if r["ms"] <= 1.03 * by_config[best]["ms"]
            and r["extra_gb"] is not None and r["extra_gb"] <= 3.0]
    best_backward, best_chunk = best.split("/")[0], int(best.split("/")[1])
    other = next((m for m in ("recompute", "in_forward") if m != best_backward), "recompute")
    compiled = compile_wanted(LossSpec(compile=args.compile), device)  # False after a compile failure
    eager_ms = None
    if compiled and not over():
        eager_kw = {"chunk_size": best_chunk, "compile": "off", "backward": best_backward}
        eager_ms, _ = measure(loss_only_fn(shape, batch, device, dtype, eager_kw), clock, warmup, steps)
        log(f"loss_only eager {best}: {eager_ms:.2f} ms")
        free(clock)

    # ---- whole steps
    spec_kw = {"chunk_size": best_chunk, "compile": args.compile, "backward": best_backward}
    res: dict[str, tuple[float | None, float | None]] = {}
    order = ["ce", "kd", "kd_t2", "chunked_ce", "kd_other_backward", "dense", "fsdp_kd"]
    for v in order:
        if (v == "dense" and args.skip_dense) or (v == "fsdp_kd" and args.skip_fsdp) or (over() and v not in ("ce", "kd")):
            skipped.append(v)
            res[v] = (None, None)
            continue
        step, close = train_step_fn(v, shape, batch, device, dtype, spec_kw, pg_file=str(tmp / "pg"),
                                    other_backward=other)
        try:
            res[v] = measure(step, clock, warmup, steps)
        except torch.OutOfMemoryError as e:  # the dense path can exceed a small GPU: report, do not abort
            log(f"{v}: out of memory ({str(e).splitlines()[0][:120]})")
            res[v] = (None, None)
            skipped.append(f"{v} (out of memory)")
        close()
        del step
        free(clock)
        log(f"{v}: {res[v][0]} ms, peak {res[v][1]} GiB")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    ce_ms, ce_gb = res["ce"]
    kd_ms, kd_gb = res["kd"]
    lo = by_config.get(best, {})
    real = cuda and not args.smoke
    time_ratio, mem_ratio = ratio(kd_ms, ce_ms), ratio(kd_gb, ce_gb)

    def goal(ok):
        return None if not real or ok is None else bool(ok)

    out = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "vocab": shape["vocab"], "tokens": batch.num_targets,
        "ce_ms": ce_ms, "kd_ms": kd_ms, "kd_t2_ms": res["kd_t2"][0], "dense_ms": res["dense"][0],
        "fsdp_kd_ms": res["fsdp_kd"][0], "ce_peak_gb": ce_gb, "kd_peak_gb": kd_gb,
        "time_ratio": time_ratio, "mem_ratio": mem_ratio, "loss_only_ms": lo.get("ms"),
        "goals": {
            "kd_step_time_ratio_le_1.10": goal(None if time_ratio is None else time_ratio <= GOAL_RATIO),
            "kd_step_mem_ratio_le_1.10": goal(None if mem_ratio is None else mem_ratio <= GOAL_RATIO),
            "loss_only_faster_than_liger_60.7ms": goal(None if lo.get("ms") is None else lo["ms"] < LIGER_JSD_H100["ms"]),
            "loss_only_mem_le_liger_11.1gb": goal(None if lo.get("peak_gb") is None else lo["peak_gb"] <= LIGER_JSD_H100["gb"]),
            "loss_only_within_3pct_le_3gib_extra": goal(None if not by_config else bool(lean)),
        },
        "loss_only_lean_configs": lean,
        # extras
        "loss_only_peak_gb": lo.get("peak_gb"), "loss_only_eager_ms": eager_ms, "loss_only_by_config": by_config,
        "chunk_size": best_chunk, "backward": best_backward, "compiled": compiled, "compile": args.compile,
        "kd_other_backward": other, "kd_other_backward_ms": res["kd_other_backward"][0],
        "kd_other_backward_peak_gb": res["kd_other_backward"][1],
        "kd_t2_peak_gb": res["kd_t2"][1], "dense_peak_gb": res["dense"][1], "fsdp_kd_peak_gb": res["fsdp_kd"][1],
        "chunked_ce_ms": res["chunked_ce"][0], "chunked_ce_peak_gb": res["chunked_ce"][1],
        "liger_reference": LIGER_JSD_H100, "shape": shape, "k": batch.teacher_ids.shape[1],
        "warmup": warmup, "steps": steps, "smoke": bool(args.smoke), "skipped": skipped,
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="small shape on CPU (or the GPU): the code path, not figures")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant (median)")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (torch.compile runs here)")
    p.add_argument("--chunk-sizes", default=None, help="comma-separated loss chunk sizes to try (default 1024,4096)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="LossSpec.compile of the chunk function")
    p.add_argument("--backwards", default="recompute,in_forward", help="LossSpec.backward modes to try (comma-separated)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--skip-fsdp", action="store_true")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip the remaining optional parts after this long")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _kdpipe_importable()
    out = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
