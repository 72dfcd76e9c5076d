"""Causal-LM training for the small models of the demo and the quality benchmarks: one loop, two uses.

- `pretrain_base`: next-token CE on unlabeled text packed into fixed-length sequences. The miniature of a
  pretrained "Llama-3.1-8B base": a real student already writes the domain's language before distillation.
- `train_teacher`: CE on (summarize prompt -> answer) pairs, the prompt's own tokens at a weight; run on a base
  (or a random init), it is the teacher that phase one serves.

Both are `train_lm` over examples `(token ids, n_prompt)`: positions [1, n_prompt) are prompt tokens (CE at
`prompt_weight`), positions [max(1, n_prompt), len) are the main target (a packed pretraining sequence has
n_prompt = 0: every next token is a target). Batches are a pure function of the examples and the seed
(`length_batches`), so a resumed run sees exactly the batches it would have seen.

Resumable: every `save_every` steps the weights, the optimizer state and the step go to OUT.partial/ckpt
(written to a temporary folder, then renamed); a rerun with the same `key` resumes there and continues the same
loss curve (OUT.partial/train_log.jsonl, trimmed to the checkpoint's step). The finished model is written to
OUT.partial/model and renamed to OUT, with its loss curve as OUT/train_log.jsonl, so OUT either holds a finished
model or does not exist.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

Example = tuple[list[int], int]  # (token ids, n_prompt): the first n_prompt tokens are the prompt


def length_batches(examples: Sequence[Example], batch_size: int, steps: int, seed: int) -> list[list[Example]]:
    """`steps` batches: epochs of a seeded shuffle, cut into pools of 16 batches, each pool sorted by length.

    Every example is seen once per epoch but for the last pool's remainder of less than one batch (random
    sampling repeats some examples and skips others); sorting inside a pool keeps batches of similar
    lengths (padding was ~40% of a teacher step with random batches), and the batches' order is shuffled again.
    """
    rng = random.Random(seed)
    out: list[list[Example]] = []
    while len(out) < steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        pool = 16 * batch_size
        epoch = []
        for s in range(0, len(order) - batch_size + 1, pool):
            chunk = sorted(order[s : s + pool], key=lambda i: len(examples[i][0]))
            epoch += [chunk[b : b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
        if not epoch:  # fewer examples than one batch: one batch of all of them
            epoch = [order]
        rng.shuffle(epoch)
        out += [[examples[i] for i in b] for b in epoch]
    return out[:steps]


def packed_examples(tokenizer, texts: Sequence[str], seq_len: int) -> list[Example]:
    """Texts tokenized, each followed by EOS, concatenated and cut into `seq_len`-token sequences (n_prompt 0).

    The remainder shorter than one sequence is dropped. Packing wastes no compute on padding, which matters for
    a base pretrained on documents of very different lengths.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len: {seq_len}; a packed sequence needs at least 2 tokens")
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream += list(ids) + [tokenizer.eos_token_id]
    return [(stream[i : i + seq_len], 0) for i in range(0, len(stream) - seq_len + 1, seq_len)]


def _batch_tensors(batch: Sequence[Example], pad_id: int):
    """-> ids, attention mask, main labels, prompt labels; each [B, T] (labels -100 where not a target)."""
    import torch

    T = max(len(seq) for seq, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
    main = torch.full((len(batch), T), -100, dtype=torch.long)  # [B, T]; labels of the main target
    prompt = torch.full((len(batch), T), -100, dtype=torch.long)  # [B, T]; labels of the prompt tokens
    for i, (seq, n_prompt) in enumerate(batch):
        t = torch.tensor(seq)
        ids[i, : len(seq)] = t
        mask[i, : len(seq)] = 1
        start = max(1, n_prompt)
        main[i, start : len(seq)] = t[start:]
        if n_prompt > 1:
            prompt[i, 1:n_prompt] = t[1:n_prompt]
    return ids, mask, main, prompt


def _read_log(path: Path, upto: int) -> list[str]:
    """The loss curve's lines up to step `upto` (a torn last line, from a kill mid-write, is dropped)."""
    if not path.is_file():
        return []
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                keep.append(line)
        except (ValueError, KeyError):
            break
    return keep


def _save_ckpt(work: Path, model, opt, step: int, key: str, log_lines: list[str]) -> None:
    import torch

    tmp = work / "ckpt.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "key": key}) + "\n", encoding="utf-8")
    (tmp / "train_log.jsonl").write_text("".join(line + "\n" for line in log_lines), encoding="utf-8")
    old = work / "ckpt"
    if old.exists():
        shutil.rmtree(old)
    os.replace(tmp, old)


def train_lm(init: Path, out_dir: Path, examples: Sequence[Example], steps: int, lr: float, batch_size: int, seed: int,
             *, prompt_weight: float = 0.0, key: str = "", save_every: int = 200, log=print,
             progress: Callable[[int, float], None] | None = None, what: str = "model") -> Path:
    """Train the causal LM at `init` for `steps` batches of `examples`; write it (and its tokenizer) to `out_dir`.

    lr: peak; linear warmup over 5% of the steps, then linear decay to 5% of it. AdamW, no weight decay,
    gradients clipped at 1. `key` identifies the run (its settings): a checkpoint with another key is not
    resumed, and an empty key never resumes. `log` gets a line every 50 steps; `progress(step, loss)` is called after every step with the
    main target's CE. -> out_dir
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ValueError(f"{what}: no training examples")
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    state_file = work / "ckpt" / "state.json"
    start = 0
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if key and state is not None and state.get("key") == key and 0 < state["step"] < steps:
        start = state["step"]
        log(f"  {what}: resuming at step {start}/{steps} from {work / 'ckpt'}")
    elif work.exists():
        shutil.rmtree(work)  # another run's (or an empty) checkpoint: start over
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(work / "ckpt" if start else init, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if start:
        opt.load_state_dict(torch.load(work / "ckpt" / "optimizer.pt", weights_only=True))
    log_lines = _read_log(work / "ckpt" / "train_log.jsonl", start) if start else []
    batches = length_batches(examples, min(batch_size, len(examples)), steps, seed)
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        # Linear warmup, then linear decay to 5%: short runs need the high learning rate early.
        f = min(1.0, (step + 1) / warmup) * max(0.05, 1.0 - step / steps)
        for g in opt.param_groups:
            g["lr"] = lr * f
        ids, mask, main, prompt = _batch_tensors(batches[step], tok.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [B, T-1, V]
        flat = logits.reshape(-1, logits.shape[-1])  # [B*(T-1), V]
        loss = F.cross_entropy(flat, main[:, 1:].reshape(-1), ignore_index=-100)
        total = loss
        if prompt_weight > 0:
            total = loss + prompt_weight * F.cross_entropy(flat, prompt[:, 1:].reshape(-1), ignore_index=-100)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % 10 == 0 or done == steps:
            log_lines.append(json.dumps({"step": done, "loss": round(loss.item(), 5), "lr": lr * f,
                                         "seconds": round(time.perf_counter() - t0, 2)}))
        if progress is not None:
            progress(done, loss.item())
        if done % 50 == 0 or done == steps:
            log(f"  {what} step {done}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
        if save_every and done % save_every == 0 and done < steps:
            _save_ckpt(work, model, opt, done, key, log_lines)

    final = work / "model"
    if final.exists():
        shutil.rmtree(final)
    model.save_pretrained(final, safe_serialization=True)
    tok.save_pretrained(final)
    (final / "train_log.jsonl").write_text("".join(line + "\n" for line in log_lines), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(final, out_dir)
    shutil.rmtree(work)
    return out_dir


def pretrain_base(init: Path, out_dir: Path, texts: Sequence[str], steps: int, lr: float, batch_size: int, seed: int,
                  seq_len: int = 128, **kw) -> Path:
    """A base: next-token CE on `texts` packed into `seq_len`-token sequences, `batch_size` sequences a step."""
    from transformers import AutoTokenizer

    examples = packed_examples(AutoTokenizer.from_pretrained(init), texts, seq_len)
    if not examples:
        raise ValueError(f"pretrain_base: the texts hold fewer than {seq_len} tokens; pass more text or a shorter seq_len")
    return train_lm(init, out_dir, examples, steps, lr, batch_size, seed, what=kw.pop("what", "base"), **kw)


def summarize_examples(tokenizer, rows: Sequence[dict], template: str) -> list[Example]:
    """(summarize prompt -> reference summary) pairs: the prompts phase one will send, the chat-formatted answer
    (summary + end-of-turn marker) followed by EOS, so the model stops by itself under vLLM."""
    from kdpipe.pipeline.prompts import Prompter

    prompter = Prompter(tokenizer, True, None)
    out = []
    for r in rows:
        user = template.replace("{text}", r["document"])
        p = prompter.ids(user)
        out.append((p + prompter.target_ids(user, r["summary"]) + [tokenizer.eos_token_id], len(p)))
    return out


def train_teacher(init: Path, out_dir: Path, rows: list[dict], steps: int, lr: float, batch_size: int, seed: int,
                  log=print, progress: Callable[[int, float], None] | None = None, doc_loss_weight: float = 0.0,
                  **kw) -> Path:
    """A plain CE loop on (summarize prompt -> reference summary) pairs: the prompts phase one will send.

    `doc_loss_weight` > 0 adds the next-token CE of the prompt tokens at that weight: a model trained from
    scratch otherwise learns its language from the ~15% of tokens that are the answer.
    """
    from transformers import AutoTokenizer

    from kdpipe.pipeline.prompts import DEFAULT_SUMMARIZE_TEMPLATE

    examples = summarize_examples(AutoTokenizer.from_pretrained(init), rows, DEFAULT_SUMMARIZE_TEMPLATE)
    return train_lm(init, out_dir, examples, steps, lr, batch_size, seed, prompt_weight=doc_loss_weight, log=log,
                    progress=progress, what=kw.pop("what", "teacher"), **kw)


def perplexity(model_dir: Path, texts: Sequence[str], seq_len: int = 128, max_sequences: int = 200) -> float:
    """exp(mean next-token CE) of the model on `texts` packed into `seq_len`-token sequences (the first
    `max_sequences` of them): a base's perplexity on held-out documents."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs = [s for s, _ in packed_examples(tok, texts, seq_len)][:max_sequences]
    if not seqs:
        raise ValueError(f"perplexity: the texts hold fewer than {seq_len} tokens")
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), 16):
            ids = torch.tensor(seqs[i : i + 16])  # [B, T]
            logits = model(input_ids=ids).logits[:, :-1].float()  # [B, T-1, V]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            n += ids[:, 1:].numel()
    return math.exp(nll / n)
