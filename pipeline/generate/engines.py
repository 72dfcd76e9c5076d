"""Teacher engines behind one interface: vLLM (default) and plain transformers (`--engine hf`).

Both engines answer two kinds of request:
  generate: prompt ids -> generated ids + the teacher's top-K raw log-probs at every generated
            position (the distribution each generated token was drawn from);
  score:    a full sequence + target positions -> the teacher's top-K log-probs of
            p(. | seq[:t]) at each target position t (teacher forcing).
Log-probs are always the raw model distribution over the full model vocabulary (before
temperature/top-p), so targets do not depend on how the text was sampled.

The interface is streaming (`submit` / `poll`) so the run loop can keep vLLM's continuous
batching full while finished requests are post-processed; `generate()` and `score()` are
batch conveniences on top.

Teacher vocabularies padded beyond the tokenizer (Qwen2.5: 152,064 rows vs 151,936 tokens)
are normal: ids >= len(tokenizer) are dropped from the top-K (their mass then lands in the
store's tail, which is 1 - sum of the kept probabilities), so stored ids are always ids the
tokenizer defines.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from kdpipe.storage.errors import ConfigError, KdpipeError


@dataclass
class Request:
    kind: Literal["generate", "score"]
    token_ids: list[int]
    positions: list[int] | None = None  # score: target positions t (1 <= t < len(token_ids))
    max_new_tokens: int = 0  # generate
    seed: int | None = None  # generate with temperature > 0: per-request RNG (reproducible reruns)


@dataclass
class TeacherOutput:
    token_ids: list[int]  # generated ids (generate); [] for score
    top_ids: np.ndarray  # [P, K] int32, sorted by log-prob desc, -1 padding
    top_logprobs: np.ndarray  # [P, K] float32, full-vocabulary log-probs, -inf padding
    finish_reason: str | None = None
    # score: [P] float32 log p(token_ids[t] | token_ids[:t]) of the scored token itself, in or out
    # of the top-K (the on-policy recipe stores it, see recipes/onpolicy.py); None for generate.
    target_logprobs: np.ndarray | None = None


class Engine(Protocol):
    teacher: str
    max_model_len: int
    max_logprobs: int
    top_k: int

    def submit(self, key: int, req: Request) -> None: ...

    def poll(self) -> list[tuple[int, TeacherOutput]]: ...

    def num_inflight(self) -> int: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


def drop_untokenizable(ids: np.ndarray, lps: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove ids the tokenizer does not define (padded model rows); keep rows sorted, pad at the end.

    ids [P, K] int, lps [P, K] float -> int32 [P, K], float32 [P, K].
    """
    ids = ids.astype(np.int32, copy=False)
    lps = lps.astype(np.float32, copy=False)
    bad = (ids < 0) | (ids >= vocab_size) | ~np.isfinite(lps)  # [P, K]
    if not bad.any():
        return ids, lps
    ids = np.where(bad, -1, ids).astype(np.int32)
    lps = np.where(bad, -np.inf, lps).astype(np.float32)
    order = np.argsort(bad, axis=1, kind="stable")  # valid entries first, their order kept
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(lps, order, axis=1)


def flat_to_arrays(fl, positions: list[int] | None, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM FlatLogprobs -> top ids/log-probs [P, K] at `positions` (all positions if None).

    Each position holds the sampled (or, for prompt log-probs, the actual) token first, then the
    top-K by rank; the first entry is dropped so the rows are exactly the top-K.
    """
    tok = np.asarray(fl.token_ids, dtype=np.int64)
    lp = np.asarray(fl.logprobs, dtype=np.float32)
    n_pos = len(fl.start_indices)
    if positions is None and len(tok) == n_pos * (k + 1):
        # The usual generation layout: every position holds exactly K+1 entries -> a reshape.
        return drop_untokenizable(tok.reshape(n_pos, k + 1)[:, 1:], lp.reshape(n_pos, k + 1)[:, 1:], vocab_size)
    starts = np.asarray(fl.start_indices, dtype=np.int64)
    ends = np.asarray(fl.end_indices, dtype=np.int64)
    if positions is not None:
        sel = np.asarray(positions, dtype=np.int64)
        starts, ends = starts[sel], ends[sel]
    P = len(starts)
    if P and np.all(ends - starts == k + 1):
        idx = starts[:, None] + 1 + np.arange(k)[None, :]  # [P, K]
        return drop_untokenizable(tok[idx], lp[idx], vocab_size)
    # Irregular rows (a vocabulary smaller than K): pad each row.
    ids = np.full((P, k), -1, dtype=np.int64)
    lps = np.full((P, k), -np.inf, dtype=np.float32)
    for j, (s, e) in enumerate(zip(starts, ends)):
        n = min(k, max(0, int(e - s - 1)))
        ids[j, :n] = tok[s + 1 : s + 1 + n]
        lps[j, :n] = lp[s + 1 : s + 1 + n]
    return drop_untokenizable(ids, lps, vocab_size)


def _vllm_on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # an unusual vLLM build: keep its defaults
        return False


CPU_KV_MIN_BYTES = 64 << 20  # a tiny model still gets room for many sequences
CPU_KV_MAX_SHARE = 0.25  # of the memory available now: the rest is the weights', the writer's and the system's
CPU_KV_SEQUENCES = 32  # full-length sequences the cache holds (requests beyond wait in vLLM's queue; CPUs gain little more)


def cpu_kv_cache_bytes(cfg, max_model_len: int) -> int | None:
    """The KV cache for vLLM on CPU when VLLM_CPU_KVCACHE_SPACE is unset: sized from the model and the batch.

    vLLM's CPU default (gpu_memory_utilization of the machine's RAM, 0.9) reserved ~20 GiB for a 10 MB
    model and failed when less was free. Here: bytes per token (K and V, every layer, every KV head) ×
    max_model_len × min(max_inflight, CPU_KV_SEQUENCES), at least CPU_KV_MIN_BYTES, at most CPU_KV_MAX_SHARE of
    the available memory. None when the config does not say enough (vLLM's own default then).
    """
    import psutil
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(cfg.teacher, revision=cfg.teacher_revision, trust_remote_code=cfg.trust_remote_code)
    except Exception:
        return None
    mc = getattr(mc, "text_config", None) or mc
    layers, heads = getattr(mc, "num_hidden_layers", None), getattr(mc, "num_attention_heads", None)
    hidden = getattr(mc, "hidden_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)):
        return None
    kv_heads = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or hidden // heads
    per_token = 2 * layers * kv_heads * head_dim * (4 if cfg.dtype == "float32" else 2)
    want = per_token * max_model_len * min(max(1, getattr(cfg, "max_inflight", CPU_KV_SEQUENCES)), CPU_KV_SEQUENCES)
    cap = int(psutil.virtual_memory().available * CPU_KV_MAX_SHARE)
    return max(per_token * max_model_len, min(max(want, CPU_KV_MIN_BYTES), cap))


def flat_actual_logprobs(fl, positions: list[int]) -> np.ndarray:
    """vLLM prompt FlatLogprobs -> [P] float32 log-prob of the actual token at each of `positions`.

    Each position's first entry is the actual (prompt) token, whatever its rank.
    """
    starts = np.asarray(fl.start_indices, dtype=np.int64)[np.asarray(positions, dtype=np.int64)]
    return np.asarray(fl.logprobs, dtype=np.float32)[starts]


def torch_topk(logits, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[P, V_model] logits -> top-K full-vocabulary log-probs (fp32), untokenizable ids dropped."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)  # [P, K], sorted desc
    ids, vals = top.indices.cpu().numpy(), top.values.cpu().numpy()
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
    return drop_untokenizable(ids, vals, vocab_size)


@dataclass
class _BatchHelpers:
    """generate()/score() batch conveniences over submit/poll (tests, benchmarks, small jobs)."""

    def _run_all(self, reqs: list[Request]) -> list[TeacherOutput]:
        out: dict[int, TeacherOutput] = {}
        for i, r in enumerate(reqs):
            self.submit(i, r)  # type: ignore[attr-defined]
        while len(out) < len(reqs):
            got = self.poll()  # type: ignore[attr-defined]
            if not got:
                raise KdpipeError("engine stopped with requests unfinished")
            out.update(got)
        return [out[i] for i in range(len(reqs))]

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[TeacherOutput]:
        return self._run_all([Request("generate", list(p), max_new_tokens=max_new_tokens) for p in prompts])

    def score(self, sequences: list[list[int]], positions: list[list[int]]) -> list[TeacherOutput]:
        return self._run_all([Request("score", list(s), positions=list(p)) for s, p in zip(sequences, positions)])


@dataclass
class VllmEngine(_BatchHelpers):
    """vLLM `LLM` with raw log-probs and the flat, undetokenized fast path.

    Score requests (teacher forcing) take one of two routes (`score_mode`):
      full          one request with prompt log-probs over the whole sequence; vLLM then skips
                    reading the prefix cache, so every row is computed (the reference path).
      prefix-cache  (default) two requests: a plain prefill of `seq[:t0-1]`, t0 the first target
                    position, which leaves the prefix's full KV blocks in vLLM's prefix cache;
                    then the scoring request with `skip_reading_prefix_cache=False`, which
                    computes only the rows after the cached blocks. vLLM 0.32 has no "log-probs
                    from position t0 on" for arbitrary top-K (`prompt_logprob_start` needs fixed
                    token ids and the V2 runner), so this is the route that skips the prompt rows.
    Rows served from the cache come back uninitialised, so a scoring request is kept only when
    vLLM reports `num_cached_tokens <= t0 - 1` (every target row computed) and no preemption
    (a resumed request may read blocks cached in between, which the first-schedule count does
    not show); otherwise it is rescored on the full route, counted in `stats["score_fallbacks"]`.
    Both routes run the same kernels on the same rows, so their targets are identical (tested).
    """

    teacher: str
    max_model_len: int
    max_logprobs: int
    top_k: int
    vocab_size: int  # len(tokenizer): ids at or above it are dropped
    temperature: float = 0.0
    sampling_top_p: float = 1.0
    llm: object = None
    score_mode: str = "full"  # "prefix-cache" | "full" (see the class doc)
    prefix_cache_ok: bool = False  # built with prefix caching and per-request stats: "prefix-cache" may be used
    block_size: int = 0  # KV block size: only whole blocks are cached
    kv_tokens: int = 0  # KV cache capacity in tokens
    stats: Counter = field(default_factory=Counter)  # score_fallbacks, score_rows, score_rows_computed
    _inflight: dict = field(default_factory=dict)  # vLLM request id -> (key, request, route)
    _waiting: deque = field(default_factory=deque)  # prefix-cache score requests not yet admitted
    _admitted_tokens: int = 0
    _rows: dict = field(default_factory=dict)  # vLLM request id -> target rows of its prompt log-probs
    _counter: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def from_config(cls, cfg, max_model_len: int, vocab_size: int, **llm_overrides) -> "VllmEngine":
        """`llm_overrides`: extra `vllm.LLM` arguments (tests and benchmarks: block_size, num_gpu_blocks_override)."""
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(
                f"engine 'vllm' is not installed ({e}); install kdpipe[vllm] (GPU) or kdpipe[cpu], "
                f"or use --engine hf (plain transformers, slow)"
            ) from None
        score_mode = getattr(cfg, "score_mode", "full")
        fast = score_mode == "prefix-cache"
        kwargs = dict(
            model=cfg.teacher,
            revision=cfg.teacher_revision,
            trust_remote_code=cfg.trust_remote_code,
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=cfg.dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_logprobs=cfg.logprob_cap,
            # Targets are the teacher's own distribution, not the temperature-scaled sampler's.
            logprobs_mode="raw_logprobs",
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
        )
        if fast:
            # Per-request stats carry the preemption count the prefix-cache check needs.
            kwargs.update(enable_prefix_caching=True, disable_log_stats=False)
        if cfg.temperature > 0 and _vllm_on_cpu():
            # Seeded sampling on vLLM's CPU backend: a chunked (partial) prefill rewinds the request's
            # torch.Generator, which CPU generators cannot do ("CPU Generator does not use offset",
            # the engine dies once prompts exceed one step's token budget). Whole-prompt prefills avoid it.
            kwargs.update(enable_chunked_prefill=False)
        if _vllm_on_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv = cpu_kv_cache_bytes(cfg, max_model_len)  # (vLLM reads the variable itself when it is set)
            if kv is not None:
                kwargs.update(kv_cache_memory_bytes=kv)
        kwargs.update(llm_overrides)
        llm = LLM(**kwargs)
        cache = llm.llm_engine.vllm_config.cache_config
        prefix_cache_ok = fast and bool(cache.enable_prefix_caching) and not kwargs.get("disable_log_stats", True)
        if not prefix_cache_ok:
            score_mode = "full"  # e.g. the platform turned prefix caching off (MLA on CPU): nothing to reuse
        return cls(
            teacher=cfg.teacher,
            max_model_len=max_model_len,
            max_logprobs=cfg.logprob_cap,
            top_k=cfg.top_k,
            vocab_size=vocab_size,
            temperature=cfg.temperature,
            sampling_top_p=cfg.sampling_top_p,
            llm=llm,
            score_mode=score_mode,
            prefix_cache_ok=prefix_cache_ok,
            block_size=int(cache.block_size or 0),
            kv_tokens=int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0),
        )

    def _params(self, req: Request, route: str):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if route == "generate":
            sp = SamplingParams(
                max_tokens=req.max_new_tokens,
                temperature=self.temperature,
                top_p=self.sampling_top_p,
                seed=req.seed if self.temperature > 0 else None,
                logprobs=self.top_k,
                flat_logprobs=True,
                detokenize=False,
            )
        elif route == "prefill":  # fills the prefix cache; its one sampled token is ignored
            sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        else:  # "full" reads no cached rows (vLLM's default for prompt log-probs); "cached" does
            sp = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, flat_logprobs=True, detokenize=False,
                                skip_reading_prefix_cache=True if route == "full" else False)
        sp.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it is done
        return sp

    def _add(self, key: int, req: Request, route: str, token_ids: list[int] | None = None) -> None:
        from vllm.inputs import TokensPrompt

        rid = f"kd{next(self._counter)}"
        self._inflight[rid] = (key, req, route)
        prompt = TokensPrompt(prompt_token_ids=req.token_ids if token_ids is None else token_ids)
        internal_id = self.llm.llm_engine.add_request(rid, prompt, self._params(req, route))
        if route in ("cached", "full"):
            self._keep_target_rows(internal_id, rid, req)

    def _keep_target_rows(self, internal_id: str, rid: str, req: Request) -> None:
        """Take this request's prompt log-probs as arrays, and only the target rows.

        Why: vLLM's front end turns prompt log-probs into Python lists entry by entry
        (`FlatLogprobs.append_fast`, L x (K+1) appends per sequence, ~75% of the front-end time
        of a score run at K=64 here), for every row: the prompt rows a summary target never uses,
        and with the prefix-cache route the uninitialised cached rows too. The engine core sends
        them as tensors [L-1, K+1] (row r = p(. | seq[:r+1]), first column the actual token,
        then the top-K by rank); this request's log-probs processor keeps just the target rows of
        those tensors instead, the same values vLLM would have listed. Only this request's
        processor is changed. A vLLM whose front end differs, or a delivery in chunks, keeps
        vLLM's own FlatLogprobs path (`_convert` handles both).
        """
        try:
            proc = self.llm.llm_engine.output_processor.request_states[internal_id].logprobs_processor
            listing = proc._update_prompt_logprobs
        except (AttributeError, KeyError, TypeError):
            return
        rows = np.asarray(req.positions, dtype=np.int64) - 1
        n_rows = len(req.token_ids) - 1

        def keep(tensors) -> None:
            token_ids, logprobs = tensors[0], tensors[1]
            if tuple(logprobs.shape)[0] != n_rows:  # a partial chunk: let vLLM assemble the rows
                return listing(tensors)
            self._rows[rid] = (np.asarray(token_ids)[rows], np.asarray(logprobs, dtype=np.float32)[rows])  # [P, K+1]

        proc._update_prompt_logprobs = keep

    def submit(self, key: int, req: Request) -> None:
        if req.kind == "score" and self.score_mode == "prefix-cache":
            self._waiting.append((key, req))
            self._admit()
        else:
            self._add(key, req, "generate" if req.kind == "generate" else "full")

    def _admit(self) -> None:
        """Start waiting prefix-cache requests while their sequences fit half the KV cache.

        A prefilled prefix must still be cached when its scoring request runs; bounding the
        tokens between the two keeps eviction rare (an evicted prefix is only slower: fewer rows
        come from the cache, and the check still holds).
        """
        budget = self.kv_tokens // 2 if self.kv_tokens > 0 else float("inf")  # capacity unknown: no bound
        while self._waiting:
            key, req = self._waiting[0]
            n = len(req.token_ids)
            if self._admitted_tokens and self._admitted_tokens + n > budget:
                return
            self._waiting.popleft()
            self._admitted_tokens += n
            prefix = min(req.positions) - 1  # rows >= t0 - 1 are needed; KV of seq[:t0-1] may be cached
            if prefix >= max(self.block_size, 1):
                self._add(key, req, "prefill", req.token_ids[:prefix])
            else:  # no whole block to cache: score at once (a shared template prefix may still hit)
                self._add(key, req, "cached")

    def num_inflight(self) -> int:
        return len(self._inflight) + len(self._waiting)  # one vLLM request per key at a time

    def poll(self) -> list[tuple[int, TeacherOutput]]:
        """Step the engine until at least one request finishes; [] when nothing is in flight."""
        done: list[tuple[int, TeacherOutput]] = []
        engine = self.llm.llm_engine
        while not done and self._inflight and engine.has_unfinished_requests():
            for o in engine.step():
                if not o.finished or o.request_id not in self._inflight:
                    continue
                key, req, route = self._inflight.pop(o.request_id)
                if route == "prefill":
                    self._add(key, req, "cached")
                    continue
                if route == "cached":
                    self._admitted_tokens -= len(req.token_ids)
                    self._admit()
                    if not self._cached_rows_ok(o, req):
                        self._rows.pop(o.request_id, None)
                        self.stats["score_fallbacks"] += 1
                        self._add(key, req, "full")
                        continue
                if req.kind == "score":
                    rows = len(req.token_ids) - 1
                    self.stats["score_rows"] += rows
                    cached = (o.num_cached_tokens or 0) if route == "cached" else 0
                    self.stats["score_rows_computed"] += rows - cached
                done.append((key, self._convert(o, req)))
        return done

    @staticmethod
    def _cached_rows_ok(o, req: Request) -> bool:
        """Every target row was computed: cached tokens <= t0 - 1, and no preemption (class doc)."""
        cached = o.num_cached_tokens
        preempted = getattr(getattr(o, "metrics", None), "num_preemptions", None)
        return cached is not None and cached <= min(req.positions) - 1 and preempted == 0

    def _convert(self, o, req: Request) -> TeacherOutput:
        if req.kind == "generate":
            c = o.outputs[0]
            ids, lps = flat_to_arrays(c.logprobs, None, self.top_k, self.vocab_size)
            return TeacherOutput(list(c.token_ids), ids, lps, c.finish_reason)
        kept = self._rows.pop(o.request_id, None)
        if kept is not None:  # target rows as arrays (_keep_target_rows)
            tok, lp = kept  # [P, K+1]: the actual token, then the top-K
            ids = np.full((len(tok), self.top_k), -1, dtype=np.int64)
            lps = np.full((len(tok), self.top_k), -np.inf, dtype=np.float32)
            n = min(self.top_k, tok.shape[1] - 1)
            ids[:, :n], lps[:, :n] = tok[:, 1 : 1 + n], lp[:, 1 : 1 + n]
            ids, lps = drop_untokenizable(ids, lps, self.vocab_size)
            return TeacherOutput([], ids, lps, "score", lp[:, 0].astype(np.float32))
        ids, lps = flat_to_arrays(o.prompt_logprobs, req.positions, self.top_k, self.vocab_size)
        return TeacherOutput([], ids, lps, "score", flat_actual_logprobs(o.prompt_logprobs, req.positions))

    def abort(self) -> None:
        self._rows.clear()
        self._waiting.clear()
        self._admitted_tokens = 0
        if self._inflight:
            try:
                self.llm.llm_engine.abort_request(list(self._inflight), internal=False)
            except Exception:  # engine already dead (e.g. SIGTERM reached its processes first)
                pass
            self._inflight.clear()

    def close(self) -> None:
        """Abort what is in flight, then stop the engine with its processes joined (shutdown.py)."""
        from kdpipe.pipeline.shutdown import shutdown_llm

        self.abort()
        llm, self.llm = self.llm, None
        shutdown_llm(llm)


@dataclass
class HfEngine(_BatchHelpers):
    """Plain transformers, one request at a time: slow, simple, the ground truth in tests."""

    teacher: str
    max_model_len: int
    max_logprobs: int
    top_k: int
    vocab_size: int
    temperature: float = 0.0
    sampling_top_p: float = 1.0
    model: object = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    _pending: list = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg, max_model_len: int, vocab_size: int, tokenizer) -> "HfEngine":
        import torch
        from transformers import AutoModelForCausalLM

        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.teacher, revision=cfg.teacher_revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype
        )
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        eos = model.generation_config.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos = eos + (tokenizer.eos_token_id,)  # vLLM also stops on the tokenizer's eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(
            teacher=cfg.teacher,
            max_model_len=max_model_len,
            max_logprobs=cfg.logprob_cap,
            top_k=cfg.top_k,
            vocab_size=vocab_size,
            temperature=cfg.temperature,
            sampling_top_p=cfg.sampling_top_p,
            model=model,
            eos_ids=eos,
            pad_id=pad,
        )

    def submit(self, key: int, req: Request) -> None:
        self._pending.append((key, req))

    def num_inflight(self) -> int:
        return len(self._pending)

    def poll(self) -> list[tuple[int, TeacherOutput]]:
        if not self._pending:
            return []
        key, req = self._pending.pop(0)
        return [(key, self._run(req))]

    def _run(self, req: Request) -> TeacherOutput:
        import torch

        device = next(self.model.parameters()).device
        ids = torch.tensor([req.token_ids], dtype=torch.long, device=device)  # [1, T]
        with torch.inference_mode():
            if req.kind == "score":
                logits = self.model(input_ids=ids).logits[0]  # [T, V]
                pos = torch.tensor(req.positions, dtype=torch.long, device=device)
                top_ids, top_lps = torch_topk(logits[pos - 1], self.top_k, self.vocab_size)  # [P, K]
                actual = torch.log_softmax(logits[pos - 1].float(), dim=-1).gather(-1, ids[0, pos].unsqueeze(-1))  # [P, 1]
                return TeacherOutput([], top_ids, top_lps, "score", actual.squeeze(-1).cpu().numpy())
            sample = self.temperature > 0
            if sample and req.seed is not None:
                torch.manual_seed(req.seed)
            kw = dict(do_sample=True, temperature=self.temperature, top_p=self.sampling_top_p) if sample else dict(do_sample=False)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=req.max_new_tokens,
                eos_token_id=list(self.eos_ids) or None,
                pad_token_id=self.pad_id,
                output_logits=True,  # raw logits, before any processor: the teacher's distribution
                return_dict_in_generate=True,
                top_k=None,
                **kw,
            )
            new = out.sequences[0, ids.shape[1] :].tolist()
            logits = torch.stack(out.logits, dim=1)[0][: len(new)]  # [P, V]
            top_ids, top_lps = torch_topk(logits, self.top_k, self.vocab_size)
            reason = "stop" if new and new[-1] in self.eos_ids else "length"
            return TeacherOutput(new, top_ids, top_lps, reason)

    def abort(self) -> None:
        self._pending.clear()

    def close(self) -> None:
        self._pending.clear()
        self.model = None


def make_engine(cfg, max_model_len: int, tokenizer) -> Engine:
    if cfg.engine == "hf":
        return HfEngine.from_config(cfg, max_model_len, len(tokenizer), tokenizer)
    return VllmEngine.from_config(cfg, max_model_len, len(tokenizer))
