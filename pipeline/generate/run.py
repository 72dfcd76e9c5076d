"""generate_logits(cfg): phase one as a library call.

Order of work, so every input error surfaces before the (slow) engine start:
  1. task slice, tokenizer, context length, dataset (every row checked), recipe checks;
  2. the store is opened (refused if written by another teacher/codec/recipe/dataset) and the
     ids already in finished shards of this task are skipped (resume);
  3. the engine starts; jobs stream through it with up to `max_inflight` requests queued, so
     continuous batching stays full, while a writer thread encodes and writes shards behind a
     bounded queue (the engine never waits on compression);
  4. the task manifest is marked complete (`kdpipe finalize` merges the tasks).
SIGTERM (SLURM preemption/time limit) stops submitting, finishes the open shard, leaves the task
incomplete and returns; a rerun continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kdpipe.pipeline.config import write_resolved
from kdpipe.pipeline.console import engine_output, root_cause
from kdpipe.pipeline.generate.config import GenerateConfig
from kdpipe.pipeline.generate.data import load_task_data
from kdpipe.pipeline.dtype import resolve_dtype
from kdpipe.pipeline.generate.engines import Engine, make_engine
from kdpipe.pipeline.generate.recipes import Recipe, Result, make_recipe
from kdpipe.pipeline.generate.teacher import build_meta, load_tokenizer, resolve_max_model_len
from kdpipe.storage import ShardWriter
from kdpipe.storage.errors import ConfigError, KdpipeError
from kdpipe.storage.tokenizer_files import save_teacher_tokenizer

CONFIG_FILE = "generate-config.toml"
ENGINE_SIGNAL_GRACE_S = 2.0  # how long an engine error waits for a signal flag that explains it (drive)


@dataclass
class GenerateSummary:
    store: str
    task_index: int
    num_tasks: int
    task_samples: int  # samples in this task's slice
    already_done: int  # skipped because finished shards already hold them
    written: int = 0
    target_tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    stats: dict = field(default_factory=dict)  # truncated, skipped_too_long, ...

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.stats.items() if k.startswith("skipped"))

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        extra = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items()) if k != "readings")
        state = "INTERRUPTED (rerun the same command to continue)" if self.interrupted else "done"
        return (
            f"generate-logits task {self.task_index}/{self.num_tasks} {state}: wrote {self.written} samples, "
            f"{self.target_tokens} target tokens in {self.seconds:.1f}s after engine start ({self.written / s:.2f} samples/s, "
            f"{self.target_tokens / s:.0f} target tok/s); {self.already_done} already in the store"
            + (f"; {extra}" if extra else "")
            + f"; store {self.store}"
        )


def expected_cache_key(cfg: GenerateConfig) -> str:
    """The cache key a run of `cfg` writes into its store, without starting an engine.

    Needs the teacher's tokenizer and config and the dataset (jobs use it to reuse stores).
    """
    from kdpipe.storage import cache_key

    tokenizer = load_tokenizer(cfg)
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.teacher, cfg.teacher_revision, cfg.trust_remote_code))
    max_model_len = resolve_max_model_len(cfg)
    data = load_task_data(cfg.data, cfg.split, cfg.text_field, cfg.target_field, cfg.id_field, cfg.limit, 0, 1)
    recipe = make_recipe(cfg, tokenizer, max_model_len, Counter())
    return cache_key(build_meta(cfg, tokenizer, recipe, data.fingerprint, max_model_len))


class WriterThread:
    """Encodes and writes results off the engine loop; `put` blocks when `maxsize` are waiting."""

    def __init__(self, writer: ShardWriter, maxsize: int) -> None:
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="kdpipe-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            r = self.q.get()
            if r is None:
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                self.writer.add(r.sample_id, r.input_ids, r.target_positions, r.top_ids, r.top_logprobs, r.text)
            except BaseException as e:
                self.error = e

    def put(self, r: Result) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(r)

    def join(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Stop:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks (only the main thread may install handlers).

    Ctrl-C is an interruption like SIGTERM: the open shard is kept and a rerun resumes. Left to Python, it
    raised KeyboardInterrupt somewhere in the loop while the engine's processes, which get the terminal's
    SIGINT too, died under it (an EngineDeadError trace).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.old: dict = {}

    def __enter__(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, lambda *_: self.flag.set()) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self.old.items():
            signal.signal(s, old)


def drive(engine: Engine, recipe: Recipe, todo, sink, max_inflight: int, stop: threading.Event, on_done) -> bool:
    """Run every sample's job through the engine; results go to `sink`. -> True if stopped early."""
    jobs: dict[int, list] = {}  # job no -> [generator, outputs, remaining]
    keymap: dict[int, tuple[int, int]] = {}  # request key -> (job no, index in its yield)
    counter = iter(range(1 << 62))
    samples = iter(todo)

    def advance(no: int, gen, sent) -> None:
        try:
            reqs = next(gen) if sent is None else gen.send(sent)
        except StopIteration as e:
            result = e.value
            if result is not None:
                sink(result)
            on_done(result)
            return
        jobs[no] = [gen, [None] * len(reqs), len(reqs)]
        for i, r in enumerate(reqs):
            key = next(counter)
            keymap[key] = (no, i)
            engine.submit(key, r)

    job_no = 0
    exhausted = False
    while True:
        while not exhausted and not stop.is_set() and engine.num_inflight() < max_inflight:
            s = next(samples, None)
            if s is None:
                exhausted = True
                break
            job_no += 1
            advance(job_no, recipe.job(s), None)
        if stop.is_set():
            engine.abort()
            return True
        if not jobs:
            return False
        try:
            finished = engine.poll()
        except Exception:
            # SIGTERM / Ctrl-C also reached the engine's processes, which may die before this process's
            # handler has run: give the flag a moment before calling it an engine failure.
            if stop.wait(ENGINE_SIGNAL_GRACE_S):
                return True
            raise
        if not finished:
            raise KdpipeError(f"the teacher engine stopped with {len(jobs)} jobs unfinished; see its log above")
        for key, out in finished:
            no, i = keymap.pop(key)
            job = jobs[no]
            job[1][i] = out
            job[2] -= 1
            if job[2] == 0:
                del jobs[no]
                advance(no, job[0], job[1])


def _finish_open_shard(writer: ShardWriter) -> None:
    """Keep the rows written so far as a finished shard without marking the task complete."""
    writer.checkpoint()
    writer.abort()


def check_engine(cfg: GenerateConfig, engine: Engine, vocab_size: int) -> None:
    """A caller-supplied engine (tests, benchmarks) must serve this config."""
    if engine.max_logprobs < cfg.top_k:
        raise ConfigError(
            f"top_k={cfg.top_k} is above the engine's max_logprobs={engine.max_logprobs}; lower --top-k or restart the engine"
        )
    if getattr(engine, "vocab_size", vocab_size) != vocab_size:
        raise ConfigError("the supplied engine was built for another tokenizer")
    kind = type(engine).__name__
    if (cfg.engine == "vllm") != (kind == "VllmEngine"):
        raise ConfigError(f"engine={cfg.engine!r} but the supplied engine is a {kind}; they must agree (it is recorded in the store)")
    if cfg.max_model_len is not None and cfg.max_model_len != engine.max_model_len:
        raise ConfigError(f"max_model_len={cfg.max_model_len} but the supplied engine has {engine.max_model_len}")
    # Per-run sampling settings live on the engine object; align them with this config.
    engine.top_k = cfg.top_k
    engine.temperature = cfg.temperature
    engine.sampling_top_p = cfg.sampling_top_p
    if hasattr(engine, "score_mode"):  # an engine built without prefix caching scores on the full route
        engine.score_mode = cfg.score_mode if getattr(engine, "prefix_cache_ok", False) else "full"


def generate_logits(cfg: GenerateConfig, engine: Engine | None = None, sampler_engine: Engine | None = None,
                    verbose: bool = False) -> GenerateSummary:
    """Phase one for one array task (see the module doc). `engine`: reuse a running engine
    (`sampler_engine`: the on-policy sampler's). Unless `verbose`, the engines' own output goes
    to STORE/logs/generate-task-NNNNN.log (see kdpipe.pipeline.console)."""
    task_index, num_tasks = cfg.resolved_tasks()
    tokenizer = load_tokenizer(cfg)
    # --dtype auto is resolved here, before the engine starts: the engine gets it explicitly and
    # the store meta (cache key) and generate-config.toml record what computed the log-probs.
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.teacher, cfg.teacher_revision, cfg.trust_remote_code))
    if cfg.top_k > len(tokenizer):
        raise ConfigError(f"top_k={cfg.top_k} is above the teacher's vocabulary size {len(tokenizer)}")
    max_model_len = engine.max_model_len if engine is not None else resolve_max_model_len(cfg)
    if engine is not None:
        check_engine(cfg, engine, len(tokenizer))
    data = load_task_data(
        cfg.data, cfg.split, cfg.text_field, cfg.target_field, cfg.id_field, cfg.limit, task_index, num_tasks
    )
    stats: Counter = Counter()
    recipe = make_recipe(cfg, tokenizer, max_model_len, stats)
    recipe.check(data.samples)
    meta = build_meta(cfg, tokenizer, recipe, data.fingerprint, max_model_len)

    writer = ShardWriter(cfg.out, meta, task_index=task_index, num_tasks=num_tasks, shard_bytes=max(1, int(cfg.shard_mb * (1 << 20))))
    # The teacher's tokenizer files travel with the store (cross-tokenizer KD, sequence-level decoding).
    save_teacher_tokenizer(cfg.out, tokenizer)
    own_engine = False
    quiet = contextlib.ExitStack()
    try:
        done = writer.done_ids()
        log_path = Path(cfg.out) / "logs" / f"generate-task-{task_index:05d}.log"
        if len(done) < len(data.samples) and engine is None and not verbose:
            print(f"task {task_index}/{num_tasks}: starting the teacher engine (dtype {cfg.dtype}); its log: {log_path}",
                  file=sys.stderr, flush=True)
        console = quiet.enter_context(engine_output(log_path, verbose))
        # The recipe's own work before the teacher starts (on-policy: the sampler draws, or a rerun
        # reloads, N completions per prompt).
        samples = recipe.prepare(data.samples, done, meta, task_index, sampler_engine)
        todo = [s for s in samples if s.id not in done]
        summary = GenerateSummary(cfg.out, task_index, num_tasks, len(samples), len(samples) - len(todo))
        write_resolved(dataclasses.replace(cfg, task_index=None, num_tasks=num_tasks), Path(cfg.out) / CONFIG_FILE)
        if todo and engine is None:
            log_start = log_path.stat().st_size if log_path.is_file() else 0
            try:
                engine = make_engine(cfg, max_model_len, tokenizer)
            except KdpipeError:
                raise
            except Exception as e:  # the cause is in the engine's log, behind ~60 lines of its trace: one line here
                where = "the log above" if verbose else f"the whole log: {log_path}"
                raise KdpipeError(f"the teacher engine did not start: {root_cause(None if verbose else log_path, log_start, e)} "
                                  f"({where})") from None
            own_engine = True
        # One clock for the bar and the summary: target tokens per second of generation, from
        # here (after the engine start) to the last result.
        t0 = time.perf_counter()
        engine_stats = Counter(getattr(engine, "stats", None) or {})  # a shared engine counts across runs
        interrupted = _run(cfg, engine, recipe, todo, writer, summary, t0, console) if todo else False
        summary.seconds = time.perf_counter() - t0
        # Scoring requests rescored on the full route (engines.py, prefix-cache check): the run's stats.
        stats.update({k: v for k, v in (Counter(getattr(engine, "stats", None) or {}) - engine_stats).items()
                      if k == "score_fallbacks"})
        summary.stats = dict(stats)
        summary.interrupted = interrupted
        if interrupted:
            _finish_open_shard(writer)
        else:
            writer.close()
        return summary
    except BaseException:
        writer.abort()
        raise
    finally:
        try:
            if own_engine:
                engine.close()
        finally:
            quiet.close()  # after the engine's shutdown, whose output belongs in the log too


def _run(cfg: GenerateConfig, engine: Engine, recipe: Recipe, todo, writer: ShardWriter, summary: GenerateSummary,
         t0: float | None = None, console=None) -> bool:
    from tqdm import tqdm

    sink = WriterThread(writer, cfg.writer_queue)
    bar = tqdm(total=len(todo), unit="sample", dynamic_ncols=True, disable=not cfg.progress, file=console or sys.stderr,
               desc=f"task {summary.task_index}/{summary.num_tasks}")
    t0 = time.perf_counter() if t0 is None else t0
    last = [0.0]

    def rate() -> str:
        return f"{summary.target_tokens / max(time.perf_counter() - t0, 1e-9):.0f} target tok/s"

    def on_done(result: Result | None) -> None:
        if result is not None:
            summary.written += 1
            summary.target_tokens += len(result.target_positions)
        bar.update(1)
        now = time.perf_counter()
        if now - last[0] > 1.0:  # postfix formatting is not free; refresh about once a second
            last[0] = now
            bar.set_postfix_str(rate(), refresh=False)

    try:
        with _Stop() as stop:
            interrupted = drive(engine, recipe, todo, sink.put, cfg.max_inflight, stop.flag, on_done)
    finally:
        bar.set_postfix_str(rate(), refresh=False)  # the final figure, as the summary line computes it
        bar.close()
        sink.join()  # every queued result is written (or the writer's error is raised)
    return interrupted
