"""Untrusted input: nothing in a job file, a dataset, a store or a checkpoint can run code.

- source scan (ast): every torch.load passes weights_only=True; no pickle/marshal/shelve/dill/
  joblib loads, no np.load(allow_pickle=True), no eval/exec; trust_remote_code is never a literal
  True and every config that has it defaults to False;
- produced files: a store holds only Arrow IPC, JSON, TOML and lock files; a checkpoint only
  safetensors, JSON, TOML, tokenizer files and torch .pt archives whose pickle stream references
  nothing but the tensor-rebuild globals torch.load(weights_only=True) allows;
- sample ids with '/', '..', NUL, absolute paths stay ids: no file is created from them;
- every string field of a job file with a hostile value (newlines, quotes, $(), backticks, ';')
  is refused by validation or rendered so that bash runs it as one literal word.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickletools
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from faultlib import REPO, REPORT, make_meta, sample_for

from kdpipe.storage import ConfigError, ShardWriter, StoreReader, finalize_store

SOURCE_DIRS = ["storage", "pipeline", "jobs", "slurm", "benchmarks"]


def source_files() -> list[Path]:
    out = []
    for d in SOURCE_DIRS:
        out += sorted((REPO / d).rglob("*.py"))
    return out


def call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def scan() -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {"torch_load": [], "pickle": [], "remote_code": [], "eval": []}
    n_calls = 0
    for path in source_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as e:  # a file mid-edit by its owner: reported, not crashed on
            bad["eval"].append(f"{path}: unparsable ({e})")
            continue
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    if m.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"):
                        bad["pickle"].append(f"{rel}:{node.lineno}: imports {m}")
            if not isinstance(node, ast.Call):
                continue
            n_calls += 1
            name = call_name(node)
            where = f"{rel}:{node.lineno}: {name}(...)"
            if name == "torch.load" or name.endswith(".torch.load"):
                v = kw(node, "weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad["torch_load"].append(where + " without weights_only=True")
            if name.endswith(("np.load", "numpy.load")):
                v = kw(node, "allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    bad["pickle"].append(where + " with allow_pickle")
            if name.split(".")[-1] in ("loads", "load") and name.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "joblib"):
                bad["pickle"].append(where)
            if name.endswith("read_pickle") or name.endswith("to_pickle"):
                bad["pickle"].append(where)
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                bad["eval"].append(where)
            v = kw(node, "trust_remote_code")
            if isinstance(v, ast.Constant) and v.value is True:
                bad["remote_code"].append(where + " trust_remote_code=True")
    bad["_calls"] = [str(n_calls)]
    return bad


def test_source_has_no_unsafe_loading():
    bad = scan()
    n = int(bad.pop("_calls")[0])
    REPORT.add("untrusted:source_scan", inputs=n)
    assert not bad["torch_load"], bad["torch_load"]
    assert not bad["pickle"], bad["pickle"]
    assert not bad["remote_code"], bad["remote_code"]
    assert not bad["eval"], bad["eval"]


def test_trust_remote_code_defaults_off():
    """Every config dataclass with a trust_remote_code field defaults it to False."""
    import dataclasses
    import importlib

    found = []
    for path in source_files():
        if "benchmarks" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        if "trust_remote_code" not in text or "@dataclass" not in text and "dataclasses.dataclass" not in text:
            continue
        mod_name = "kdpipe." + ".".join(path.relative_to(REPO).with_suffix("").parts)
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001 - a module that needs an optional extra
            continue
        for obj in vars(mod).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__:
                for f in dataclasses.fields(obj):
                    if f.name == "trust_remote_code":
                        found.append(f"{obj.__name__}")
                        assert f.default is False, f"{mod_name}.{obj.__name__}.trust_remote_code defaults to {f.default!r}"
    assert "GenerateConfig" in found and "TrainConfig" in found, found
    REPORT.add("untrusted:remote_code_defaults", inputs=len(found))


# ----------------------------------------------------------------------------------------------
# produced files

ALLOWED_GLOBALS = {  # what a torch.save of tensors + plain containers references (weights_only allows these)
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"), ("torch", "FloatStorage"), ("torch", "LongStorage"), ("torch", "ByteStorage"),
    ("torch", "IntStorage"), ("torch", "DoubleStorage"), ("torch", "HalfStorage"), ("torch", "BFloat16Storage"),
    ("torch", "BoolStorage"), ("torch", "ShortStorage"), ("torch", "CharStorage"), ("torch", "device"),
}


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    out, stack = set(), []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            stack.append(arg)
        if op.name == "GLOBAL":
            mod, name = arg.split(" ", 1)
            out.add((mod, name))
        elif op.name == "STACK_GLOBAL":
            out.add((stack[-2], stack[-1]))
    return out


def classify(path: Path) -> str:
    head = path.read_bytes()[:8]
    if head[:6] == b"ARROW1":
        return "arrow"
    if path.suffix == ".json" or path.name.endswith(".jsonl"):
        json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(x) for x in path.read_text().splitlines() if x]
        return "json"
    if path.suffix == ".toml":
        tomllib.loads(path.read_text())
        return "toml"
    if path.suffix == ".lock" and path.stat().st_size == 0:
        return "lock"
    if path.suffix == ".safetensors":
        n = int.from_bytes(path.read_bytes()[:8], "little")
        json.loads(path.read_bytes()[8:8 + n])
        return "safetensors"
    if path.suffix == ".pt" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pk = [n for n in z.namelist() if n.endswith(".pkl")]
            globs = set().union(*(pickle_globals(z.read(n)) for n in pk))
        unexpected = globs - ALLOWED_GLOBALS
        assert not unexpected, f"{path}: pickle references {sorted(unexpected)}"
        import torch

        torch.load(path, weights_only=True)  # the restricted unpickler accepts it
        return "torch-zip(tensors only)"
    if path.suffix in (".jinja", ".txt", ".md", ".png", ".log", ".out"):
        return path.suffix[1:]
    return "UNKNOWN"


def test_store_files_have_no_pickle(tmp_path):
    from faultlib import build_store

    build_store(tmp_path / "s", n=10)
    kinds = {p.name: classify(p) for p in (tmp_path / "s").rglob("*") if p.is_file()}
    REPORT.add("untrusted:produced_formats", inputs=len(kinds))
    assert set(kinds.values()) <= {"arrow", "json", "toml", "lock"}, kinds


def test_checkpoint_and_run_files_have_no_pickle(tiny_student, tmp_path):
    """A short training run: every file it writes is one of the safe formats."""
    from faultlib import build_store

    from kdpipe.pipeline.train.config import TrainConfig
    from kdpipe.pipeline.train.trainer import train

    # a store of the student's own tokenizer (the fake teacher ids are below its vocabulary)
    from transformers import AutoTokenizer

    from kdpipe.storage import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(tiny_student)
    store = tmp_path / "store"
    meta = make_meta(vocab=len(tok))
    meta = type(meta)(**{**meta.__dict__, "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    with ShardWriter(store, meta, shard_bytes=3000) as w:
        for i in range(8):
            ids, pos, top, lp = sample_for(f"s{i}", vocab=len(tok), max_len=20)
            w.add(f"s{i}", ids, pos, top, lp)
    finalize_store(store)
    out = tmp_path / "run"
    train(TrainConfig(student=str(tiny_student), stores=(str(store),), out=str(out), steps=2, save_every=1,
                      tokens_per_batch=64, prefetch=1))
    kinds = {str(p.relative_to(out)): classify(p) for p in out.rglob("*") if p.is_file()}
    REPORT.add("untrusted:produced_formats", inputs=len(kinds))
    unknown = {k: v for k, v in kinds.items() if v == "UNKNOWN"}
    assert not unknown, unknown
    assert any(v == "safetensors" for v in kinds.values())


# ----------------------------------------------------------------------------------------------
# sample ids never become paths

HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "a/b/c", "..", ".", "x\x00y", "~/x", "C:\\win", "$(touch PWNED)",
               "`touch PWNED`", "é/ü", "-rf", " ", "a" * 5000, "shard-t00000-s000000.arrow", "manifest.json", "tasks"]


def test_hostile_sample_ids_stay_ids(tmp_path):
    store = tmp_path / "deep" / "store"
    with ShardWriter(store, make_meta(), shard_bytes=2000) as w:
        for sid in HOSTILE_IDS:
            w.add(sid, *sample_for(sid), text=sid)
    finalize_store(store)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    allowed_prefix = "deep/store"
    assert all(f.startswith(allowed_prefix) or f == "deep" for f in files), files
    names = {Path(f).name for f in files} - {"deep"}
    import re

    assert all(re.match(r"^(shard-t\d{5}-s\d{6}\.arrow|manifest\.json|meta\.json|\.finalize\.lock|tasks|task-\d{5}\.(json|lock)|store)$", n)
               for n in names), names
    assert not list(Path("/").glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    got = {r.sample_id: r.text for r in StoreReader(store, shuffle=False)}
    assert got == {s: s for s in HOSTILE_IDS}
    REPORT.add("untrusted:hostile_sample_ids", inputs=len(HOSTILE_IDS), injected=len(HOSTILE_IDS), survived=len(HOSTILE_IDS))


# ----------------------------------------------------------------------------------------------
# job files: hostile values in every string field

BASE_JOB = """\
name = {name}
run_dir = {run_dir}
[teacher]
model = {teacher}
dtype = "float32"
max_model_len = 256
engine = "hf"
[data]
dataset = {dataset}
text_field = {text_field}
id_field = "id"
[generation]
recipe = "summarize"
k = 4
num_tasks = 2
store = {store}
[[students]]
name = {student_name}
model = {student}
steps = 2
[evaluation]
data = {eval_data}
[slurm]
partition = {partition}
account = {account}
qos = {qos}
mem = {mem}
time = {{ generate = {time} }}
extra_sbatch = [{extra}]
python = {python}
"""

SAFE = {"name": "j", "run_dir": "run", "teacher": "teacher", "dataset": "data.jsonl", "text_field": "text", "store": "store",
        "student_name": "s", "student": "student", "eval_data": "eval.jsonl", "partition": "cpu", "account": "acct",
        "qos": "normal", "mem": "2G", "time": "00:10:00", "extra": "--constraint=x"}

HOSTILE_VALUES = [
    "x\ntouch PWNED-nl", "x\r\ntouch PWNED-crlf", "x'; touch PWNED-sq; '", "x\"; touch PWNED-dq; \"", "$(touch PWNED-cmd)",
    "`touch PWNED-bt`", "x; touch PWNED-semi", "x && touch PWNED-and", "x | touch PWNED-pipe", "--wrap=touch PWNED-wrap",
    "${IFS}touch${IFS}PWNED-ifs", "x\\\ntouch PWNED-bsnl", "x #\ntouch PWNED-comment",
]


def toml_value(field: str, value: str) -> str:
    s = json.dumps(value)
    return s if field != "extra" else s


def test_hostile_job_values_never_run(tmp_path):
    from kdpipe.jobs.plan import make_plan, write_configs
    from kdpipe.jobs.spec import load_job
    from kdpipe.jobs.submit import render_step

    recorder = tmp_path / "recorder.py"
    record = tmp_path / "calls.jsonl"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    recorder.chmod(0o755)
    refused = rendered = 0
    for fi, field in enumerate(SAFE):
        for vi, value in enumerate(HOSTILE_VALUES):
            base = tmp_path / f"c{fi}-{vi}"
            base.mkdir()
            vals = {k: json.dumps(v) for k, v in SAFE.items()}
            vals[field] = json.dumps(value)
            vals["extra"] = vals["extra"]
            vals["python"] = json.dumps(str(recorder))
            (base / "job.toml").write_text(BASE_JOB.format(**vals))
            try:
                job = load_job(base / "job.toml")
                plan = make_plan(job)
            except ConfigError:
                refused += 1
                continue
            rendered += 1
            write_configs(plan)
            env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost", HOME=str(base))
            for step in plan.steps:
                script = base / f"{step.name}.sbatch"
                script.write_text(render_step(plan, step, ["1"] if step.after else []))
                r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
                assert r.returncode == 0, (field, value, r.stderr)
                subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=base, timeout=60)
            pwned = [str(p) for p in tmp_path.rglob("PWNED*")] + [str(p) for p in Path.cwd().glob("PWNED*")]
            assert not pwned, (field, value, pwned)
    REPORT.add("untrusted:hostile_job_values", inputs=refused + rendered, injected=refused + rendered,
               survived=refused + rendered)
    REPORT.note("untrusted:hostile_job_values", f"{refused} refused by validation, {rendered} rendered and ran as literal words")
