"""The task plug-in interface: everything the engine needs to know about a task.

A :class:`Task` builds the model and tokenizer, names the non-LoRA trainable modules (the head),
provides the training examples with their partition keys, collates a batch into the model's
keyword arguments (always with ``"labels"``) and evaluates a model on its evaluation split. The
simulator (:mod:`glora.sim`) and the CLI use nothing else, so a new task type (e.g. a causal-LM
generation task scored with ROUGE-L) plugs in with :func:`glora.tasks.register_task`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from glora.config import RunConfig

__all__ = ["Task", "TaskError"]


class TaskError(ValueError):
    """A task cannot be set up (missing model, data, unknown task...): a user-facing message."""


class Task(ABC):
    """One task of the simulator.

    Args:
        config: the whole run configuration (the task reads ``model`` and ``data``).
    """

    #: ``peft.TaskType`` value written into the exported adapter (``"SEQ_CLS"``, ``"CAUSAL_LM"``).
    peft_task_type: str = "SEQ_CLS"

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.tokenizer: Any = None

    @property
    @abstractmethod
    def name(self) -> str:
        """The task's name (e.g. ``"sst2"``)."""

    @abstractmethod
    def build_model(self) -> tuple[nn.Module, Any]:
        """A fresh base model and its tokenizer (deterministic: same weights on every call)."""

    @abstractmethod
    def head_module_names(self) -> list[str]:
        """Names (in the base model) of the non-LoRA trainable modules, e.g. ``["classifier"]``."""

    @abstractmethod
    def train_examples(self) -> Sequence[Any]:
        """The training examples (any objects that :meth:`collate` understands)."""

    @abstractmethod
    def partition_keys(self) -> list[Hashable]:
        """One key per training example for label-skew partitions (e.g. its label)."""

    def partition(
        self, num_clients: int, scheme: str, *, alpha: float = 0.5, seed: int = 0
    ) -> list[list[int]]:
        """Indices of the training examples per client.

        Default: :func:`glora.data.partition.partition` over :meth:`partition_keys` (``iid``,
        ``dirichlet`` label skew, ``quantity`` skew). Tasks with other schemes override it
        (SuperNI: ``by_task``, ``by_category``).
        """
        from glora.data.partition import partition

        return partition(self.partition_keys(), num_clients, scheme, alpha=alpha, seed=seed)  # type: ignore[arg-type]

    @abstractmethod
    def collate(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Model keyword arguments of a batch, including ``"labels"``."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, *, max_examples: int | None = None, batch_size: int = 64
    ) -> dict[str, float]:
        """Metrics of ``model`` on the evaluation split (at most ``max_examples`` examples)."""

    @abstractmethod
    def primary_metric(self) -> str:
        """The key of :meth:`evaluate`'s headline metric."""

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load data eagerly so that missing files fail before any training (optional)."""
