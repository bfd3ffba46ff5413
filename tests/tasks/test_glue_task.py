"""The GLUE task plug-in and the task registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from glora.config import validate_config
from glora.tasks import Task, TaskError, available_tasks, build_task, register_task
from glora.tasks.glue import GlueTask
from tests.sim.conftest import tiny_raw, write_glue

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"), n_train=20, n_dev=8)


def test_registry_dispatch(glue: Path, tmp_path: Path) -> None:
    assert {"sst2", "stsb", "mnli"} <= set(available_tasks())
    task = build_task(validate_config(tiny_raw(glue, tmp_path, data={"task": "SST-2"})))
    assert isinstance(task, GlueTask) and task.name == "sst2"
    with pytest.raises(TaskError, match="allowed values"):
        build_task(validate_config(tiny_raw(glue, tmp_path, data={"task": "squad"})))


def test_register_custom_family(glue: Path, tmp_path: Path) -> None:
    seen = []

    def builder(cfg):  # a plug-in for a new family ("superni/<task>")
        seen.append(cfg.data.task)
        return GlueTask(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"task": "sst2"})})
        )

    register_task("superni-test", builder, force=True)
    task = build_task(validate_config(tiny_raw(glue, tmp_path, data={"task": "superni-test/x"})))
    assert isinstance(task, Task) and seen == ["superni-test/x"]
    with pytest.raises(ValueError, match="already registered"):
        register_task("superni-test", builder)


def test_sst2_batch_and_eval(glue: Path, tmp_path: Path) -> None:
    task = build_task(validate_config(tiny_raw(glue, tmp_path)))
    model, _ = task.build_model()
    assert task.head_module_names() == ["classifier"] and task.peft_task_type == "SEQ_CLS"
    batch = task.collate(task.train_examples()[:4])
    assert batch["labels"].dtype == torch.long and batch["input_ids"].shape[0] == 4
    assert set(task.partition_keys()) == {0, 1}
    metrics = task.evaluate(model)
    assert set(metrics) == {"accuracy", "top_prediction_share"}
    assert task.primary_metric() == "accuracy"
    # the share of the most-predicted class, from the same predictions the accuracy used
    preds = task.predict(model, task.eval_examples())
    assert metrics["top_prediction_share"] == max((preds == c).mean() for c in set(preds.tolist()))
    # deterministic model construction (the exported adapter relies on it)
    again, _ = task.build_model()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_stsb_is_regression(glue: Path, tmp_path: Path) -> None:
    task = build_task(validate_config(tiny_raw(glue, tmp_path, data={"task": "stsb"})))
    model, _ = task.build_model()
    assert model.config.num_labels == 1
    batch = task.collate(task.train_examples()[:4])
    assert batch["labels"].dtype == torch.float32
    assert set(task.partition_keys()) <= set(range(5))
    assert set(task.evaluate(model)) == {"pearson", "spearman"}


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    task = build_task(validate_config(tiny_raw(tmp_path / "nowhere", tmp_path)))
    with pytest.raises(TaskError, match="not found") as info:
        task.load()
    assert "data.dir" in str(info.value)


def test_missing_model_is_a_clear_error(glue: Path, tmp_path: Path) -> None:
    cfg = validate_config(tiny_raw(glue, tmp_path, model={"name": str(tmp_path / "no-model")}))
    with pytest.raises(TaskError, match="no such directory"):
        build_task(cfg).build_model()
