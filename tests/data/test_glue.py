"""GLUE loaders on the real offline copy in /work/shared/data/glue."""

from __future__ import annotations

import builtins
import json
from collections import Counter
from pathlib import Path

import pytest

from glora.data import GLUE_TASKS, DataNotFoundError, TextExample, get_task_spec, load_glue


def glue_dir() -> Path:
    """The shared GLUE copy next to the repository (``<repo>/../shared/data/glue``)."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"
    assert path.is_dir(), f"shared GLUE data missing: expected {path} (see its README)"
    return path


# task, split -> (rows, label counts by index or None for regression)
EXPECTED: dict[tuple[str, str], tuple[int, dict[int, int] | None]] = {
    ("cola", "train"): (8551, {1: 6023, 0: 2528}),
    ("cola", "dev"): (1043, {1: 721, 0: 322}),
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "dev"): (872, {1: 444, 0: 428}),
    ("mrpc", "train"): (3667, {1: 2473, 0: 1194}),
    ("mrpc", "dev"): (408, {1: 279, 0: 129}),
    ("stsb", "train"): (5749, None),
    ("stsb", "dev"): (1500, None),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("wnli", "train"): (635, None),
    ("wnli", "dev"): (71, {0: 40, 1: 31}),
    ("qnli", "train"): (9999, None),
    ("qnli", "dev"): (5463, {1: 2761, 0: 2702}),
    # 9,999 PowerfulPromptFT rows + 3,000 O-LoRA rows, minus exact repeats (72 of 74 shared
    # text pairs carry the same label; 2 pairs differ in label and are kept).
    ("mnli", "train"): (12927, None),
    ("mnli", "dev"): (7469, {0: 2681, 2: 2435, 1: 2353}),
    # 9,999 + 2,000 rows minus the 48 shared ones.
    ("qqp", "train"): (11951, None),
    ("qqp", "dev"): (7600, {0: 4871, 1: 2729}),
}


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED))
def test_row_counts_labels_and_texts(task: str, split: str) -> None:
    spec = get_task_spec(task)
    examples = load_glue(task, split, glue_dir())  # type: ignore[arg-type]
    rows, counts = EXPECTED[(task, split)]
    assert len(examples) == rows
    assert all(isinstance(e, TextExample) for e in examples)
    assert all(e.text_a.strip() for e in examples)
    if task in ("cola", "sst2"):
        assert all(e.text_b is None for e in examples)
    else:
        assert all(e.text_b is not None and e.text_b.strip() for e in examples)
    if spec.is_regression:
        assert all(type(e.label) is float and 0.0 <= e.label <= 5.0 for e in examples)
    else:
        assert all(type(e.label) is int for e in examples)
        assert set(Counter(e.label for e in examples)) == set(range(spec.num_labels))
    if counts is not None:
        assert dict(Counter(e.label for e in examples)) == counts


def test_subset_train_label_counts() -> None:
    qnli = Counter(e.label for e in load_glue("qnli", "train", glue_dir()))
    assert qnli == {0: 4523 + 504, 1: 4476 + 496}  # train.json + dev.json of the subset
    qnli_dev = {(e.text_a, e.text_b) for e in load_glue("qnli", "dev", glue_dir())}
    qnli_train = {(e.text_a, e.text_b) for e in load_glue("qnli", "train", glue_dir())}
    assert not qnli_dev & qnli_train


def test_specific_rows() -> None:
    g = glue_dir()
    stsb = load_glue("stsb", "dev", g)
    assert stsb[0] == TextExample(
        "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0
    )
    assert stsb[1].label == 4.75
    assert load_glue("cola", "dev", g)[0] == TextExample(
        "The sailors rode the breeze clear of the rocks.", None, 1
    )
    assert load_glue("wnli", "dev", g)[0] == TextExample(
        "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", 0
    )
    mrpc = load_glue("mrpc", "train", g)
    assert not mrpc[0].text_a.startswith("\ufeff")
    qqp = load_glue("qqp", "dev", g)
    assert qqp[0] == TextExample(
        "What are the best franchises in India?", "What are the best franchise in India?", 1
    )
    mnli = load_glue("mnli", "dev", g)
    assert mnli[0].text_a == "right that's that's supposedly"
    assert mnli[0].label == GLUE_TASKS["mnli"].label_names.index("neutral")


def test_aliases() -> None:
    for alias, name in [("SST-2", "sst2"), ("sst-2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola")]:
        assert get_task_spec(alias).name == name
    assert load_glue("SST-2", "dev", glue_dir()) == load_glue("sst2", "dev", glue_dir())
    with pytest.raises(ValueError, match=r"unknown GLUE task 'boolq'.*sst2"):
        get_task_spec("boolq")
    with pytest.raises(ValueError, match="split"):
        load_glue("sst2", "test", glue_dir())  # type: ignore[arg-type]


def test_specs() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    stsb = GLUE_TASKS["stsb"]
    assert stsb.num_labels == 1 and stsb.is_regression and stsb.label_names == ()
    assert GLUE_TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    for spec in GLUE_TASKS.values():
        if not spec.is_regression:
            assert len(spec.label_names) == spec.num_labels


def test_max_examples_deterministic() -> None:
    full = load_glue("rte", "dev", glue_dir())
    a = load_glue("rte", "dev", glue_dir(), max_examples=50, seed=3)
    b = load_glue("rte", "dev", glue_dir(), max_examples=50, seed=3)
    c = load_glue("rte", "dev", glue_dir(), max_examples=50, seed=4)
    assert a == b and len(a) == 50 and a != c
    positions = [full.index(e) for e in a]
    assert positions == sorted(positions)  # original order preserved
    assert load_glue("rte", "dev", glue_dir(), max_examples=10_000) == full
    with pytest.raises(ValueError, match="max_examples"):
        load_glue("rte", "dev", glue_dir(), max_examples=-1)


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataNotFoundError, match="'sst2'") as info:
        load_glue("sst2", "dev", missing)
    assert str(missing) in str(info.value) and "data.dir" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_task_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="'rte'") as info:
        load_glue("rte", "train", tmp_path)
    assert str(tmp_path / "RTE") in str(info.value)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_glue("rte", "dev", tmp_path)
    assert str(tmp_path / "RTE" / "dev.tsv") in str(info.value)
    (tmp_path / "MNLI").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_glue("mnli", "dev", tmp_path)
    assert "dev_matched.tsv" in str(info.value) and "subset_olora_long_sequence" in str(info.value)


def test_malformed_row(tmp_path: Path) -> None:
    (tmp_path / "RTE").mkdir()
    path = tmp_path / "RTE" / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:3"):
        load_glue("rte", "dev", tmp_path)
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:2.*maybe"):
        load_glue("rte", "dev", tmp_path)


def test_full_glue_copy_preferred(tmp_path: Path) -> None:
    mnli = tmp_path / "MNLI"
    (mnli / "subset_powerfulpromptft").mkdir(parents=True)
    rows = {"0": {"text_a": "subset", "text_b": "row", "label": "neutral"}}
    for name in ("train.json", "dev.json"):
        (mnli / "subset_powerfulpromptft" / name).write_text(json.dumps(rows))
    assert load_glue("mnli", "train", tmp_path) == [TextExample("subset", "row", 1)]
    header = "index\tpromptID\tsentence1\tsentence2\tlabel1\tgold_label\n"
    (mnli / "train.tsv").write_text(header + "0\t1\tp\th\tneutral\tcontradiction\n")
    (mnli / "dev_matched.tsv").write_text(
        header + "0\t1\tp\th\tneutral\tentailment\n1\t2\tq\tr\t-\t-\n"
    )
    assert load_glue("mnli", "train", tmp_path) == [TextExample("p", "h", 2)]
    assert load_glue("mnli", "dev", tmp_path) == [TextExample("p", "h", 0)]


def test_hub_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataNotFoundError, match="pip install datasets") as info:
        load_glue("cola", "dev")
    assert "'cola'" in str(info.value) and "glue/cola" in str(info.value)
