"""Test support importable from any test folder (a module name no conftest.py can shadow).

In CI (`CI=true`) a missing vLLM or Slurm is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str, why: str) -> None:
    """Skip locally when an optional component is missing; fail in CI, where it must exist."""
    try:
        __import__(module)
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"{module} is required in CI ({why}): {e}")
        pytest.skip(f"{module} not installed ({why})")
