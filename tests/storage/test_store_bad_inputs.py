"""Bad inputs get a StoreError naming the file; nothing already written is touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from kdstore_testutil import build_store, fake_sample, make_meta

import numpy as np

from kdpipe.pipeline.cli import main as cli
from kdpipe.storage import CodecConfig, ShardWriter, StoreError, StoreReader, finalize_store, inspect_store, open_store
from kdpipe.storage.manifest import file_checksum


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    build_store(path, n=12, shard_bytes=3000)
    return path


def first_shard(store: Path) -> Path:
    return store / json.loads((store / "manifest.json").read_text())["shards"][0]["file"]


def read_all(store: Path) -> list[str]:
    return [r.sample_id for r in StoreReader(store, shuffle=False)]


def test_bit_flipped_shard_caught_by_reader_and_inspect_verify(store):
    shard = first_shard(store)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{shard.name}.*checksum mismatch") as ei:
        read_all(store)
    # both digests whole (finding 9): a prefix cut could print two identical strings
    recorded = json.loads((store / "manifest.json").read_text())["shards"][0]["checksum"]
    actual = file_checksum(shard)
    assert actual != recorded and actual in str(ei.value) and recorded in str(ei.value), str(ei.value)
    res = CliRunner().invoke(cli, ["inspect", str(store), "--verify"])
    assert res.exit_code != 0
    assert shard.name in res.output and "checksum mismatch" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(store), "--verify", "--json"])
    assert res.exit_code != 0
    report = json.loads(res.output.splitlines()[0])
    assert report["ok"] is False and report["problems"][0]["shard"] == shard.name
    assert {"shards", "sequences", "target_tokens", "bytes_per_token", "ok"} <= set(report)


def test_good_store_inspect_json(store):
    res = CliRunner().invoke(cli, ["inspect", str(store), "--verify", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["ok"] and report["sequences"] == 12 and report["shards"] > 1
    assert report["target_tokens"] == open_store(store).num_target_tokens
    res = CliRunner().invoke(cli, ["inspect", str(store)])
    assert res.exit_code == 0 and "bytes / target token" in res.output


def test_truncated_shard(store):
    shard = first_shard(store)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreError, match=f"{shard.name}.*truncated"):
        read_all(store)
    report = inspect_store(store)
    assert not report["ok"] and report["problems"][0]["shard"] == shard.name


def test_unknown_format_version(store):
    m = json.loads((store / "manifest.json").read_text())
    m["format_version"] = 99
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest.json: unknown store format version 99"):
        open_store(store)
    res = CliRunner().invoke(cli, ["inspect", str(store)])
    assert res.exit_code != 0 and "format version" in res.output


def test_wrong_schema(store):
    shard = first_shard(store)
    t = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
    t = t.drop_columns(["tail"]).replace_schema_metadata(t.schema.metadata)
    with pa.ipc.new_file(str(shard), t.schema) as w:
        w.write_table(t)
    m = json.loads((store / "manifest.json").read_text())  # keep size/checksum consistent: only the schema is wrong
    m["shards"][0].update(bytes=shard.stat().st_size, checksum=file_checksum(shard))
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=f"{shard.name}: wrong schema.*tail"):
        read_all(store)
    assert not inspect_store(store, verify=True)["ok"]


def test_missing_manifest(store, tmp_path):
    (store / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json: manifest not found.*kdpipe finalize"):
        open_store(store)
    with pytest.raises(StoreError, match="not found"):
        open_store(tmp_path / "nowhere")


def test_shard_path_escaping_the_store_is_refused(store):
    m = json.loads((store / "manifest.json").read_text())
    m["shards"][0]["file"] = "../shard-t00000-s000000.arrow"
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="not a shard file name"):
        open_store(store)
    m["shards"][0]["file"] = "/etc/passwd"
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="refusing"):
        open_store(store)


def test_two_tasks_claiming_the_same_shard(tmp_path):
    store = tmp_path / "s"
    build_store(store, n=10, num_tasks=2, finalize=False)
    t0 = json.loads((store / "tasks/task-00000.json").read_text())
    t1_path = store / "tasks/task-00001.json"
    t1 = json.loads(t1_path.read_text())
    t1["shards"].append(t0["shards"][0])
    t1_path.write_text(json.dumps(t1))
    before = snapshot(store)
    with pytest.raises(StoreError, match="task-00001.json: task 1 claims shard shard-t00000-s000000.arrow, which belongs to task 0"):
        finalize_store(store)
    assert snapshot(store) == before and not (store / "manifest.json").exists()


def test_empty_store_and_missing_task(tmp_path):
    store = tmp_path / "empty"
    with ShardWriter(store, make_meta()):
        pass
    with pytest.raises(StoreError, match="empty"):
        finalize_store(store)
    with pytest.raises(StoreError, match="task\\(s\\) 1 of 2 never wrote a manifest"):
        _finalize_two(tmp_path)
    with pytest.raises(StoreError, match="meta.json: not found"):
        finalize_store(tmp_path)


def _finalize_two(tmp_path):
    store = tmp_path / "two"
    rng = np.random.default_rng(0)
    with ShardWriter(store, make_meta(), task_index=0, num_tasks=2) as w:
        w.add("a", *fake_sample(rng))
    finalize_store(store)


def test_store_of_another_teacher_or_codec_is_refused(store):
    before = snapshot(store)
    with pytest.raises(StoreError, match="written by another teacher/codec.*codec"):
        ShardWriter(store, make_meta(CodecConfig(top_k=4)))
    with pytest.raises(StoreError, match="written by another teacher/codec.*teacher"):
        ShardWriter(store, make_meta(teacher="other"))
    assert snapshot(store) == before


def test_two_writers_on_one_task_one_refuses(tmp_path):
    store = tmp_path / "s"
    with ShardWriter(store, make_meta(), task_index=0, num_tasks=2) as w:
        with pytest.raises(StoreError, match="task 0 is being written by another process"):
            ShardWriter(store, make_meta(), task_index=0, num_tasks=2)
        with ShardWriter(store, make_meta(), task_index=1, num_tasks=2) as w1:  # another task is fine
            w1.add("b", *fake_sample(np.random.default_rng(1)))
        w.add("a", *fake_sample(np.random.default_rng(0)))
    finalize_store(store)
    assert sorted(read_all(store)) == ["a", "b"]


def test_bad_add_arguments_name_the_sample(tmp_path):
    from kdpipe.storage import DataError

    ids, pos, top, lp = fake_sample(np.random.default_rng(0))
    with ShardWriter(tmp_path / "s", make_meta()) as w:
        with pytest.raises(DataError, match="'x'.*target positions"):
            w.add("x", ids, pos + 1, top, lp)
        with pytest.raises(DataError, match="'x'.*\\[P="):
            w.add("x", ids, pos, top[:-1], lp[:-1])
        with pytest.raises(DataError, match="'x'.*vocab_size"):
            w.add("x", ids, pos, top + 5000, lp)
        dup = top.copy()
        dup[2, 1] = dup[2, 0]
        with pytest.raises(DataError, match=f"'x'.*position {pos[2]} lists a token id twice"):
            w.add("x", ids, pos, dup, lp)
        w.add("x", ids, pos, top, lp)
        with pytest.raises(DataError, match="already written"):
            w.add("x", ids, pos, top, lp)


def test_shard_dropped_from_a_manifest_is_noticed(store):
    m = json.loads((store / "manifest.json").read_text())
    dropped = m["shards"].pop(1)["file"]
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=f"{dropped}.*not in its manifest.*finalize"):
        open_store(store)


def test_malformed_manifests_name_the_file(store):
    path = store / "manifest.json"
    good = path.read_text()
    for bad in ['{"format_version": 1' + "0" * 5000 + "}", "[" * 100000 + "]" * 100000, "[1, 2]", "\xff"]:
        path.write_text(bad, encoding="latin-1")
        with pytest.raises(StoreError, match="manifest.json"):
            open_store(store)
    m = json.loads(good)
    m["meta"]["codec"]["top_k"] = "many"
    path.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest.json.*codec.top_k"):
        open_store(store)
    m = json.loads(good)
    m["shards"][0]["rows"] = -3
    path.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest.json.*rows"):
        open_store(store)


def test_tampered_column_with_matching_checksum_is_refused(store):
    """A shard rewritten with out-of-range values (checksum updated) is refused by the reader and --verify."""
    shard = first_shard(store)
    f = pa.OSFile(str(shard))
    reader = pa.ipc.open_file(f)
    schema, batches = reader.schema, [reader.get_batch(i) for i in range(reader.num_record_batches)]
    f.close()
    out = []
    for b in batches:
        col = b.column("target_positions")
        vals = np.asarray(col.values) + 1000  # beyond the sequence
        new = pa.ListArray.from_arrays(col.offsets, pa.array(vals.astype(np.int32)))
        out.append(pa.RecordBatch.from_arrays([new if n == "target_positions" else b.column(n) for n in schema.names], schema=schema))
    with pa.ipc.new_file(str(shard), schema) as w:
        for b in out:
            w.write_batch(b)
    m = json.loads((store / "manifest.json").read_text())
    m["shards"][0].update(bytes=shard.stat().st_size, checksum=file_checksum(shard))
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=f"{shard.name}.*target position lies outside"):
        read_all(store)
    report = inspect_store(store, verify=True)
    assert not report["ok"] and report["problems"][0]["shard"] == shard.name
