"""GLUE loaders (local ``glue_data/`` layout or the Hugging Face hub) and GLUE metrics.

The local layout is the one of ``/work/shared/data/glue`` (see its README): original GLUE TSVs
parsed with ``csv.QUOTE_NONE``, plus real-row subsets of QNLI/MNLI/QQP train (PowerfulPromptFT)
and of MNLI/QQP validation (O-LoRA "Long Sequence"). When a full GLUE copy is present
(``train.tsv``/``dev.tsv``, ``dev_matched.tsv`` for MNLI) it is preferred over the subsets.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "GLUE_TASKS",
    "TOP_PREDICTION_SHARE",
    "DataNotFoundError",
    "GlueTaskSpec",
    "TextExample",
    "get_task_spec",
    "glue_metrics",
    "load_glue",
    "primary_metric",
    "subsample",
    "top_prediction_share",
]

#: evaluation key of :func:`top_prediction_share` (classification tasks)
TOP_PREDICTION_SHARE = "top_prediction_share"

Split = Literal["train", "dev"]

_FIX_HINT = (
    "Fix: set data.dir to a GLUE directory (for example ../shared/data/glue, relative to the "
    "project root), or install the `datasets` package (pip install datasets) and go online to "
    "load the task from the Hugging Face hub."
)


class DataNotFoundError(FileNotFoundError):
    """A GLUE file, directory or hub data set could not be found or loaded."""


@dataclass(frozen=True)
class TextExample:
    """One (single-sentence or sentence-pair) example; ``label`` is an int class or a float."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GlueTaskSpec:
    """Static description of one GLUE task.

    Attributes:
        name: canonical lower-case name (``"sst2"``).
        num_labels: number of classes, 1 for the STS-B regression task.
        is_regression: True for STS-B.
        label_names: class names in label-index order (empty for regression).
        metrics: names of the keys :func:`glue_metrics` returns for the task.
        primary: the metric usually reported for the task.
        dir_name: sub-directory of a ``glue_data/`` tree (``"SST-2"``).
        hub_name: configuration name of the hub ``glue`` data set.
    """

    name: str
    num_labels: int
    is_regression: bool
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    primary: str
    dir_name: str
    hub_name: str


GLUE_TASKS: dict[str, GlueTaskSpec] = {
    s.name: s
    for s in (
        GlueTaskSpec(
            "cola", 2, False, ("unacceptable", "acceptable"), ("mcc", "accuracy"), "mcc",
            "CoLA", "cola",
        ),
        GlueTaskSpec(
            "sst2", 2, False, ("negative", "positive"), ("accuracy",), "accuracy", "SST-2", "sst2"
        ),
        GlueTaskSpec(
            "mrpc", 2, False, ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1",
            "MRPC", "mrpc",
        ),
        GlueTaskSpec(
            "stsb", 1, True, (), ("pearson", "spearman"), "pearson", "STS-B", "stsb"
        ),
        GlueTaskSpec(
            "qqp", 2, False, ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1", "QQP", "qqp"
        ),
        GlueTaskSpec(
            "mnli", 3, False, ("entailment", "neutral", "contradiction"), ("accuracy",),
            "accuracy", "MNLI", "mnli",
        ),
        GlueTaskSpec(
            "qnli", 2, False, ("entailment", "not_entailment"), ("accuracy",), "accuracy",
            "QNLI", "qnli",
        ),
        GlueTaskSpec(
            "rte", 2, False, ("entailment", "not_entailment"), ("accuracy",), "accuracy",
            "RTE", "rte",
        ),
        GlueTaskSpec(
            "wnli", 2, False, ("not_entailment", "entailment"), ("accuracy",), "accuracy",
            "WNLI", "wnli",
        ),
    )
}  # fmt: skip


def get_task_spec(task: str) -> GlueTaskSpec:
    """Return the spec of ``task``; accepts aliases such as ``"SST-2"``, ``"sts_b"``, ``"MNLI"``."""
    key = task.strip().lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# --------------------------------------------------------------------------------------------
# Label parsing


def _label_parser(spec: GlueTaskSpec) -> Callable[[str], int | float | None]:
    """Return a function mapping a raw label string to the label (None = no gold label)."""
    if spec.is_regression:
        return float

    aliases = {"yes": 1, "no": 0} if spec.name == "qqp" else {}

    def parse(raw: str) -> int | None:
        value = raw.strip()
        if value == "-":  # MNLI rows without a gold label
            return None
        if value in spec.label_names:
            return spec.label_names.index(value)
        if value in aliases:
            return aliases[value]
        number = int(value)  # ValueError on anything else
        if not 0 <= number < spec.num_labels:
            raise ValueError(f"label {number} out of range for {spec.name}")
        return number

    return parse


# --------------------------------------------------------------------------------------------
# Local files


@dataclass(frozen=True)
class _TsvFormat:
    """Columns of one TSV: names (header) or positions (no header); label ``-1`` = last."""

    text_a: str | int
    text_b: str | int | None
    label: str | int
    header: bool = True
    encoding: str = "utf-8"


_TSV_FORMATS: dict[str, _TsvFormat] = {
    "cola": _TsvFormat(3, None, 1, header=False),
    "sst2": _TsvFormat("sentence", None, "label"),
    "mrpc": _TsvFormat("#1 String", "#2 String", "Quality", encoding="utf-8-sig"),
    "stsb": _TsvFormat("sentence1", "sentence2", -1),
    "qqp": _TsvFormat("question1", "question2", "is_duplicate"),
    "mnli": _TsvFormat("sentence1", "sentence2", -1),  # gold_label is the last column
    "qnli": _TsvFormat("question", "sentence", "label"),
    "rte": _TsvFormat("sentence1", "sentence2", "label"),
    "wnli": _TsvFormat("sentence1", "sentence2", "label"),
}


def _require(path: Path, task: str) -> Path:
    if not path.exists():
        kind = "directory" if not path.suffix else "file"
        raise DataNotFoundError(
            f"GLUE task {task!r}: {kind} not found: {path}. The local GLUE layout is "
            f"<data_dir>/<TASK>/{{train,dev}}.tsv (see the GLUE README). {_FIX_HINT}"
        )
    return path


def _read_tsv(path: Path, spec: GlueTaskSpec) -> list[TextExample]:
    fmt = _TSV_FORMATS[spec.name]
    parse = _label_parser(spec)
    out: list[TextExample] = []
    with open(_require(path, spec.name), encoding=fmt.encoding, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        width: int | None = None
        cols: list[int] = []
        for line_no, row in enumerate(reader, start=1):
            if fmt.header and line_no == 1:
                width = len(row)
                try:
                    cols = [
                        c if isinstance(c, int) else row.index(c)
                        for c in (
                            fmt.text_a,
                            fmt.text_b if fmt.text_b is not None else 0,
                            fmt.label,
                        )
                    ]
                except ValueError as exc:
                    raise ValueError(f"{path}:1: unexpected header {row!r} ({exc})") from exc
                continue
            if not row:
                continue
            if not fmt.header and width is None:
                width = len(row)
                cols = [fmt.text_a, fmt.text_b or 0, fmt.label]  # type: ignore[list-item]
            if len(row) != width:
                raise ValueError(
                    f"{path}:{line_no}: expected {width} tab-separated fields, got {len(row)}"
                )
            try:
                label = parse(row[cols[2]])
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: bad label {row[cols[2]]!r} ({exc})") from exc
            if label is None:
                continue
            text_b = row[cols[1]] if fmt.text_b is not None else None
            out.append(TextExample(row[cols[0]], text_b, label))
    return out


def _read_ppft_json(path: Path, spec: GlueTaskSpec) -> list[TextExample]:
    """Read a PowerfulPromptFT subset: ``{"0": {"text_a", "text_b", "label"}, ...}``."""
    with open(_require(path, spec.name), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of rows, got {type(data).__name__}")
    parse = _label_parser(spec)
    out = []
    for key, row in data.items():
        try:
            label = parse(str(row["label"]))
            example = TextExample(str(row["text_a"]), str(row["text_b"]), label)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed row {key!r}: {exc}") from exc
        if label is not None:
            out.append(example)
    return out


_OLORA_PREFIXES = {
    "mnli": ("sentence 1: ", "\nsentence 2: "),
    "qqp": ("first sentence: ", "\nsecond sentence: "),
}


def _read_olora_json(path: Path, spec: GlueTaskSpec) -> list[TextExample]:
    """Read an O-LoRA (SuperNI-like) file; rows labelled ``"-"`` (no gold label) are dropped."""
    with open(_require(path, spec.name), encoding="utf-8") as f:
        data = json.load(f)
    first, second = _OLORA_PREFIXES[spec.name]
    parse = _label_parser(spec)
    out = []
    instances = data.get("Instances") if isinstance(data, dict) else None
    if not isinstance(instances, list):
        raise ValueError(f"{path}: no 'Instances' list")
    for i, inst in enumerate(instances):
        try:
            text = inst["input"]
            if not text.startswith(first) or text.count(second) != 1:
                raise ValueError(f"input does not look like {first!r}...{second!r}...")
            text_a, text_b = text[len(first) :].split(second)
            label = parse(inst["output"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed instance {i}: {exc}") from exc
        if label is not None:
            out.append(TextExample(text_a, text_b, label))
    return out


def _dedup(examples: Iterable[TextExample]) -> list[TextExample]:
    """Drop exact repeats (the subsets of one split share a few rows), keeping the first."""
    seen: set[TextExample] = set()
    out = []
    for ex in examples:
        if ex not in seen:
            seen.add(ex)
            out.append(ex)
    return out


def _load_local(spec: GlueTaskSpec, split: Split, data_dir: Path) -> list[TextExample]:
    if not data_dir.is_dir():
        raise DataNotFoundError(
            f"GLUE task {spec.name!r}: data directory not found: {data_dir}. {_FIX_HINT}"
        )
    task_dir = _require(data_dir / spec.dir_name, spec.name)
    standard = task_dir / (
        "dev_matched.tsv" if split == "dev" and spec.name == "mnli" else f"{split}.tsv"
    )
    if spec.name not in ("mnli", "qqp", "qnli") or standard.exists():
        return _read_tsv(standard, spec)
    # Subset layout (see the README of /work/shared/data/glue).
    ppft, olora = task_dir / "subset_powerfulpromptft", task_dir / "subset_olora_long_sequence"
    if split == "train":
        if not (ppft / "train.json").exists():
            raise DataNotFoundError(
                f"GLUE task {spec.name!r}: no training data: tried {standard} and "
                f"{ppft / 'train.json'}. {_FIX_HINT}"
            )
        rows = _read_ppft_json(ppft / "train.json", spec) + _read_ppft_json(ppft / "dev.json", spec)
        if spec.name in _OLORA_PREFIXES and (olora / "train.json").exists():
            rows += _read_olora_json(olora / "train.json", spec)
        return _dedup(rows)
    if spec.name == "qnli":  # QNLI dev.tsv is the original file; `standard` is missing here
        return _read_tsv(standard, spec)
    if not (olora / "dev.json").exists():
        raise DataNotFoundError(
            f"GLUE task {spec.name!r}: no dev data: tried {standard} and {olora / 'dev.json'}. "
            f"{_FIX_HINT}"
        )
    return _read_olora_json(olora / "dev.json", spec)


# --------------------------------------------------------------------------------------------
# Hub

_HUB_FIELDS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def _load_hub(spec: GlueTaskSpec, split: Split) -> list[TextExample]:
    hub_split = "train" if split == "train" else "validation"
    if split == "dev" and spec.name == "mnli":
        hub_split = "validation_matched"
    where = f"Hugging Face hub data set glue/{spec.hub_name}, split {hub_split!r}"
    try:
        import datasets  # optional dependency, imported lazily
    except ImportError as exc:
        raise DataNotFoundError(
            f"GLUE task {spec.name!r}: no data_dir given and the `datasets` package is not "
            f"installed, so the {where} cannot be loaded (pip install datasets). {_FIX_HINT}"
        ) from exc
    try:
        ds: Any = datasets.load_dataset("glue", spec.hub_name, split=hub_split)
    except Exception as exc:  # network / cache errors come in many types
        raise DataNotFoundError(
            f"GLUE task {spec.name!r}: could not load the {where}: {exc}. {_FIX_HINT}"
        ) from exc
    a_key, b_key = _HUB_FIELDS[spec.name]
    out = []
    for row in ds:
        label = row["label"]
        if not spec.is_regression and label < 0:  # unlabelled
            continue
        label = float(label) if spec.is_regression else int(label)
        out.append(TextExample(row[a_key], row[b_key] if b_key else None, label))
    return out


# --------------------------------------------------------------------------------------------
# Public loader


def subsample(examples: Sequence[Any], max_examples: int | None, seed: int = 0) -> list[Any]:
    """Deterministic subsample of at most ``max_examples`` items, original order preserved."""
    if max_examples is None or max_examples >= len(examples):
        return list(examples)
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
    return [examples[i] for i in keep]


def load_glue(
    task: str,
    split: Split,
    data_dir: str | Path | None = None,
    *,
    max_examples: int | None = None,
    seed: int = 0,
) -> list[TextExample]:
    """Load one split of a GLUE task.

    Args:
        task: task name or alias (``"sst2"``, ``"SST-2"``, ``"STS-B"``...).
        split: ``"train"`` or ``"dev"`` (GLUE test sets have no labels).
        data_dir: a ``glue_data/``-style directory (e.g. ``../shared/data/glue``); None loads
            from the Hugging Face hub (needs ``datasets`` and network or a warm cache).
        max_examples: keep at most this many examples, sampled with ``random.Random(seed)``
            after loading, in their original order.
        seed: seed of that subsample.

    Returns:
        The examples; ``label`` is an int index into ``label_names`` or a float (STS-B).

    Raises:
        ValueError: unknown task/split or a malformed row (the message names file and line).
        DataNotFoundError: a missing file/directory, or the hub data cannot be loaded.
    """
    spec = get_task_spec(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if data_dir is None:
        examples = _load_hub(spec, split)
    else:
        examples = _load_local(spec, split, Path(data_dir).expanduser())
    return subsample(examples, max_examples, seed)


# --------------------------------------------------------------------------------------------
# Metrics


def primary_metric(task: str) -> str:
    """The headline metric of ``task``: accuracy, f1 (mrpc/qqp), mcc (cola) or pearson (stsb)."""
    return get_task_spec(task).primary


def top_prediction_share(predictions: Sequence[int] | Any) -> float:
    """The share of ``predictions`` (class indices, shape ``(n,)``, ``n > 0``) that fall in the
    most-predicted class: 1.0 when the model gives every example one class, whatever its
    accuracy says (a model that ignores its input scores the class's share of the labels)."""
    import numpy as np

    preds = np.asarray(predictions).astype(int).ravel()
    if preds.size == 0:
        raise ValueError("cannot compute a prediction share of zero predictions")
    return float(np.bincount(preds - preds.min()).max() / preds.size)


def glue_metrics(
    task: str, predictions: Sequence[float] | Any, labels: Sequence[float] | Any
) -> dict[str, float]:
    """GLUE metrics of ``predictions`` (class indices, or scores for STS-B) against ``labels``.

    Returns ``accuracy`` (classification tasks), ``f1`` of class 1 (mrpc, qqp), ``mcc`` (cola),
    ``pearson`` and ``spearman`` (stsb; NaN when predictions or labels are constant).
    """
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task_spec(task)
    preds, golds = np.asarray(predictions), np.asarray(labels)
    if preds.shape != golds.shape or preds.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D of equal length, got {preds.shape} and "
            f"{golds.shape}"
        )
    if preds.size == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if spec.is_regression:
        x, y = preds.astype(float), golds.astype(float)
        with warnings.catch_warnings():  # constant input: NaN, documented above
            warnings.simplefilter("ignore")
            return {"pearson": float(pearsonr(x, y)[0]), "spearman": float(spearmanr(x, y)[0])}
    preds, golds = preds.astype(int), golds.astype(int)
    out = {"accuracy": float(accuracy_score(golds, preds))}
    if "f1" in spec.metrics:
        out["f1"] = float(f1_score(golds, preds, pos_label=1, average="binary", zero_division=0))
    if "mcc" in spec.metrics:
        out["mcc"] = float(matthews_corrcoef(golds, preds))
    return {k: out[k] for k in spec.metrics}
