"""Partitioning over rank x worker: every row exactly once per epoch, also across a resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from kdstore_testutil import build_store

from kdpipe.storage import StoreReader, partition


def test_partition_function_covers_every_row_once():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = rng.integers(0, 50, rng.integers(1, 30)).tolist()
        order = rng.permutation(len(rows))
        total = sum(rows)
        for parts in range(1, 8 * 4 + 1):
            seen = Counter()
            sizes = []
            for part in range(parts):
                spans = partition(rows, order, parts, part)
                sizes.append(sum(b - a for _, a, b in spans))
                for g, a, b in spans:
                    assert 0 <= a < b <= rows[g]
                    seen.update((g, r) for r in range(a, b))
            assert len(seen) == total and all(v == 1 for v in seen.values())
            assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    data = build_store(path, n=37, shard_bytes=2500, num_tasks=2)
    return path, data


def _read(reader, limit=None):
    out = []
    for rec in reader:
        out.append(rec.sample_id)
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("world", range(1, 9))
def test_reader_exactly_once_with_resume(store, world):
    path, data = store
    for workers in range(1, 5):
        for epoch in (0, 1):
            seen = Counter()
            for rank in range(world):
                for w in range(workers):
                    kw = dict(rank=rank, world_size=world, worker_id=w, num_workers=workers, seed=5, shuffle_buffer=3, epoch=epoch, verify=False)
                    full = _read(StoreReader(path, **kw))
                    # interrupt halfway, save the cursor as JSON, resume in a fresh reader
                    half = len(full) // 2
                    r1 = StoreReader(path, **kw)
                    first = _read(r1, limit=half) if half else []
                    cursor = json.loads(json.dumps(r1.state_dict()))
                    r2 = StoreReader(path, **kw)
                    r2.load_state_dict(cursor)
                    rest = _read(r2)
                    assert first + rest == full  # resumed order continues the uninterrupted one
                    seen.update(full)
            assert set(seen) == set(data) and all(v == 1 for v in seen.values()), (world, workers, epoch)


def test_epochs_reshuffle_and_seed_is_deterministic(store):
    path, _ = store
    r = StoreReader(path, seed=1, shuffle_buffer=4)
    e0 = _read(r)
    e1 = _read(r)  # the reader moves on to epoch 1 by itself
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert _read(StoreReader(path, seed=1, shuffle_buffer=4)) == e0
    assert _read(StoreReader(path, seed=1, shuffle_buffer=4, epoch=1)) == e1
    assert _read(StoreReader(path, shuffle=False)) == _read(StoreReader(path, shuffle=False))


def test_cursor_seeks_instead_of_replaying(store, monkeypatch):
    path, _ = store
    r1 = StoreReader(path, seed=2, shuffle_buffer=2)
    _read(r1, limit=30)
    cursor = r1.state_dict()
    assert cursor["consumed"] >= 30 and cursor["shard"] is not None
    r2 = StoreReader(path, seed=2, shuffle_buffer=2)
    r2.load_state_dict(cursor)
    decoded = []
    import kdpipe.storage.reader as reader_mod

    orig = reader_mod.DecodedBatch.record

    def counting(self, j):
        decoded.append(j)
        return orig(self, j)

    monkeypatch.setattr(reader_mod.DecodedBatch, "record", counting)
    rest = _read(r2)
    # only the buffered rows and the rows after the cursor are decoded, not the 30 before it
    assert len(decoded) == len(rest) == 37 - 30


def test_cursor_from_another_setup_is_refused(store):
    from kdpipe.storage import StoreError

    path, _ = store
    r = StoreReader(path, world_size=2, rank=0, worker_id=0, num_workers=1)
    _read(r, limit=3)
    other = StoreReader(path, world_size=3, rank=0, worker_id=0, num_workers=1)
    with pytest.raises(StoreError, match="parts"):
        other.load_state_dict(r.state_dict())


def test_torch_dataloader_workers_split_the_rows(store):
    import torch

    path, data = store
    reader = StoreReader(path, seed=0, shuffle_buffer=4)  # worker_id/num_workers from get_worker_info()
    dl = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2, collate_fn=lambda r: r.sample_id)
    got = list(dl)
    assert sorted(got) == sorted(data)
