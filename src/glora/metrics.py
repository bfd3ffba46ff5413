"""Evaluation metrics, all importable from here.

GLUE metrics live in :mod:`glora.data.glue` (they need the task specs); generation metrics
(ROUGE-L and exact match for SuperNI) in :mod:`glora.metrics_generation`.
"""

from __future__ import annotations

from glora.data.glue import glue_metrics, primary_metric
from glora.metrics_generation import exact_match, generation_metrics, normalize_answer, rouge_l

__all__ = [
    "exact_match",
    "generation_metrics",
    "glue_metrics",
    "normalize_answer",
    "primary_metric",
    "rouge_l",
]
