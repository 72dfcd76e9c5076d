"""Property-based tests (hypothesis) of the codecs and the reader, on valid and on corrupted input.

Valid input: whatever a teacher may produce (any k, top_p, vocabulary up to 2^24, ties, padding,
near-one and tiny probabilities) round-trips through ShardWriter -> finalize -> StoreReader
within the documented bounds. Corrupted input (truncated, bit-flipped, garbage, zeroed ranges,
wrong schema, manifests with bad fields, tampered columns with a matching checksum): every
failure is a kdpipe error naming the file, never another exception, a hang (timeouts) or a read
that silently differs from what was written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from faultlib import BYTE_FAULTS, HERE, PYTHON, REPORT, base_seed, child_env, corrupt_bytes, examples, make_meta
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from kdpipe.storage import (
    CodecConfig, KdpipeError, ShardWriter, StoreError, StoreReader, collate, finalize_store, inspect_store, open_store,
)
from kdpipe.storage.manifest import file_sha256

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.timeout(600)


# ----------------------------------------------------------------------------------------------
# strategies


@st.composite
def teacher_rows(draw, max_p: int = 6, max_k: int = 12):
    """One sequence's teacher output: input_ids [L], positions [P], top_ids [P, K], top_logprobs [P, K]."""
    vocab = draw(st.sampled_from([50, 1000, 65536 + 300, 1 << 20]))
    K = draw(st.integers(1, min(max_k, vocab)))
    P = draw(st.integers(0, max_p))
    L = P + 1 + draw(st.integers(0, 3))
    scale = draw(st.sampled_from([0.01, 1.0, 5.0, 30.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, vocab, L)
    pos = np.sort(rng.choice(np.arange(1, L), size=P, replace=False)) if P else np.zeros(0, np.int64)
    top = np.stack([rng.choice(vocab, size=K, replace=False) for _ in range(P)]) if P else np.zeros((0, K), np.int64)
    # full-vocabulary log-probs of the kept ids: the remaining mass lives on the other ids
    logits = rng.normal(size=(P, K)) * scale
    rest = rng.uniform(0.0, 1.0, size=(P, 1)) if draw(st.booleans()) else np.zeros((P, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True) * (1.0 - rest)
    with np.errstate(divide="ignore"):
        lp = np.log(np.maximum(p, 1e-300))
    order = np.argsort(-lp, axis=1, kind="stable")
    top, lp = np.take_along_axis(top, order, 1), np.take_along_axis(lp, order, 1)
    n_pad = draw(st.integers(0, K - 1)) if K > 1 else 0
    if n_pad and P:
        top[:, K - n_pad:] = -1
        lp[:, K - n_pad:] = -np.inf
    return vocab, ids, pos, top, lp.astype(np.float32)


codecs_topk = st.builds(
    lambda k, p: CodecConfig(name="topk", top_k=k, top_p=p),
    st.integers(1, 12), st.one_of(st.none(), st.floats(0.05, 1.0)),
)
codecs_sampled = st.builds(
    lambda k, n, s: CodecConfig(name="sampled", top_k=k, draws=n, seed=s),
    st.integers(1, 12), st.integers(1, 255), st.integers(0, 1000),
)


def write_rows(store: Path, codec: CodecConfig, vocab: int, rows: list[tuple]) -> None:
    with ShardWriter(store, make_meta(codec, vocab=vocab), shard_bytes=2000) as w:
        for i, (ids, pos, top, lp) in enumerate(rows):
            w.add(f"r{i}", ids, pos, top, lp, text=f"t{i}" if i % 2 else None)
    finalize_store(store)


def read_all(store: Path, **kw) -> dict[str, object]:
    out = {}
    recs = list(StoreReader(store, shuffle=False, **kw))
    for r in recs:
        out[r.sample_id] = r
    if recs:
        collate(recs, pad_id=0)  # the tensors a trainer builds must build too
    return out


def lp_bound(codec: CodecConfig, lp: np.ndarray) -> np.ndarray:
    if hasattr(codec, "logprob_error_bound"):
        return codec.logprob_error_bound(lp)
    return np.full(lp.shape, codec.logprob_step / 2 + 1e-6)


# ----------------------------------------------------------------------------------------------
# valid input round-trips


@seed(base_seed())
@settings(max_examples=examples(25), **SETTINGS)
@given(codec=codecs_topk, rows=st.lists(teacher_rows(), min_size=1, max_size=3))
def test_topk_round_trip_within_bounds(codec, rows):
    vocab = rows[0][0]
    rows = [r[1:] for r in rows if r[0] == vocab] or [rows[0][1:]]
    # sequences with no targets at all are legal; the store needs one sequence
    with tempfile.TemporaryDirectory(prefix="kdp-prop-") as d:
        store = Path(d) / "s"
        write_rows(store, codec, vocab, rows)
        got = read_all(store)
    REPORT.add("property:topk_round_trip", inputs=1)
    assert set(got) == {f"r{i}" for i in range(len(rows))}
    for i, (ids, pos, top, lp) in enumerate(rows):
        r = got[f"r{i}"]
        assert r.text == (f"t{i}" if i % 2 else None)
        np.testing.assert_array_equal(r.input_ids, ids)
        np.testing.assert_array_equal(r.target_positions, pos)
        assert r.ids.shape[0] == len(pos) and r.logprobs.shape == r.ids.shape and r.tail.shape == (len(pos),)
        lp64 = lp.astype(np.float64)
        for j in range(len(pos)):
            valid = top[j] >= 0
            p = np.exp(lp64[j][valid])[: codec.top_k]
            n = len(p)
            if codec.top_p is not None:
                n = int(((np.cumsum(p) - p) < codec.top_p).sum())
            kept = r.ids[j] >= 0
            assert kept.sum() == n, (j, kept.sum(), n)
            np.testing.assert_array_equal(r.ids[j, :n], top[j][valid][:n])
            assert np.isneginf(r.logprobs[j, n:]).all()
            err = np.abs(r.logprobs[j, :n].astype(np.float64) - lp64[j][valid][:n])
            assert (err <= lp_bound(codec, lp64[j][valid][:n]) + 1e-6).all(), err
            tail = max(0.0, 1.0 - float(p[:n].sum()))
            assert abs(float(r.tail[j]) - tail) <= 2e-7 + 1e-6 * tail, (r.tail[j], tail)


@seed(base_seed())
@settings(max_examples=examples(25), **SETTINGS)
@given(codec=codecs_sampled, row=teacher_rows())
def test_sampled_counts_are_draws_from_the_top_k(codec, row):
    vocab, ids, pos, top, lp = row
    with tempfile.TemporaryDirectory(prefix="kdp-prop-") as d:
        a, b = Path(d) / "a", Path(d) / "b"
        write_rows(a, codec, vocab, [(ids, pos, top, lp)])
        write_rows(b, codec, vocab, [(ids, pos, top, lp)])  # same seed + sample id -> same draws
        ra, rb = read_all(a)["r0"], read_all(b)["r0"]
    REPORT.add("property:sampled_counts", inputs=1)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.logprobs, rb.logprobs)
    N = codec.draws
    for j in range(len(pos)):
        kept = ra.ids[j] >= 0
        counts = np.rint(np.exp(ra.logprobs[j][kept].astype(np.float64)) * N)
        tail = np.rint(float(ra.tail[j]) * N)
        assert counts.sum() + tail == N, (counts, tail, N)
        assert (counts >= 1).all()
        allowed = set(top[j][top[j] >= 0][: codec.top_k].tolist())
        assert set(ra.ids[j][kept].tolist()) <= allowed
        assert len(set(ra.ids[j][kept].tolist())) == int(kept.sum())  # unique ids


# ----------------------------------------------------------------------------------------------
# corrupted input


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    """A small valid topk store (several shards) and what reading it must give."""
    from faultlib import build_store

    d = tmp_path_factory.mktemp("base") / "store"
    build_store(d, n=24, shard_bytes=2500)
    return Base(d, fingerprint(read_all(d)))


@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory):
    from faultlib import build_store

    d = tmp_path_factory.mktemp("sampled") / "store"
    build_store(d, n=6, codec=CodecConfig(name="sampled", top_k=8, draws=20))
    return d


class Base(tuple):
    """(store dir, fingerprint of its records), with a short repr for hypothesis reports."""

    def __new__(cls, d, fp):
        return super().__new__(cls, (d, fp))

    def __repr__(self) -> str:
        return f"Base({self[0]})"


def fingerprint(recs) -> dict:
    return {k: (r.input_ids.tobytes(), r.ids.tobytes(), r.logprobs.tobytes(), r.tail.tobytes()) for k, r in recs.items()}


def names_a_file(msg: str, names: list[str]) -> bool:
    return any(n in msg for n in names)


def attempt_all(store: Path, expected: dict, names: list[str]) -> str:
    """Open, read (verify on), collate and inspect --verify a possibly corrupted store.

    -> "refused" when every path refused it with a kdpipe error naming one of `names`, "intact"
    when everything read back exactly as written. Anything else fails the test.
    """
    outcome = []
    try:
        got = fingerprint(read_all(store))
    except KdpipeError as e:
        assert names_a_file(str(e), names), f"error does not name the file: {e}"
        outcome.append("refused")
    else:
        assert got == expected, "a corrupted store was read without error but differs from what was written"
        outcome.append("intact")
    try:
        rep = inspect_store(store, verify=True)
    except KdpipeError as e:
        assert names_a_file(str(e), names), f"error does not name the file: {e}"
        outcome.append("refused")
    else:
        if rep["ok"]:
            outcome.append("intact")
        else:
            assert all(names_a_file(p["shard"], names) for p in rep["problems"]), rep["problems"]
            outcome.append("refused")
    return "refused" if "refused" in outcome else "intact"


@seed(base_seed())
@settings(max_examples=examples(40), **SETTINGS)
@given(kind=st.sampled_from(BYTE_FAULTS), which=st.integers(0, 1000), a=st.floats(0, 1), b=st.integers(0, 2**16))
def test_corrupted_shard_bytes_are_refused(base_store, kind, which, a, b):
    src, expected = base_store
    with tempfile.TemporaryDirectory(prefix="kdp-corrupt-") as d:
        store = Path(d) / "s"
        shutil.copytree(src, store)
        shards = sorted(store.glob("shard-*.arrow"))
        target = shards[which % len(shards)]
        before = target.read_bytes()
        corrupt_bytes(target, kind, a, b)
        changed = target.read_bytes() != before
        outcome = attempt_all(store, expected, [target.name])
    REPORT.add("property:corrupt_shard_bytes", inputs=1, injected=int(changed), survived=int(changed))
    if changed:
        assert outcome == "refused"


@seed(base_seed())
@settings(max_examples=examples(20), **SETTINGS)
@given(kind=st.sampled_from(BYTE_FAULTS), a=st.floats(0, 1), b=st.integers(0, 2**16))
def test_corrupted_manifest_bytes_are_refused(base_store, kind, a, b):
    src, expected = base_store
    with tempfile.TemporaryDirectory(prefix="kdp-corrupt-") as d:
        store = Path(d) / "s"
        shutil.copytree(src, store)
        corrupt_bytes(store / "manifest.json", kind, a, b)
        # a damaged shard entry is reported under the shard's (possibly damaged) name
        outcome = attempt_all(store, expected, ["manifest.json", "shard-t"])
    REPORT.add("property:corrupt_manifest_bytes", inputs=1, injected=1, survived=1)
    assert outcome in ("refused", "intact")  # whitespace-only damage may leave valid JSON


UNVERIFIED_CHILD = r"""
import json, shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from faultlib import BYTE_FAULTS, corrupt_bytes
import numpy as np
from kdpipe.storage import KdpipeError, StoreReader, collate
src, n, seed = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
only = set(json.loads(sys.argv[5])) if len(sys.argv) > 5 else None  # replay chosen cases of the sequence
rng = np.random.default_rng(seed)
n_shards = len(list(src.glob("shard-*.arrow")))
for i in range(n):
    kind = BYTE_FAULTS[int(rng.integers(len(BYTE_FAULTS)))]
    a, b = float(rng.uniform()), int(rng.integers(1 << 16))
    t = int(rng.integers(n_shards))
    if only is not None and i not in only:
        continue
    with tempfile.TemporaryDirectory(prefix="kdp-unverified-") as d:
        store = Path(d) / "s"
        shutil.copytree(src, store)
        shards = sorted(store.glob("shard-*.arrow"))
        target = shards[t]
        corrupt_bytes(target, kind, a, b)
        print("CASE", json.dumps({"i": i, "kind": kind, "a": a, "b": b, "shard": target.name}), flush=True)
        try:
            recs = list(StoreReader(store, shuffle=False, verify=False))
            collate(recs, pad_id=0)
            out = "read"
        except KdpipeError:
            out = "refused"
        except Exception as e:
            out = "other:" + type(e).__name__ + ": " + str(e)[:120]
        print("RESULT", json.dumps({"i": i, "outcome": out}), flush=True)
"""


# Cases of the sequence above that raised non-kdpipe errors before the reader mapped every decode
# failure to StoreError (finding 11): seed -> case indices (UnicodeDecodeError, ArrowNotImplementedError,
# ValueError: operands could not be broadcast, IndexError).
UNVERIFIED_REGRESSIONS = {0: [135], 1: [64, 73, 98], 2: [41, 111]}


def _unverified_run(src: Path, n: int, seed_: int, only: list[int] | None = None):
    import subprocess

    args = [PYTHON, "-c", UNVERIFIED_CHILD, str(HERE), str(src), str(n), str(seed_)] + ([json.dumps(only)] if only else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=child_env())
    cases = [json.loads(ln[5:]) for ln in r.stdout.splitlines() if ln.startswith("CASE ")]
    results = [json.loads(ln[7:]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    return r, cases, results


def test_unverified_reads_known_bad_cases_are_refused(base_store):
    """Finding 11 regressions: the damaged shards that once escaped as numpy/Arrow/Unicode errors."""
    src, _ = base_store
    for seed_, idx in UNVERIFIED_REGRESSIONS.items():
        r, cases, results = _unverified_run(src, max(idx) + 1, seed_, idx)
        assert r.returncode == 0, f"the interpreter died (rc {r.returncode}) on {cases[-1] if cases else None}: {r.stderr[-1500:]}"
        assert len(results) == len(idx), (r.stdout[-2000:], r.stderr[-2000:])
        other = [(c, x) for c, x in zip(cases, results) if x["outcome"].startswith("other")]
        assert not other, other
        REPORT.add("property:unverified_corrupt_reads", inputs=len(idx), injected=len(idx), survived=len(idx))


ABORT_CHILD = r"""
import shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from faultlib import corrupt_bytes
from kdpipe.storage import StoreError, StoreReader, collate
src, k, a, b = Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
with tempfile.TemporaryDirectory(prefix="kdp-abort-") as d:
    store = Path(d) / "s"
    shutil.copytree(src, store)
    target = sorted(store.glob("shard-*.arrow"))[k]
    corrupt_bytes(target, "zero_range", a, b)
    try:
        collate(list(StoreReader(store, shuffle=False, verify=False)), pad_id=0)
        print("OUTCOME read")
    except StoreError as e:
        print("OUTCOME refused", target.name in str(e))
"""


@pytest.mark.parametrize("k,a,b", [(0, 0.21, 13), (0, 0.21, 17), (1, 0.235, 15)])
def test_unverified_read_that_aborted_the_interpreter_is_refused(base_store, k, a, b):
    """Finding 8: zeroed bytes in a string column's offsets made Arrow C++ throw std::length_error
    inside as_py() -> `terminate called` -> SIGABRT of the whole interpreter (reproduced at db57825).
    The reader validates each record batch fully before touching its buffers: a StoreError naming the shard."""
    import subprocess

    src, _ = base_store
    r = subprocess.run([PYTHON, "-c", ABORT_CHILD, str(HERE), str(src), str(k), str(a), str(b)], capture_output=True,
                       text=True, timeout=300, env=child_env())
    assert r.returncode == 0, f"the interpreter died (rc {r.returncode}): {r.stderr[-1500:]}"
    assert "OUTCOME refused True" in r.stdout, r.stdout + r.stderr[-1500:]
    REPORT.add("property:unverified_corrupt_reads", inputs=1, injected=1, survived=1)


def test_unverified_reads_of_corrupted_shards_never_crash(base_store, tmp_path):
    """verify=False skips the checksum (and a hostile store can carry matching ones): the decoder
    itself must refuse damaged bytes with a kdpipe error, never abort the interpreter or raise
    anything else. Run in a child process so that an abort is reported, not fatal to the suite."""
    src, _ = base_store
    n = examples(40)
    r, cases, results = _unverified_run(src, n, base_seed())
    REPORT.add("property:unverified_corrupt_reads", inputs=len(cases), injected=len(cases),
               survived=sum(x["outcome"] in ("read", "refused") for x in results))
    REPORT.note("property:unverified_corrupt_reads", json.dumps(
        {k: sum(x["outcome"].startswith(k) for x in results) for k in ("read", "refused", "other")}))
    assert r.returncode == 0, f"the interpreter died (rc {r.returncode}) on {cases[-1] if cases else None}: {r.stderr[-1500:]}"
    other = [x for x in results if x["outcome"].startswith("other")]
    assert not other, other[:5]


def _paths(obj, prefix=()):
    """Every (path) to a value inside a JSON object."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, prefix + (i,))


HOSTILE_VALUES = [None, -1, 0, 2**63, 1.5, float("nan"), "", "abc", "../../etc/passwd", "/etc/passwd", [], {}, [1, 2],
                  {"a": 1}, True, "shard-t00000-s000000.arrow", "\u0000"]


@seed(base_seed())
@settings(max_examples=examples(60), **SETTINGS)
@given(which=st.integers(0, 10**6), value=st.sampled_from(HOSTILE_VALUES + ["<delete>"]),
       target=st.sampled_from(["manifest.json", "task"]))
def test_manifest_with_bad_fields_is_refused_or_harmless(base_store, which, value, target):
    """Replace (or delete) one field anywhere in manifest.json or a task manifest."""
    src, expected = base_store
    with tempfile.TemporaryDirectory(prefix="kdp-manifest-") as d:
        store = Path(d) / "s"
        shutil.copytree(src, store)
        path = store / "manifest.json" if target == "manifest.json" else store / "tasks" / "task-00000.json"
        obj = json.loads(path.read_text())
        paths = [p for p in _paths(obj) if p]
        p = paths[which % len(paths)]
        parent = obj
        for k in p[:-1]:
            parent = parent[k]
        if value == "<delete>":
            del parent[p[-1]]
        else:
            parent[p[-1]] = copy.deepcopy(value)
        path.write_text(json.dumps(obj))
        REPORT.add("property:manifest_fields", inputs=1, injected=1)
        # a bad entry of a shard may be reported under the shard's name
        names = ["manifest.json", "task-00000.json"] + [p.name for p in store.glob("shard-*.arrow")]
        if target == "manifest.json":
            attempt_all(store, expected, names)
        else:
            # a task manifest is read by finalize and by a resuming writer
            os.unlink(store / "manifest.json")
            try:
                finalize_store(store)
            except KdpipeError as e:
                assert "task-00000.json" in str(e) or str(store) in str(e), e
            else:
                attempt_all(store, expected, names)
            try:
                with ShardWriter(store, make_meta(), shard_bytes=2500) as w:
                    w.done_ids()
            except KdpipeError as e:
                assert "task-00000.json" in str(e) or str(store) in str(e), e
    REPORT.add("property:manifest_fields", survived=1)


ESCAPES = ["../../etc/passwd", "/etc/passwd", "../outside/shard-t00000-s000000.arrow", "shard-t00000-s000000.arrow/../../x",
           "./shard-t00000-s000000.arrow", "sub/shard-t00000-s000000.arrow", "shard-t00000-s000000.arrow\u0000.txt", ""]


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.parametrize("where", ["manifest.json", "task"])
def test_shard_paths_escaping_the_store_are_refused(base_store, tmp_path, name, where):
    src, _ = base_store
    store = tmp_path / "s"
    shutil.copytree(src, store)
    (tmp_path / "outside").mkdir()
    shutil.copy(store / "shard-t00000-s000000.arrow", tmp_path / "outside" / "shard-t00000-s000000.arrow")
    path = store / "manifest.json" if where == "manifest.json" else store / "tasks" / "task-00000.json"
    obj = json.loads(path.read_text())
    obj["shards"][0]["file"] = name
    path.write_text(json.dumps(obj))
    REPORT.add("untrusted:shard_path_escape", inputs=1, injected=1)
    if where == "manifest.json":
        with pytest.raises(StoreError, match="manifest.json"):
            open_store(store)
        with pytest.raises(StoreError, match="manifest.json"):
            StoreReader(store)
    else:
        with pytest.raises(StoreError, match="task-00000.json"):
            finalize_store(store)
        # a resuming writer must not open a file the task manifest points at outside the store
        with pytest.raises(StoreError, match="task-00000.json"):
            with ShardWriter(store, make_meta(), shard_bytes=2500) as w:
                w.done_ids()
    REPORT.add("untrusted:shard_path_escape", survived=1)


def fix_totals(m: dict) -> dict:
    """Recompute a manifest's totals from its shard entries: a consistent (hostile) manifest."""
    sh = m["shards"]
    m.update(num_sequences=sum(x["rows"] for x in sh), num_target_tokens=sum(x["target_tokens"] for x in sh),
             bytes=sum(x["bytes"] for x in sh))
    return m


def test_symlinked_shard_pointing_outside_is_refused(base_store, tmp_path):
    src, _ = base_store
    store = tmp_path / "s"
    shutil.copytree(src, store)
    victim = store / "shard-t00000-s000000.arrow"
    outside = tmp_path / "elsewhere.arrow"
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    REPORT.add("untrusted:shard_path_escape", inputs=1, injected=1)
    with pytest.raises(StoreError, match="outside the store"):
        open_store(store)
    REPORT.add("untrusted:shard_path_escape", survived=1)


def test_wrong_schema_shard_is_refused(base_store, sampled_store, tmp_path):
    """A shard of another codec (valid Arrow, valid checksum in the manifest) in a topk store."""
    src, expected = base_store
    store = tmp_path / "s"
    shutil.copytree(src, store)
    foreign = sorted(sampled_store.glob("shard-*.arrow"))[0]
    target = store / "shard-t00000-s000000.arrow"
    shutil.copy(foreign, target)
    m = json.loads((store / "manifest.json").read_text())
    fm = json.loads((sampled_store / "manifest.json").read_text())
    m["shards"][0].update({k: fm["shards"][0][k] for k in ("bytes", "checksum", "rows", "batch_rows", "target_tokens")})
    (store / "manifest.json").write_text(json.dumps(fix_totals(m)))
    REPORT.add("untrusted:wrong_schema", inputs=1, injected=1)
    with pytest.raises(StoreError, match=r"shard-t00000-s000000\.arrow.*schema"):
        read_all(store)
    rep = inspect_store(store, verify=True)
    assert not rep["ok"] and "schema" in rep["problems"][0]["problem"]
    REPORT.add("untrusted:wrong_schema", survived=1)


# Columns of a shard rewritten with values a writer never produces; the manifest's checksum is
# updated to match, as a buggy or hostile producer would. The reader must still refuse.
TAMPER = {
    "num_entries": lambda v: v + 1,  # more entries per position than stored
    "target_positions": lambda v: v + 1000,  # positions beyond the sequence
    "ids_hi": lambda v: v + 5,  # ids beyond the vocabulary
    "input_ids": lambda v: v - 5000,  # negative token ids
}


def rewrite_column(path: Path, col: str, fn) -> None:
    f = pa.OSFile(str(path), "rb")
    reader = pa.ipc.open_file(f)
    schema = reader.schema
    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    f.close()
    out = []
    for b in batches:
        arr = b.column(col)
        vt = arr.type.value_type
        if vt == pa.bool_():  # a one-bit column (e.g. ids >= 65536): set every bit
            new_vals = pa.array(np.ones(len(arr.values), dtype=bool))
        else:
            dt = vt.to_pandas_dtype()
            vals = np.clip(fn(arr.values.to_numpy(zero_copy_only=False).astype(np.int64)), np.iinfo(dt).min, np.iinfo(dt).max)
            new_vals = pa.array(vals.astype(dt), type=vt)
        new = pa.ListArray.from_arrays(arr.offsets, new_vals)
        cols = [new if n == col else b.column(n) for n in schema.names]
        out.append(pa.RecordBatch.from_arrays(cols, schema=schema))
    with pa.OSFile(str(path), "wb") as sink:
        w = pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))
        for b in out:
            w.write_batch(b)
        w.close()


@pytest.mark.parametrize("col", sorted(TAMPER))
def test_tampered_columns_with_matching_checksum_are_refused(base_store, tmp_path, col):
    src, expected = base_store
    store = tmp_path / "s"
    shutil.copytree(src, store)
    target = store / "shard-t00000-s000000.arrow"
    with pa.OSFile(str(target), "rb") as f:
        if col not in pa.ipc.open_file(f).schema.names:
            pytest.skip(f"the shard schema has no column {col}")
    rewrite_column(target, col, TAMPER[col])
    m = json.loads((store / "manifest.json").read_text())
    m["shards"][0].update(bytes=target.stat().st_size, checksum=file_sha256(target))
    (store / "manifest.json").write_text(json.dumps(fix_totals(m)))
    REPORT.add("untrusted:tampered_columns", inputs=1, injected=1)
    with pytest.raises(StoreError, match=target.name):
        read_all(store)
    rep = inspect_store(store, verify=True)
    assert not rep["ok"] and rep["problems"][0]["shard"] == target.name
    REPORT.add("untrusted:tampered_columns", survived=1)


def test_orphaned_tmp_files_are_never_read(base_store, tmp_path):
    """Garbage .tmp files (a killed writer's leftovers) beside a finalized store change nothing."""
    src, expected = base_store
    store = tmp_path / "s"
    shutil.copytree(src, store)
    for name in ("shard-t00000-s000000.arrow.tmp", "shard-t00000-s000099.arrow.tmp", "manifest.json.123.tmp"):
        (store / name).write_bytes(os.urandom(500))
    REPORT.add("untrusted:orphan_tmp", inputs=1, injected=3, survived=3)
    assert fingerprint(read_all(store)) == expected
    rep = inspect_store(store, verify=True)
    assert rep["ok"] and rep["shards"] == len(list(store.glob("shard-*.arrow")))


def test_random_garbage_store_directory(tmp_path):
    """Directories that are not stores at all: clear StoreError, naming the path."""
    rng = np.random.default_rng(base_seed())
    cases = {
        "missing": None,
        "empty": {},
        "only_garbage_manifest": {"manifest.json": rng.bytes(300)},
        "manifest_is_a_list": {"manifest.json": b"[1, 2, 3]"},
        "manifest_non_utf8": {"manifest.json": b"\xff\xfe\x00{"},
        "future_version": {"manifest.json": json.dumps({"format_version": 99}).encode()},
        "huge_number": {"manifest.json": b'{"format_version": 1' + b"0" * 5000 + b"}"},
        "deep_nesting": {"manifest.json": b"[" * 100000 + b"]" * 100000},
    }
    for name, files in cases.items():
        d = tmp_path / name
        if files is not None:
            d.mkdir()
            for f, data in files.items():
                (d / f).write_bytes(data)
        for fn in (open_store, lambda p: inspect_store(p, verify=True), StoreReader):
            with pytest.raises(StoreError) as e:
                fn(d)
            assert str(d) in str(e.value), (name, e.value)
        REPORT.add("untrusted:garbage_store_dir", inputs=1, injected=1, survived=1)
