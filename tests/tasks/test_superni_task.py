"""The SuperNI generation task plug-in (tiny random causal LM, real SAPT task files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from glora.config import ConfigError, validate_config
from glora.data.superni import IGNORE_INDEX
from glora.tasks import TaskError, build_task
from glora.tasks.superni import (
    TINY_CAUSAL_LM,
    SuperNIExample,
    SuperNIGenerationTask,
    build_causal_lm,
    generate,
)

REPO = Path(__file__).resolve().parents[2]
SUPERNI_DIR = REPO.parent / "shared" / "data" / "superni" / "sapt_superni_15tasks"
TASKS = [
    "task363_sst2_polarity_classification",
    "task875_emotion_classification",
    "task1510_evalution_relation_extraction",
    "task591_sciq_answer_generation",
]


def make_config(tmp_path: Path, partition: str = "by_task", **options: Any) -> Any:
    opts: dict[str, Any] = {
        "tasks": TASKS,
        "unseen_tasks": ["task591_sciq_answer_generation"],
        "max_target_length": 16,
        "max_new_tokens": 4,
        **options,
    }
    return validate_config(
        {
            "name": "superni-test",
            "model": {
                "name": TINY_CAUSAL_LM,
                "target_modules": ["q_proj", "v_proj"],
                "max_length": 128,
            },
            "data": {
                "task": "superni",
                "dir": str(SUPERNI_DIR),
                "max_train_examples": 6,
                "max_eval_examples": 3,
                "options": opts,
            },
            "federation": {
                "clients": 2,
                "ranks": [2, 4],
                "participation": 1.0,
                "partition": partition,
            },
            "method": {"name": "glora"},
            "training": {"rounds": 2, "local_steps": 1, "batch_size": 2, "device": "cpu"},
            "output": {"dir": str(tmp_path / "runs")},
        }
    )


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return build_causal_lm(TINY_CAUSAL_LM, seed=0)


def test_build_task_loads_seen_and_unseen(tmp_path: Path) -> None:
    task = build_task(make_config(tmp_path))
    assert isinstance(task, SuperNIGenerationTask)
    assert task.peft_task_type == "CAUSAL_LM"
    assert task.head_module_names() == []
    task.load()
    assert task.unseen == ["task591_sciq_answer_generation"]
    assert task.seen == TASKS[:3]
    train = task.train_examples()
    assert len(train) == 3 * 6 and {ex.task for ex in train} == set(TASKS[:3])
    assert task.partition_keys() == [ex.task for ex in train]
    evals = task.eval_examples()
    assert [ex.task for ex in evals] == [t for t in TASKS for _ in range(3)]
    assert len(task.eval_examples(max_examples=4)) == 4  # ceil(4/4) = 1 per task


def test_num_unseen_tasks_and_bad_options(tmp_path: Path) -> None:
    task = build_task(make_config(tmp_path, unseen_tasks=None, num_unseen_tasks=2))
    task.load()
    assert len(task.unseen) == 2 and len(task.seen) == 2  # type: ignore[attr-defined]
    with pytest.raises(TaskError, match=r"data\.options\.bogus"):
        build_task(make_config(tmp_path, bogus=1))
    with pytest.raises(ConfigError, match=r"federation\.partition"):
        make_config(tmp_path, partition="by_label")
    with pytest.raises(TaskError, match="max_target_length"):
        build_task(make_config(tmp_path, max_target_length=200))
    with pytest.raises(TaskError, match="not among"):
        build_task(make_config(tmp_path, unseen_tasks=["task999_x"])).load()


def test_missing_data_and_malformed_file_are_task_errors(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    cfg.data.dir = str(tmp_path / "nowhere")
    with pytest.raises(TaskError, match="nowhere"):
        build_task(cfg).load()
    bad = tmp_path / "bad" / "task900_bad"
    bad.mkdir(parents=True)
    (bad / "train.json").write_text(json.dumps({"Definition": ["d"], "Instances": 3}))
    (bad / "test.json").write_text("{}")
    cfg = make_config(tmp_path, tasks=["task900_bad"], unseen_tasks=None)
    cfg.data.dir = str(tmp_path / "bad")
    with pytest.raises(TaskError, match=r"train\.json: missing or non-list field 'Instances'"):
        build_task(cfg).load()


def test_client_partition_schemes(tmp_path: Path) -> None:
    task = build_task(make_config(tmp_path, unseen_tasks=None))
    task.load()
    keys = task.partition_keys()
    owners = task.partition(4, "by_task", alpha=0.5, seed=0)
    assert [{keys[i] for i in c} for c in owners] == [{t} for t in TASKS]
    rr = task.partition(2, "by_task", alpha=0.5, seed=0)
    assert [{keys[i] for i in c} for c in rr] == [{TASKS[0], TASKS[2]}, {TASKS[1], TASKS[3]}]
    by_cat = build_task(make_config(tmp_path, unseen_tasks=None))
    by_cat.load()
    # Two categories: sentiment (sst2, emotion), then IE (evalution) and QA (sciq).
    clients = by_cat.partition(3, "by_category", alpha=0.5, seed=0)
    assert [{keys[i] for i in c} for c in clients] == [set(TASKS[:2]), {TASKS[2]}, {TASKS[3]}]
    with pytest.raises(TaskError, match="only 3 task categories"):
        by_cat.partition(4, "by_category", alpha=0.5, seed=0)
    parts = task.partition(3, "dirichlet", alpha=0.5, seed=1)
    assert sorted(i for c in parts for i in c) == list(range(len(keys)))


def test_collate_masks_prompt_and_padding(tmp_path: Path) -> None:
    task = build_task(make_config(tmp_path))
    _, tok = task.build_model()
    examples = task.train_examples()[:3]
    batch = task.collate(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 128
    for row in range(3):
        n = int(mask[row].sum())
        assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())  # right padding
        assert bool((labels[row, n:] == IGNORE_INDEX).all())
        supervised = labels[row] != IGNORE_INDEX
        first = int(supervised.nonzero()[0])
        assert not bool(supervised[:first].any()) and bool(supervised[first:n].all())
        assert int(labels[row, n - 1]) == tok.eos_token_id
        assert torch.equal(labels[row, first:n], ids[row, first:n])


def test_generate_left_padding_matches_unbatched(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    prompts = [tok("short prompt", add_special_tokens=False)["input_ids"]]
    prompts.append(
        tok("a much longer prompt with many more words in it", add_special_tokens=False)[
            "input_ids"
        ]
    )
    batched = generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    single = [generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == single
    assert model.training  # the train/eval mode is restored


def test_score_seen_unseen_and_per_task(tmp_path: Path) -> None:
    task = build_task(make_config(tmp_path))
    task.load()
    sst2, sciq = task.tasks[TASKS[0]], task.tasks[TASKS[3]]  # type: ignore[attr-defined]
    examples = [SuperNIExample(TASKS[0], sst2.test[0]), SuperNIExample(TASKS[3], sciq.test[0])]
    preds = [sst2.test[0].target, "zzz"]
    m = task.score(examples, preds)  # type: ignore[attr-defined]
    assert m["rougeL_seen"] == 1.0 and m["em_seen"] == 1.0
    assert m["rougeL_unseen"] == 0.0 and m["em_unseen"] == 0.0
    assert m["rougeL"] == 0.5 and m[f"rougeL/{TASKS[0]}"] == 1.0 and m[f"em/{TASKS[3]}"] == 0.0


def test_evaluate_with_the_tiny_lm(tmp_path: Path) -> None:
    task = build_task(make_config(tmp_path))
    model, _ = task.build_model()
    metrics = task.evaluate(model, max_examples=4, batch_size=4)
    for key in ("rougeL_seen", "rougeL_unseen", "em_seen", "em_unseen", "rougeL", "em"):
        assert 0.0 <= metrics[key] <= 1.0
    assert {f"rougeL/{t}" for t in TASKS} <= set(metrics)
    assert task.primary_metric() in metrics


def test_two_clients_two_rounds_through_the_engine(tmp_path: Path) -> None:
    from glora.sim.engine import Simulation
    from glora.sim.rundir import RunDir

    cfg = make_config(tmp_path, partition="by_task")
    task = build_task(cfg)
    run_dir = RunDir(cfg.run_dir)
    with run_dir:
        sim = Simulation(cfg, task, run_dir=run_dir)
        assert sim.client_indices == task.partition(2, "by_task")
        keys = task.partition_keys()
        assert [{keys[i] for i in c} for c in sim.client_indices] == [
            {TASKS[0], TASKS[2]},
            {TASKS[1]},
        ]
        sim.run()
    records = run_dir.read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        metrics = record["metrics"]
        assert 0.0 <= metrics["rougeL_seen"] <= 1.0
        assert 0.0 <= metrics["rougeL_unseen"] <= 1.0
        assert {"em_seen", "em_unseen", f"rougeL/{TASKS[3]}"} <= set(metrics)
        assert record["participants"] == ["0", "1"] and not record["dropped"]
    assert (run_dir.adapter_path / "adapter_config.json").is_file()
    adapter_cfg = json.loads((run_dir.adapter_path / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "CAUSAL_LM"
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj"}


def test_glora_run_cli_writes_seen_and_unseen_rouge(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from glora.cli import app

    cfg = make_config(tmp_path).to_yaml_dict()
    cfg["federation"]["partition"] = "dirichlet"  # over task names (the engine's partition)
    path = tmp_path / "superni.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "runs" / "superni-test" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2]
    assert all("rougeL_seen" in r["metrics"] and "rougeL_unseen" in r["metrics"] for r in records)
