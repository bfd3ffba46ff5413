"""Data sets and client partitions for the federated simulations."""

from __future__ import annotations

from glora.data.glue import (
    GLUE_TASKS,
    DataNotFoundError,
    GlueTaskSpec,
    TextExample,
    get_task_spec,
    glue_metrics,
    load_glue,
    primary_metric,
)
from glora.data.partition import partition, sample_participants

__all__ = [
    "GLUE_TASKS",
    "DataNotFoundError",
    "GlueTaskSpec",
    "TextExample",
    "get_task_spec",
    "glue_metrics",
    "load_glue",
    "partition",
    "primary_metric",
    "sample_participants",
]
