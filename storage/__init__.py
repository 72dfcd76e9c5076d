"""kdpipe.storage: the shard store shared by phase one (writer) and phase two (reader).

Public API (see docs/store-format.md). Imported lazily, so `kdpipe inspect` and the writer do
not pay for importing torch; only StoreReader/Record/collate/Batch need it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "kdpipe.storage.format",
    "CodecConfig": "kdpipe.storage.codecs",
    "StoreMeta": "kdpipe.storage.manifest",
    "StoreManifest": "kdpipe.storage.manifest",
    "ShardInfo": "kdpipe.storage.manifest",
    "cache_key": "kdpipe.storage.manifest",
    "tokenizer_fingerprint": "kdpipe.storage.manifest",
    "open_store": "kdpipe.storage.manifest",
    "ShardWriter": "kdpipe.storage.writer",
    "finalize_store": "kdpipe.storage.finalize",
    "inspect_store": "kdpipe.storage.inspect",
    "StoreReader": "kdpipe.storage.reader",
    "Record": "kdpipe.storage.reader",
    "partition": "kdpipe.storage.reader",
    "collate": "kdpipe.storage.batch",
    "Batch": "kdpipe.storage.batch",
    "KdpipeError": "kdpipe.storage.errors",
    "StoreError": "kdpipe.storage.errors",
    "ConfigError": "kdpipe.storage.errors",
    "DataError": "kdpipe.storage.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdpipe.storage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
