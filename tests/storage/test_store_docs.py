"""The plain-pyarrow recipe of docs/store-format.md decodes a shard exactly like StoreReader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from kdstore_testutil import build_store

from kdpipe.storage import CodecConfig, StoreReader
from kdpipe.storage.codecs import codec_table


def logprob_table(sqrt_step, log_step, size=65536):  # verbatim from docs/store-format.md
    c = np.arange(size, dtype=np.float64)
    cA = np.floor((1 - 2 * sqrt_step / log_step) / sqrt_step)
    return (2 * np.log1p(-np.minimum(c, cA) * sqrt_step) - np.maximum(c - cA, 0) * log_step).astype(np.float32)


def test_docs_recipe_matches_reader(tmp_path):
    build_store(tmp_path, n=8, codec=CodecConfig(top_k=6, top_p=0.8))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    codec = manifest["meta"]["codec"]
    table_lp = logprob_table(codec["sqrt_step"], codec["log_step"])
    np.testing.assert_array_equal(table_lp, codec_table(CodecConfig(**codec)))
    reader = {r.sample_id: r for r in StoreReader(tmp_path, shuffle=False)}
    for shard in manifest["shards"]:
        with pa.OSFile(str(tmp_path / shard["file"])) as f:
            table = pa.ipc.open_file(f).read_all()
        for row in table.to_pylist():
            n = np.asarray(row["num_entries"], np.int64)
            ids = (np.asarray(row["ids_hi"], np.int64) << 16) | np.asarray(row["ids_lo"], np.int64)
            delta = (np.asarray(row["logprob_q_hi"], np.int64) << 8) | np.asarray(row["logprob_q_lo"], np.int64)
            starts = np.cumsum(n) - n
            run = np.cumsum(delta)
            codes = run - np.repeat(run[starts] - delta[starts], n)
            logp = table_lp[codes]
            rec = reader[row["sample_id"]]
            valid = rec.ids >= 0
            np.testing.assert_array_equal(rec.ids[valid], ids)
            np.testing.assert_array_equal(rec.logprobs[valid], logp)
            np.testing.assert_array_equal(rec.tail, np.asarray(row["tail"], np.float32))
