"""GLUE metrics on hand-worked examples."""

from __future__ import annotations

import math

import pytest
from sklearn.metrics import f1_score

from glora import metrics
from glora.data import glue_metrics, primary_metric


def test_single_place() -> None:
    assert metrics.glue_metrics is glue_metrics
    assert metrics.primary_metric is primary_metric


def test_accuracy_tasks() -> None:
    for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert primary_metric(task) == "accuracy"
    assert glue_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    assert glue_metrics("mnli", [0, 1, 2], [0, 2, 2]) == pytest.approx({"accuracy": 2 / 3})


def test_f1_tasks() -> None:
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, f1 2/3
    out = glue_metrics("mrpc", preds, labels)
    assert out == pytest.approx({"f1": 2 / 3, "accuracy": 0.6})
    assert out["f1"] == pytest.approx(f1_score(labels, preds))
    assert primary_metric("MRPC") == "f1" and primary_metric("qqp") == "f1"
    assert glue_metrics("qqp", [0, 0], [0, 0])["f1"] == 0.0  # no positives: defined as 0


def test_mcc() -> None:
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2 tn=2 fp=1 fn=1: (4 - 1) / sqrt(3*3*3*3) = 1/3
    out = glue_metrics("cola", preds, labels)
    assert out == pytest.approx({"mcc": 1 / 3, "accuracy": 4 / 6})
    assert primary_metric("CoLA") == "mcc"


def test_pearson_spearman() -> None:
    labels = [0.0, 1.0, 2.0, 3.0]
    out = glue_metrics("stsb", [0.0, 2.0, 4.0, 6.0], labels)
    assert out == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    out = glue_metrics("STS-B", [1.0, 0.0, 3.0, 2.0], labels)
    # ranks differ by a swap in each pair: r = 1 - 6*4/(4*15) = 0.6; Pearson equals it here
    assert out == pytest.approx({"pearson": 0.6, "spearman": 0.6})
    assert primary_metric("stsb") == "pearson"
    assert math.isnan(glue_metrics("stsb", [1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["pearson"])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="equal length"):
        glue_metrics("sst2", [1, 0], [1])
    with pytest.raises(ValueError, match="zero"):
        glue_metrics("sst2", [], [])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("squad", [1], [1])


def test_top_prediction_share() -> None:
    from glora.data.glue import top_prediction_share

    assert top_prediction_share([1, 1, 1, 1]) == 1.0
    assert top_prediction_share([0, 1, 1, 2]) == 0.5
    assert top_prediction_share([2, 2, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="zero predictions"):
        top_prediction_share([])
