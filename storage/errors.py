"""Errors kdpipe raises on purpose.

Every error names the thing that is wrong (file, row, key, shard) and says what to change.
The CLI turns a `KdpipeError` into a one-line message and exit code 2, never a traceback.
"""


class KdpipeError(Exception):
    """Base class: a problem the user can fix by changing an input."""


class StoreError(KdpipeError):
    """A shard store is missing, malformed, corrupted or incompatible."""


class ConfigError(KdpipeError):
    """A configuration (TOML file or CLI flag) has an unknown, missing or invalid value."""


class DataError(KdpipeError):
    """An input dataset has a missing field, a bad row or an undecodable file."""
