"""The tiny vLLM teacher that bench_generate and bench_score both time phase one with.

A 2-layer, 128-wide float32 Llama with a ~2k vocabulary (the shape measured in docs/notes), built
once under the benchmark's work folder and reused on a rerun.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def tiny_teacher(workdir: str | None, prefix: str) -> tuple[Path, Path]:
    """-> (work folder: WORKDIR or a new temporary one, the teacher under it)."""
    from kdpipe.pipeline.tiny import DEFAULT_CORPUS, TinyModelConfig, build_tiny

    work = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        build_tiny(teacher, [DEFAULT_CORPUS] * 16,
                   TinyModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, seed=0))
    return work, teacher
