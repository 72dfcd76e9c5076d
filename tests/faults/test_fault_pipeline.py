"""Pipeline faults: kill -9 / SIGTERM of `kdpipe generate-logits`, `kdpipe train-student` (also exactly
inside checkpoint writing, and with the disk full there) and `kdpipe submit`, then rerun / resume.

Processes are started in their own session and killed as a group (what Slurm does to a job's
cgroup), so engine subprocesses die with their parent. Most generation trials use `--engine hf`
(no 40 s engine start); the full run adds one with vLLM.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faultlib import HERE, KDPIPE, PYTHON, REPORT, base_seed, child_env, full_only, full_run, trials

from kdpipe.storage import StoreReader, finalize_store, inspect_store

pytestmark = pytest.mark.timeout(1800)

N_DOCS = 8
WORDS = ("the city council approved a new budget for parks and schools on monday researchers in paris reported "
         "that river reached its highest level ten years quick brown fox jumps over lazy dog").split()


def start(args: list[str], env: dict | None = None, exe: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen((exe or [KDPIPE]) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(**(env or {})), start_new_session=True)


def kill_group(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def finish(p: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        raise AssertionError(f"timed out: {err[-2000:]}")
    finally:
        kill_group(p)  # no orphaned engine processes either way
    return p.returncode, out, err


def run(args: list[str], env: dict | None = None, exe: list[str] | None = None, timeout: float = 900) -> tuple[int, str, str]:
    return finish(start(args, env, exe), timeout)


def wait_until(pred, p: subprocess.Popen, timeout: float = 600) -> bool:
    """-> True once pred() holds; False if the process ended first."""
    t0 = time.time()
    while not pred():
        if p.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            kill_group(p)
            raise AssertionError("timed out waiting for the fault window")
        time.sleep(0.02)
    return True


# ----------------------------------------------------------------------------------------------
# phase one


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    rows = [{"id": f"doc/{i}/../x{i}" if i % 3 == 0 else f"d{i}", "text": " ".join(rng.choice(WORDS, 14)).capitalize() + "."}
            for i in range(N_DOCS)]  # ids with '/' and '..' must stay ids, never paths
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def doc_ids(docs: Path) -> list[str]:
    return [json.loads(ln)["id"] for ln in docs.read_text().splitlines()]


def gen_args(teacher: Path, docs: Path, out: Path, engine: str = "hf") -> list[str]:
    args = ["generate-logits", "--teacher", str(teacher), "--data", str(docs), "--id-field", "id", "--recipe", "summarize",
            "--engine", engine, "--top-k", "8", "--max-new-tokens", "8", "--temperature", "0", "--shard-mb", "0.002",
            "--no-progress", "--dtype", "float32", "--max-model-len", "256", "--seed", "0"]
    if engine == "vllm":
        args += ["--enforce-eager"]
    return args + ["--out", str(out)]


def records(store: Path) -> dict:
    if not (store / "manifest.json").exists():
        finalize_store(store)
    out: dict = {}
    for r in StoreReader(store, shuffle=False):
        assert r.sample_id not in out, f"sample {r.sample_id!r} stored twice"
        out[r.sample_id] = r
    return out


def shards_on_disk(store: Path) -> int:
    return len(list(store.glob("shard-*.arrow")))


def assert_same_store(got: dict, ref: dict, ids: list[str]) -> None:
    """Every sample exactly once; contents as the uninterrupted run (log-probs within batching noise)."""
    assert sorted(got) == sorted(ids) == sorted(ref)
    for sid, r in got.items():
        q = ref[sid]
        np.testing.assert_array_equal(r.input_ids, q.input_ids)
        np.testing.assert_array_equal(r.target_positions, q.target_positions)
        same = r.ids == q.ids  # ids may swap where the teacher's probabilities tie
        assert same.mean() > 0.95, sid
        assert np.abs(np.where(same, r.logprobs - q.logprobs, 0)).max() <= 1e-2, sid


@pytest.fixture(scope="module")
def gen_reference(tiny_teacher, docs, tmp_path_factory) -> tuple[Path, dict, float]:
    out = tmp_path_factory.mktemp("genref") / "store"
    t0 = time.perf_counter()
    rc, so, se = run(gen_args(tiny_teacher, docs, out))
    assert rc == 0, se[-3000:]
    return out, records(out), time.perf_counter() - t0


def test_kill9_generate_hf_then_rerun_exactly_once(tiny_teacher, docs, gen_reference, tmp_path):
    ref_dir, ref, _ = gen_reference
    ids = doc_ids(docs)
    rng = random.Random(base_seed() * 1000 + 11)
    total_shards = shards_on_disk(ref_dir)
    for trial in range(min(trials(1), 4)):  # ~1 min each here; the storage tests carry the trial count
        out = tmp_path / f"g{trial}"
        p = start(gen_args(tiny_teacher, docs, out))
        k = rng.randrange(0, max(1, total_shards - 1))
        reached = wait_until(lambda: shards_on_disk(out) > k, p)
        if reached:
            time.sleep(rng.uniform(0, 0.5))
        died = p.poll() is None
        kill_group(p)
        p.communicate()
        # what counts is the task manifest (a kill can land after the task was marked complete)
        task = out / "tasks" / "task-00000.json"
        if died and task.exists() and not json.loads(task.read_text())["complete"]:
            with pytest.raises(Exception, match="did not complete|never wrote"):
                finalize_store(out)
        rc, so, se = run(gen_args(tiny_teacher, docs, out))
        assert rc == 0, se[-3000:]
        assert "already in the store" in so
        assert_same_store(records(out), ref, ids)
        assert inspect_store(out, verify=True)["ok"]
        assert not list(out.glob("*.arrow.tmp"))
        REPORT.add("kill9:generate_hf", trials=1, injected=int(died), survived=int(died))


def test_sigterm_generate_finishes_its_shard_and_exits_cleanly(tiny_teacher, docs, gen_reference, tmp_path):
    full_only("about a minute; tests/generate covers SIGTERM too")
    ref_dir, ref, _ = gen_reference
    out = tmp_path / "term"
    p = start(gen_args(tiny_teacher, docs, out))
    reached = wait_until(lambda: shards_on_disk(out) >= 1, p)
    if reached:
        kill_group(p, signal.SIGTERM)
    rc, so, se = finish(p)
    if reached and rc != 0:
        assert rc == 143, (rc, se[-3000:])  # documented: interrupted -> 143, the chain does not finalize
        assert "INTERRUPTED" in so and "Traceback" not in se, se[-3000:]
        task = json.loads((out / "tasks" / "task-00000.json").read_text())
        assert task["complete"] is False
        for s in task["shards"]:
            assert (out / s["file"]).stat().st_size == s["bytes"]
        assert not list(out.glob("*.tmp")), list(out.glob("*.tmp"))
        REPORT.add("sigterm:generate", trials=1, injected=1)
    rc, so, se = run(gen_args(tiny_teacher, docs, out))  # the requeued task
    assert rc == 0, se[-3000:]
    assert_same_store(records(out), ref, doc_ids(docs))
    REPORT.add("sigterm:generate", survived=int(reached))


@pytest.mark.vllm
def test_kill9_generate_vllm_then_rerun_exactly_once(tiny_teacher, docs, tmp_path):
    """One trial with the real engine (full runs only: an engine start costs about a minute here)."""
    full_only("an engine start costs about a minute here")
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # the rule of tests/conftest.py: missing vLLM fails in CI
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"vllm is required in CI: {e}")
        pytest.skip("vllm not installed")
    out = tmp_path / "v"
    p = start(gen_args(tiny_teacher, docs, out, engine="vllm"), env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    reached = wait_until(lambda: shards_on_disk(out) >= 1, p, timeout=900)
    died = reached and p.poll() is None
    kill_group(p)
    p.communicate()
    rc, so, se = run(gen_args(tiny_teacher, docs, out, engine="vllm"), env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert rc == 0, se[-3000:]
    got = records(out)
    assert sorted(got) == sorted(doc_ids(docs))
    assert inspect_store(out, verify=True)["ok"]
    REPORT.add("kill9:generate_vllm", trials=1, injected=int(died), survived=int(died))


# ----------------------------------------------------------------------------------------------
# phase two

TRAIN_STEPS = 4


def train_args(student: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["train-student", "--student", str(student), "--store", str(store), "--out", str(out), "--steps", str(TRAIN_STEPS),
            "--save-every", "2", "--tokens-per-batch", "128", "--lr", "1e-3", "--alpha", "0.5", "--seed", "0",
            "--shuffle-buffer", "4", "--prefetch", "1", *extra]


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln)["loss"] for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def train_reference(tiny_student, gen_reference, tmp_path_factory) -> tuple[Path, list[float]]:
    store = gen_reference[0]
    out = tmp_path_factory.mktemp("trainref") / "run"
    rc, so, se = run(train_args(tiny_student, store, out))
    assert rc == 0, se[-3000:]
    ls = losses(out)
    assert len(ls) == TRAIN_STEPS
    return out, ls


def test_kill9_train_at_random_moments_then_resume_equal_losses(tiny_student, gen_reference, train_reference, tmp_path):
    full_only("tests/train kills once at a fixed step; here at random moments")
    store = gen_reference[0]
    _, ref = train_reference
    rng = random.Random(base_seed() * 1000 + 21)
    for trial in range(min(trials(1), 3)):
        out = tmp_path / f"k{trial}"
        p = start(train_args(tiny_student, store, out))
        k = rng.randrange(1, TRAIN_STEPS)
        reached = wait_until(lambda: len(losses(out)) >= k, p)
        if reached:
            time.sleep(rng.uniform(0, 0.3))
        died = p.poll() is None
        kill_group(p)
        p.communicate()
        rc, so, se = run(train_args(tiny_student, store, out, "--resume"))
        assert rc == 0, se[-3000:]
        assert losses(out) == ref, f"trial {trial} (killed after {k} steps)"
        assert (out / "final" / "model.safetensors").exists()
        REPORT.add("kill9:train_random_moment", trials=1, injected=int(died), survived=int(died))


CKPT_WRAPPER = r"""
import os, signal, sys
spec = os.environ["KDPIPE_CRASH_AT"]  # e.g. torch.save:2:before | os.replace:3:after | fsize:2:LIMIT
what, nth, arg = spec.split(":")
nth = int(nth)
import torch, shutil
import kdpipe.pipeline.train.trainer as trainer
calls = [0]
def arm(mod, name):
    real = getattr(mod, name)
    def w(*a, **k):
        calls[0] += 1
        if calls[0] == nth and arg == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **k)
        if calls[0] == nth and arg == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(mod, name, w)
if what == "torch.save":
    arm(torch, "save")
elif what == "os.replace":
    arm(os, "replace")
elif what == "rmtree":
    arm(shutil, "rmtree")
elif what == "fsize":
    import resource
    real_save = trainer.save_checkpoint
    def limited(*a, **k):
        calls[0] += 1
        if calls[0] == nth:  # the disk fills up while checkpoint `nth` is written
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), resource.RLIM_INFINITY))
        return real_save(*a, **k)
    trainer.save_checkpoint = limited
from kdpipe.pipeline.cli import main
sys.argv = ["kdpipe"] + sys.argv[1:]
main()
"""


def ckpt_points(seed: int) -> list[str]:
    # torch.save: 3 per checkpoint (rng, optimizer, scheduler); os.replace: JSON/TOML writes + the rename
    pts = [f"torch.save:{i}:{w}" for i in range(1, 7) for w in ("before", "after")]
    pts += [f"os.replace:{i}:before" for i in range(1, 13)] + [f"rmtree:{i}:after" for i in (1, 2)]
    rng = random.Random(seed)
    return rng.sample(pts, min(len(pts), 6 if full_run() else 1))  # two training runs per point


def test_kill9_inside_checkpoint_writing_then_resume_equal_losses(tiny_student, gen_reference, train_reference, tmp_path):
    store = gen_reference[0]
    _, ref = train_reference
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(CKPT_WRAPPER)
    for j, pt in enumerate(ckpt_points(base_seed() + 31)):
        out = tmp_path / f"c{j}"
        rc, so, se = run(train_args(tiny_student, store, out), env={"KDPIPE_CRASH_AT": pt}, exe=[PYTHON, str(wrapper)])
        died = rc == -signal.SIGKILL
        assert died or rc == 0, (pt, se[-3000:])
        # a checkpoint directory is whole or absent: every listed one loads
        for c in sorted(out.glob("checkpoint-*")):
            if c.name.endswith(".tmp"):
                continue
            for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "train_state.json", "rng-rank0.pt", "data-rank0.json"):
                assert (c / f).exists(), (pt, c, f)
        rc, so, se = run(train_args(tiny_student, store, out, "--resume"))
        assert rc == 0, (pt, se[-3000:])
        assert losses(out) == ref, pt
        REPORT.add("kill9:train_checkpoint_write", trials=1, injected=int(died), survived=int(died))


def test_disk_full_while_writing_a_checkpoint(tiny_student, gen_reference, train_reference, tmp_path):
    full_only("two training runs")
    store = gen_reference[0]
    ref_dir, ref = train_reference
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(CKPT_WRAPPER)
    limit = (ref_dir / "checkpoint-2" / "optimizer.pt").stat().st_size // 2
    out = tmp_path / "full"
    rc, so, se = run(train_args(tiny_student, store, out), env={"KDPIPE_CRASH_AT": f"fsize:2:{limit}"},
                     exe=[PYTHON, str(wrapper)])
    REPORT.add("disk_full:checkpoint", trials=1, injected=1)
    REPORT.note("disk_full:checkpoint", se.strip().splitlines()[-1][:300] if se.strip() else f"rc={rc}")
    assert rc != 0
    assert (out / "checkpoint-2" / "optimizer.pt").exists()  # the previous checkpoint is intact
    assert not (out / "checkpoint-4").exists()
    assert not (out / "checkpoint-4.tmp").exists(), "the partial checkpoint was left behind"
    # the message: one clear line naming the checkpoint, the cause and what to do (checked before
    # the rerun so that a failure shows it)
    assert "Traceback" not in se, se[-3000:]
    assert str(out / "checkpoint-4.tmp") in se and "--resume" in se and "free space" in se, se[-3000:]
    rc2, so2, se2 = run(train_args(tiny_student, store, out, "--resume"))  # space freed
    assert rc2 == 0, se2[-3000:]
    assert losses(out) == ref
    REPORT.add("disk_full:checkpoint", survived=1)


def test_sigterm_train_writes_a_checkpoint_then_requeue_resumes(tiny_student, gen_reference, train_reference, tmp_path):
    full_only("tests/train covers SIGTERM once")
    store = gen_reference[0]
    _, ref = train_reference
    out = tmp_path / "term"
    p = start(train_args(tiny_student, store, out, "--save-every", "0"))
    reached = wait_until(lambda: len(losses(out)) >= 1, p)
    if reached:
        kill_group(p, signal.SIGTERM)
    rc, so, se = finish(p)
    assert rc == 0, se[-3000:]
    step = len(losses(out))
    if reached and step < TRAIN_STEPS:
        assert "interrupted at step" in so
        assert (out / f"checkpoint-{step}").is_dir() and not (out / "final").exists()
        REPORT.add("sigterm:train", trials=1, injected=1)
        rc, so, se = run(train_args(tiny_student, store, out, "--save-every", "0", "--resume"))
        assert rc == 0, se[-3000:]
        REPORT.add("sigterm:train", survived=1)
    assert losses(out) == ref


# ----------------------------------------------------------------------------------------------
# kdpipe submit

FAKE_SBATCH = r"""#!{python}
import json, os, random, sys, time
log = {log!r}
time.sleep(random.uniform(0.0, 0.25))  # a slow controller: kills land between submissions
n = sum(1 for _ in open(log)) + 1 if os.path.exists(log) else 1
with open(log, "a") as f:
    f.write(json.dumps({{"id": str(1000 + n), "script": sys.argv[-1]}}) + "\n")
    f.flush(); os.fsync(f.fileno())
print(1000 + n)
"""


def test_kill9_submit_leaves_a_consistent_run_dir(tmp_path):
    example = HERE.parents[1] / "jobs" / "examples" / "llama-3.1-70b-to-8b.toml"
    rng = random.Random(base_seed() * 1000 + 41)
    for trial in range(min(trials(1), 5)):
        d = tmp_path / f"s{trial}"
        d.mkdir()
        log = d / "sbatch.log"
        sb = d / "sbatch"
        sb.write_text(FAKE_SBATCH.format(python=sys.executable, log=str(log)))
        sb.chmod(0o755)
        run_dir = d / "run"
        args = ["submit", str(example), "--run-dir", str(run_dir), "--sbatch", str(sb)]
        p = start(args)
        time.sleep(rng.uniform(1.0, 5.0))
        died = p.poll() is None
        kill_group(p)
        p.communicate()
        accepted = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
        sub_path = run_dir / "submission.json"
        if sub_path.exists():
            sub = json.loads(sub_path.read_text())  # never a half-written file
            recorded = [j["job_id"] for j in sub["jobs"]]
            # what it records really was accepted, in order; at most the job in flight is missing
            assert recorded == [a["id"] for a in accepted][: len(recorded)]
            assert len(accepted) - len(recorded) <= 1
            for j in sub["jobs"]:
                text = Path(j["script"]).read_text()
                assert text.startswith("#!") and text.rstrip().endswith(text.rstrip().splitlines()[-1])
                r = subprocess.run(["bash", "-n", j["script"]], capture_output=True, text=True)
                assert r.returncode == 0, r.stderr
        for s in (run_dir / "scripts").glob("*.sbatch") if (run_dir / "scripts").exists() else []:
            assert subprocess.run(["bash", "-n", str(s)], capture_output=True).returncode == 0, s
        left = sorted(str(x.relative_to(run_dir)) for x in run_dir.rglob("*.tmp")) if run_dir.exists() else []
        if left:  # a killed atomic write's temp file: never read (see RELIABILITY.md), only noted
            REPORT.note("kill9:submit", f"left {left}")
        # resubmitting completes (no squeue here: the previous submission is archived, not refused)
        rc, so, se = run(args, timeout=300)
        assert rc == 0, se[-2000:]
        sub = json.loads(sub_path.read_text())
        assert sub["complete"] is True and len(sub["jobs"]) >= 3
        REPORT.add("kill9:submit", trials=1, injected=int(died), survived=int(died))
