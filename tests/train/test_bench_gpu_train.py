"""Issue 22 §2: `benchmarks/bench_gpu_train.py --smoke` runs the whole benchmark on CPU (tokenizer, student,
store, train-student KD / --resume / CE through the CLI, the plain loop) and prints every field, so the
prepared GPU command cannot rot. Its figures mean nothing on CPU; the resume check is real."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu_train.py"


def test_bench_gpu_train_smoke_prints_every_field(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench"
    bench.main(["--smoke", "--out", str(out)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(bench.FIELDS) <= set(last)
    assert set(last["runs"]) == {"kd", "ce", "plain"}
    for name, run in last["runs"].items():
        for key in bench.RUN_FIELDS:
            assert key in run, (name, key)
        assert run["tokens_per_s"] > 0 and 0 < run["step_median_s"] <= run["step_p90_s"]
        assert 0 <= run["data_wait_share"] < 1 and run["mfu"] > 0
    assert set(last["goals"]) == set(bench.GOALS)
    assert last["goals"]["resume_exact"] is True and last["resume_bitwise"] is True  # the curve continues exactly
    assert last["smoke"] is True and last["device"] == "cpu"
    # everything under --out: the runs, their metrics with step_s / data_wait_s, the result
    assert json.loads((out / "result.json").read_text()) == last
    rows = [json.loads(x) for x in (out / "runs" / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, bench.SMOKE["steps"] + 1))
    assert all("step_s" in r and "data_wait_s" in r for r in rows)
