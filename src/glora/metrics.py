"""Evaluation metrics.

GLUE metrics live in :mod:`glora.data.glue` (they need the task specs) and are re-exported
here, so that engines import every metric from ``glora.metrics``. Generation metrics
(ROUGE-L, exact match for SuperNI) belong in their own module and are re-exported here too.
"""

from __future__ import annotations

from glora.data.glue import glue_metrics, primary_metric

__all__ = ["glue_metrics", "primary_metric"]
