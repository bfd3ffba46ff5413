"""Super-NaturalInstructions (SuperNI) tasks: loaders, Tk-Instruct prompts, encoding, partitions.

Data sources (:func:`load_superni`):

* **SAPT layout** (``/work/shared/data/superni/sapt_superni_15tasks``, see its README):
  ``<data_dir>/<task>/{train,dev,test}.json``, each a full SuperNI task JSON whose ``Instances``
  hold that split (``dev.json`` is byte-identical to ``test.json`` there, so only ``train`` and
  ``test`` are read).
* **Upstream layout** (``allenai/natural-instructions``): ``<data_dir>/tasks/<task>.json`` (or
  ``<data_dir>/<task>.json``) with a single ``Instances`` list, split deterministically into
  train/test by ``seed`` (``test_size`` instances, at most half of the task, go to test).
* **Hugging Face hub** (``data_dir=None``): the ``Muennighoff/natural-instructions`` data set
  (columns ``task_name, id, definition, inputs, targets``; needs the optional ``datasets``
  package and network or a warm cache). It has no positive examples and no categories, so
  its tasks get ``positive_examples=()`` and ``categories=("unknown",)``; instances are split
  like the upstream layout.

Schema quirks are normalised: ``Definition`` list[str] → its first string, ``Categories`` /
``Domains`` str → one-element tuple, ``output`` str → one-element tuple (the first reference is
the training target; all references are kept for scoring).

Prompt (:func:`build_prompt`), the Tk-Instruct format of Wang et al. (2022) ("pos-2": definition
plus two positive examples), without Tk-Instruct's stray leading spaces::

    Definition: {definition}

    Positive Example 1 -
    Input: {example input}
    Output: {example output}

    Positive Example 2 -
    ...
    Now complete the following example -
    Input: {instance input}
    Output: {target}

Each of ``{definition}``, ``{example input}``, ``{example output}`` and ``{instance input}`` is
stripped and gets a final ``"."`` when it does not end with punctuation (as in Tk-Instruct);
the prompt ends with ``"Output: "`` (one space) and the target follows it. A causal LM is
trained on prompt + target + eos with the loss on the target and eos only
(:func:`encode_example`).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glora.data.glue import DataNotFoundError, subsample
from glora.data.partition import partition

__all__ = [
    "HUB_DATASET",
    "IGNORE_INDEX",
    "TASK_SCHEMES",
    "EncodedExample",
    "PositiveExample",
    "SuperNIInstance",
    "SuperNITask",
    "assign_tasks",
    "available_tasks",
    "build_prompt",
    "encode_example",
    "encode_prompt",
    "fit_prompt",
    "load_superni",
    "load_superni_task",
    "parse_task_json",
    "partition_by_task",
    "split_unseen_tasks",
]

HUB_DATASET = "Muennighoff/natural-instructions"
IGNORE_INDEX = -100
TaskScheme = Literal["by_task", "by_category", "dirichlet", "iid", "quantity"]
TASK_SCHEMES: tuple[str, ...] = ("by_task", "by_category", "dirichlet", "iid", "quantity")

_FIX_HINT = (
    "Fix: set data.dir to a SuperNI directory, either the SAPT layout <dir>/<task>/"
    "{train,test}.json (for example ../shared/data/superni/sapt_superni_15tasks, relative to the "
    "project root) or the upstream layout <dir>/tasks/<task>.json; or install the `datasets` "
    f"package (pip install datasets) and go online to load the tasks from the hub ({HUB_DATASET})."
)


# --------------------------------------------------------------------------------------------
# Data classes


@dataclass(frozen=True)
class PositiveExample:
    """One demonstration of a task (``Positive Examples`` entry)."""

    input: str
    output: str
    explanation: str = ""


@dataclass(frozen=True)
class SuperNIInstance:
    """One instance: ``outputs`` holds every reference; ``outputs[0]`` is the training target."""

    id: str
    input: str
    outputs: tuple[str, ...]

    @property
    def target(self) -> str:
        """The training target (the first reference)."""
        return self.outputs[0]


@dataclass(frozen=True)
class SuperNITask:
    """A SuperNI task with its instruction, demonstrations and train/test instances."""

    name: str
    definition: str
    positive_examples: tuple[PositiveExample, ...]
    categories: tuple[str, ...]
    domains: tuple[str, ...]
    train: tuple[SuperNIInstance, ...]
    test: tuple[SuperNIInstance, ...]

    @property
    def category(self) -> str:
        """The first category (``"unknown"`` when the task has none); used by ``by_category``."""
        return self.categories[0] if self.categories else "unknown"


@dataclass(frozen=True)
class _TaskFile:
    definition: str
    positive_examples: tuple[PositiveExample, ...]
    categories: tuple[str, ...]
    domains: tuple[str, ...]
    instances: tuple[SuperNIInstance, ...]


# --------------------------------------------------------------------------------------------
# Parsing


def _str_list(value: Any, where: str, field: str, *, required: bool) -> tuple[str, ...]:
    """A str or list[str] field as a tuple (the Categories/Domains/Definition quirk)."""
    if value is None:
        if required:
            raise ValueError(f"{where}: missing field {field!r}")
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(
        f"{where}: field {field!r} must be a string or a list of strings, got {value!r:.80}"
    )


def _outputs(value: Any, where: str) -> tuple[str, ...]:
    outs = _str_list(value, where, "output", required=True)
    if not outs:
        raise ValueError(f"{where}: field 'output' is an empty list")
    return outs


def parse_task_json(data: Any, source: str, task: str) -> _TaskFile:
    """Validate and normalise one parsed SuperNI task JSON; errors name ``source`` and the field.

    Args:
        data: the parsed JSON.
        source: the file name (or hub location) used in error messages.
        task: the task name, used to make ids for instances without one.

    Raises:
        ValueError: a missing or ill-typed field.
    """
    if not isinstance(data, dict):
        raise ValueError(
            f"{source}: expected a JSON object (a SuperNI task), got {type(data).__name__}"
        )
    definitions = _str_list(data.get("Definition"), source, "Definition", required=True)
    if not definitions or not definitions[0].strip():
        raise ValueError(f"{source}: field 'Definition' is empty")
    examples = []
    raw_examples = data.get("Positive Examples", [])
    if not isinstance(raw_examples, list):
        raise ValueError(f"{source}: field 'Positive Examples' must be a list")
    for i, ex in enumerate(raw_examples):
        where = f"{source}: field 'Positive Examples'[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise ValueError(f"{where}: expected an object with a string 'input'")
        explanation = ex.get("explanation", "")
        examples.append(
            PositiveExample(
                ex["input"],
                _outputs(ex.get("output"), where)[0],
                explanation if isinstance(explanation, str) else "",
            )
        )
    raw_instances = data.get("Instances")
    if not isinstance(raw_instances, list):
        raise ValueError(f"{source}: missing or non-list field 'Instances'")
    instances = []
    for i, inst in enumerate(raw_instances):
        where = f"{source}: field 'Instances'[{i}]"
        if not isinstance(inst, dict):
            raise ValueError(f"{where}: expected an object, got {type(inst).__name__}")
        if not isinstance(inst.get("input"), str):
            raise ValueError(f"{where}: missing or non-string field 'input'")
        inst_id = inst.get("id", f"{task}-{i}")
        if not isinstance(inst_id, str):
            raise ValueError(f"{where}: field 'id' must be a string, got {inst_id!r}")
        instances.append(
            SuperNIInstance(inst_id, inst["input"], _outputs(inst.get("output"), where))
        )
    return _TaskFile(
        definition=definitions[0],
        positive_examples=tuple(examples),
        categories=_str_list(data.get("Categories"), source, "Categories", required=False),
        domains=_str_list(data.get("Domains"), source, "Domains", required=False),
        instances=tuple(instances),
    )


def _read_task_file(path: Path, task: str) -> _TaskFile:
    if not path.is_file():
        raise DataNotFoundError(f"SuperNI task {task!r}: file not found: {path}. {_FIX_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    return parse_task_json(data, str(path), task)


def _split_instances(
    instances: Sequence[SuperNIInstance], task: str, test_size: int | float, seed: int
) -> tuple[tuple[SuperNIInstance, ...], tuple[SuperNIInstance, ...]]:
    """Deterministic train/test split of one task's instances (test at most half the task)."""
    n = len(instances)
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"a fractional test_size must be in (0, 1), got {test_size}")
        n_test = round(test_size * n)
    else:
        if test_size < 1:
            raise ValueError(f"test_size must be >= 1, got {test_size}")
        n_test = test_size
    n_test = max(1, min(n_test, n // 2)) if n >= 2 else 0
    order = list(range(n))
    random.Random(f"superni-split:{seed}:{task}").shuffle(order)
    test_idx = set(order[:n_test])
    train = tuple(inst for i, inst in enumerate(instances) if i not in test_idx)
    test = tuple(inst for i, inst in enumerate(instances) if i in test_idx)
    return train, test


def available_tasks(data_dir: str | Path) -> list[str]:
    """Sorted names of the tasks in ``data_dir`` (SAPT or upstream layout)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"SuperNI data directory not found: {root}. {_FIX_HINT}")
    names = {p.name for p in root.iterdir() if p.is_dir() and (p / "train.json").is_file()}
    for folder in (root / "tasks", root):
        if folder.is_dir():
            names |= {p.stem for p in folder.glob("task*.json")}
    return sorted(names)


def _load_local(task: str, root: Path, test_size: int | float, seed: int) -> SuperNITask:
    if not root.is_dir():
        raise DataNotFoundError(f"SuperNI data directory not found: {root}. {_FIX_HINT}")
    sapt = root / task
    if sapt.is_dir():
        train_file = _read_task_file(sapt / "train.json", task)
        test_path = sapt / "test.json"
        if not test_path.is_file():
            raise DataNotFoundError(
                f"SuperNI task {task!r}: file not found: {test_path} (the SAPT layout needs "
                f"<dir>/<task>/train.json and test.json). {_FIX_HINT}"
            )
        train, test = train_file.instances, _read_task_file(test_path, task).instances
        meta = train_file
    else:
        candidates = [root / "tasks" / f"{task}.json", root / f"{task}.json"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            tried = ", ".join(str(p) for p in [sapt / "train.json", *candidates])
            raise DataNotFoundError(f"SuperNI task {task!r} not found: tried {tried}. {_FIX_HINT}")
        meta = _read_task_file(path, task)
        train, test = _split_instances(meta.instances, task, test_size, seed)
    return SuperNITask(
        task, meta.definition, meta.positive_examples, meta.categories, meta.domains, train, test
    )


def _load_hub(tasks: Sequence[str], test_size: int | float, seed: int) -> dict[str, SuperNITask]:
    where = f"Hugging Face hub data set {HUB_DATASET}"
    try:
        import datasets  # optional dependency, imported lazily
    except ImportError as exc:
        raise DataNotFoundError(
            f"SuperNI: no data.dir given and the `datasets` package is not installed, so the "
            f"{where} cannot be loaded (pip install datasets). {_FIX_HINT}"
        ) from exc
    wanted = set(tasks)
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    try:
        splits: Any = datasets.load_dataset(HUB_DATASET)
        for split in splits.values():
            for row in split.filter(lambda r: r["task_name"] in wanted):
                rows[row["task_name"]].append(row)
    except Exception as exc:  # network / cache errors come in many types
        raise DataNotFoundError(f"SuperNI: could not load the {where}: {exc}. {_FIX_HINT}") from exc
    out = {}
    for task in tasks:
        if not rows[task]:
            raise DataNotFoundError(f"SuperNI task {task!r} is not in the {where}. {_FIX_HINT}")
        data = {
            "Definition": rows[task][0]["definition"],
            "Categories": ["unknown"],
            "Instances": [
                {"id": r["id"], "input": r["inputs"], "output": r["targets"]} for r in rows[task]
            ],
        }
        meta = parse_task_json(data, f"{where} (task {task})", task)
        train, test = _split_instances(meta.instances, task, test_size, seed)
        out[task] = SuperNITask(task, meta.definition, (), meta.categories, (), train, test)
    return out


def load_superni(
    tasks: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    test_size: int | float = 100,
    seed: int = 0,
) -> dict[str, SuperNITask]:
    """Load SuperNI tasks.

    Args:
        tasks: task names (``"task363_sst2_polarity_classification"``); None = every task in
            ``data_dir`` (a directory is then required).
        data_dir: a SAPT-layout or upstream-layout directory; None loads from the hub.
        max_train: keep at most this many training instances per task (deterministic
            order-preserving subsample with ``seed``).
        max_test: likewise for the test instances.
        test_size: upstream layout / hub only: test instances per task (an int, capped at half
            the task) or a fraction in (0, 1); the split is a function of ``seed`` and the name.
        seed: seed of the split and of the subsamples.

    Returns:
        ``{name: SuperNITask}`` in the order of ``tasks``.

    Raises:
        ValueError: a malformed file (the message names the file and the field), duplicate or
            empty task names.
        DataNotFoundError: a missing directory/file, or the hub data cannot be loaded.
    """
    if tasks is None:
        if data_dir is None:
            raise ValueError("give the task names, or a data_dir to load all of its tasks")
        tasks = available_tasks(data_dir)
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no SuperNI tasks requested")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {tasks}")
    if data_dir is None:
        loaded = _load_hub(tasks, test_size, seed)
    else:
        root = Path(data_dir).expanduser()
        loaded = {t: _load_local(t, root, test_size, seed) for t in tasks}
    out = {}
    for name, task in loaded.items():
        train = subsample(task.train, max_train, seed)
        test = subsample(task.test, max_test, seed)
        out[name] = SuperNITask(
            name,
            task.definition,
            task.positive_examples,
            task.categories,
            task.domains,
            tuple(train),
            tuple(test),
        )
    return out


def load_superni_task(task: str, data_dir: str | Path | None = None, **kwargs: Any) -> SuperNITask:
    """Load one task; see :func:`load_superni` for the arguments."""
    return load_superni([task], data_dir, **kwargs)[task]


# --------------------------------------------------------------------------------------------
# Prompts


def _punct(text: str) -> str:
    text = text.strip()
    if not text or text[-1] not in string.punctuation:
        text += "."
    return text


def _render(definition: str, examples: Sequence[PositiveExample], text: str) -> str:
    parts = []
    if definition.strip():
        parts.append(f"Definition: {_punct(definition)}\n\n")
    for i, ex in enumerate(examples, start=1):
        parts.append(
            f"Positive Example {i} -\nInput: {_punct(ex.input)}\nOutput: {_punct(ex.output)}\n\n"
        )
    parts.append(f"Now complete the following example -\nInput: {_punct(text)}\nOutput: ")
    return "".join(parts)


def build_prompt(task: SuperNITask, text: str, num_pos_examples: int = 2) -> str:
    """The untruncated SuperNI prompt for input ``text`` (see the module docstring)."""
    if num_pos_examples < 0:
        raise ValueError(f"num_pos_examples must be >= 0, got {num_pos_examples}")
    return _render(task.definition, task.positive_examples[:num_pos_examples], text)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _prefix(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest ``k`` in [lo, hi] with ``ok(k)`` (``ok`` assumed monotone decreasing), or None."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_prompt(
    tokenizer: Any,
    task: SuperNITask,
    text: str,
    budget: int,
    num_pos_examples: int = 2,
) -> tuple[str, list[int]]:
    """The prompt for ``text`` truncated to ``budget`` tokens (bos included), and its token ids.

    Truncation keeps the instance input: it first drops positive examples (from the last),
    then truncates the definition (keeping its head, at a word boundary when possible, and
    dropping it when nothing fits), and only as a last resort cuts the **head** of the input
    (keeping its tail, where questions and the ``Output:`` cue are).

    Raises:
        ValueError: ``budget`` cannot even hold the template with an empty input.
    """
    prefix = _prefix(tokenizer)

    def size(prompt: str) -> int:
        return len(prefix) + len(_token_ids(tokenizer, prompt))

    def fits(prompt: str) -> bool:
        return size(prompt) <= budget

    definition = task.definition.strip()
    examples = task.positive_examples[: max(0, num_pos_examples)]
    for k in range(len(examples), -1, -1):
        prompt = _render(definition, examples[:k], text)
        if fits(prompt):
            return prompt, prefix + _token_ids(tokenizer, prompt)
    # No examples; truncate the definition (keep its head).
    n = _largest(lambda m: fits(_render(definition[:m], (), text)), 0, len(definition) - 1)
    if n is not None:
        if n > 0 and " " in definition[:n].strip():
            snapped = definition[:n].rstrip().rsplit(" ", 1)[0]
            if fits(_render(snapped, (), text)):
                n = len(snapped)
        prompt = _render(definition[:n], (), text)
        return prompt, prefix + _token_ids(tokenizer, prompt)
    # No definition; cut the head of the input (keep its tail).
    body = text.strip()
    tail = _largest(lambda m: fits(_render("", (), body[len(body) - m :])), 0, len(body))
    if tail is None:
        raise ValueError(
            f"SuperNI task {task.name!r}: a prompt budget of {budget} tokens cannot hold the "
            f"prompt template (it needs {size(_render('', (), ''))} tokens); raise max_length "
            "or lower max_target_length"
        )
    kept = body[len(body) - tail :]
    if 0 < tail < len(body) and " " in kept.strip():
        snapped = kept.lstrip().split(" ", 1)[1]
        if snapped.strip():
            kept = snapped
    prompt = _render("", (), kept)
    return prompt, prefix + _token_ids(tokenizer, prompt)


@dataclass(frozen=True)
class EncodedExample:
    """A tokenised training example: ``labels`` is ``IGNORE_INDEX`` on the prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def _check_lengths(max_length: int, max_target_length: int) -> None:
    if max_target_length < 2:
        raise ValueError(f"max_target_length must be >= 2 (a token + eos), got {max_target_length}")
    if max_length <= max_target_length:
        raise ValueError(
            f"max_length ({max_length}) must exceed max_target_length ({max_target_length})"
        )


def encode_prompt(
    tokenizer: Any,
    task: SuperNITask,
    text: str,
    *,
    num_pos_examples: int = 2,
    max_length: int = 512,
    max_target_length: int = 64,
) -> list[int]:
    """Token ids of the prompt for ``text`` (generation input), at most ``max_length −
    max_target_length`` tokens, exactly the prompt part of :func:`encode_example`."""
    _check_lengths(max_length, max_target_length)
    return fit_prompt(tokenizer, task, text, max_length - max_target_length, num_pos_examples)[1]


def encode_example(
    tokenizer: Any,
    task: SuperNITask,
    instance: SuperNIInstance,
    *,
    num_pos_examples: int = 2,
    max_length: int = 512,
    max_target_length: int = 64,
) -> EncodedExample:
    """Tokenise prompt + target + eos for causal-LM training, with the loss on the target only.

    The prompt is fitted into ``max_length − max_target_length`` tokens (:func:`fit_prompt`),
    the target (``instance.target``) is cut to ``max_target_length − 1`` tokens and ``eos`` is
    appended; ``labels`` is ``IGNORE_INDEX`` (−100) on the prompt (and bos) tokens.
    """
    _check_lengths(max_length, max_target_length)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token")
    prompt_ids = encode_prompt(
        tokenizer,
        task,
        instance.input,
        num_pos_examples=num_pos_examples,
        max_length=max_length,
        max_target_length=max_target_length,
    )
    target_ids = _token_ids(tokenizer, instance.target.strip())[: max_target_length - 1]
    target_ids.append(int(eos))
    return EncodedExample(
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids,
        prompt_length=len(prompt_ids),
    )


# --------------------------------------------------------------------------------------------
# Federation by task


def split_unseen_tasks(
    tasks: Sequence[str],
    unseen_tasks: Sequence[str] | None = None,
    num_unseen_tasks: int = 0,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Split ``tasks`` into (seen, unseen); both keep the order of ``tasks``.

    Args:
        tasks: all task names.
        unseen_tasks: explicit held-out tasks (must be in ``tasks``); exclusive with
            ``num_unseen_tasks``.
        num_unseen_tasks: hold out this many tasks drawn with ``random.Random(seed)``.
        seed: seed of that draw.

    Raises:
        ValueError: unknown names, both options given, or no seen task left.
    """
    tasks = list(tasks)
    if unseen_tasks and num_unseen_tasks:
        raise ValueError("give unseen_tasks or num_unseen_tasks, not both")
    if num_unseen_tasks < 0:
        raise ValueError(f"num_unseen_tasks must be >= 0, got {num_unseen_tasks}")
    if unseen_tasks:
        unknown = [t for t in unseen_tasks if t not in tasks]
        if unknown:
            raise ValueError(f"unseen tasks {unknown} are not among the tasks {tasks}")
        held = set(unseen_tasks)
    else:
        if num_unseen_tasks >= len(tasks):
            raise ValueError(
                f"num_unseen_tasks={num_unseen_tasks} leaves no training task out of {len(tasks)}"
            )
        held = set(random.Random(seed).sample(tasks, num_unseen_tasks))
    seen = [t for t in tasks if t not in held]
    if not seen:
        raise ValueError("every task is held out as unseen; no task is left to train on")
    return seen, [t for t in tasks if t in held]


def assign_tasks(
    tasks: Sequence[str],
    num_clients: int,
    scheme: Literal["by_task", "by_category"],
    categories: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Assign whole tasks to clients.

    ``"by_task"``: task ``i`` goes to client ``i mod num_clients`` (one task per client when
    the counts are equal). ``"by_category"``: the tasks are grouped by ``categories[task]``
    (groups in first-appearance order) and group ``g`` goes to client ``g mod num_clients``.

    Raises:
        ValueError: more clients than tasks (or categories), or a task without a category.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if scheme == "by_task":
        groups = [[t] for t in tasks]
        unit = "training tasks"
    elif scheme == "by_category":
        if categories is None:
            raise ValueError("by_category needs the category of every task")
        missing = [t for t in tasks if t not in categories]
        if missing:
            raise ValueError(f"no category for tasks {missing}")
        by_cat: dict[str, list[str]] = {}
        for t in tasks:
            by_cat.setdefault(categories[t], []).append(t)
        groups = list(by_cat.values())
        unit = f"task categories ({', '.join(by_cat)})"
    else:
        raise ValueError(f"assign_tasks handles by_task and by_category, not {scheme!r}")
    if num_clients > len(groups):
        raise ValueError(
            f"{scheme}: {num_clients} clients but only {len(groups)} {unit}; use fewer clients "
            "or the 'dirichlet' scheme over tasks"
        )
    clients: list[list[str]] = [[] for _ in range(num_clients)]
    for g, group in enumerate(groups):
        clients[g % num_clients].extend(group)
    return clients


def partition_by_task(
    instance_tasks: Sequence[str],
    num_clients: int,
    scheme: TaskScheme,
    *,
    categories: Mapping[str, str] | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Partition pooled training instances among clients by their task.

    Args:
        instance_tasks: the task name of every pooled training instance.
        num_clients: number of clients.
        scheme: ``"by_task"`` / ``"by_category"`` (whole tasks per client, see
            :func:`assign_tasks`, tasks in first-appearance order), ``"dirichlet"`` (each
            task's instances split with proportions ~ Dir(alpha·1): the existing
            :func:`~glora.data.partition.partition` with the task names as keys), ``"iid"`` or
            ``"quantity"`` (task-agnostic).
        categories: task → category, for ``by_category``.
        alpha, seed, min_size: as in :func:`~glora.data.partition.partition`.

    Returns:
        One sorted index list per client; disjoint, covering all instances.
    """
    if scheme in ("by_task", "by_category"):
        order = list(dict.fromkeys(instance_tasks))
        owners = assign_tasks(order, num_clients, scheme, categories)  # type: ignore[arg-type]
        client_of = {t: c for c, owned in enumerate(owners) for t in owned}
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for i, t in enumerate(instance_tasks):
            clients[client_of[t]].append(i)
        return clients
    if scheme not in TASK_SCHEMES:
        raise ValueError(
            f"unknown SuperNI partition scheme {scheme!r}; valid schemes: {', '.join(TASK_SCHEMES)}"
        )
    keys: Sequence[Hashable] = list(instance_tasks)
    return partition(keys, num_clients, scheme, alpha=alpha, seed=seed, min_size=min_size)  # type: ignore[arg-type]
