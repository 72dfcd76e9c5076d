"""Fixtures of the job-layer tests: tiny job files, tiny models, and a real one-node Slurm."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (slurm_cluster helper)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/jobs (jobs_helpers)

from jobs_helpers import CORPUS, IN_CI  # noqa: E402
from slurm_cluster import SlurmCluster, missing_programs  # noqa: E402

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 training documents and 2 held-out ones from the shipped corpus."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    train = [ln for ln in lines if '"split": "train"' in ln][:8]
    held = [ln for ln in lines if '"split": "heldout"' in ln][:2]
    out = tmp_path_factory.mktemp("data") / "docs.jsonl"
    out.write_text("\n".join(train + held) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def vllm_student(tmp_path_factory, tiny_teacher) -> Path:
    """A smaller student vLLM's CPU attention accepts (head_dim 32; the shared tiny_student has 16)."""
    from kdpipe.pipeline.tiny import TinyModelConfig, build_model

    out = tmp_path_factory.mktemp("student32")
    build_model(out, tiny_teacher, TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1, seed=1))
    return out


def require_slurm() -> None:
    missing = missing_programs()
    why = "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"
    if missing:
        if IN_CI:
            pytest.fail(f"Slurm is required in CI but {', '.join(missing)} not found: {why}")
        pytest.skip(f"Slurm not installed ({', '.join(missing)}): {why}")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the Slurm tests start slurmctld/slurmd and need root")
        pytest.skip("the Slurm tests start slurmctld/slurmd and need root")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munge + slurmctld + slurmd for the session; SLURM_CONF points the clients at it."""
    require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
