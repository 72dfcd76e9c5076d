"""Evaluation: generate with each model under vLLM, score quality and speed, write the report.

Library entry point: `evaluate(EvalConfig(...)) -> report dict` (also writes the report folder).
"""

from kdpipe.pipeline.evaluate.config import EvalConfig


def evaluate(cfg: EvalConfig) -> dict:
    from kdpipe.pipeline.evaluate.run import evaluate as _evaluate

    return _evaluate(cfg)


__all__ = ["EvalConfig", "evaluate"]
