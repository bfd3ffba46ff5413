"""GLUE sequence classification (and STS-B regression) as a :class:`~glora.tasks.base.Task`."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from glora.data.glue import (
    TOP_PREDICTION_SHARE,
    DataNotFoundError,
    TextExample,
    get_task_spec,
    glue_metrics,
    load_glue,
    top_prediction_share,
)
from glora.linalg import derive_seed
from glora.sim.model import TINY_BERT, ModelNotFoundError, resolve_model_source, seeded
from glora.tasks.base import Task, TaskError

if TYPE_CHECKING:
    from glora.config import RunConfig

__all__ = ["STSB_BUCKETS", "GlueTask"]

#: STS-B scores (0..5) are bucketed into this many integer keys for label-skew partitions.
STSB_BUCKETS = 5


class GlueTask(Task):
    """One GLUE task: a BERT-style ``AutoModelForSequenceClassification`` with its classifier as
    the head (``num_labels=1`` and MSE for STS-B), evaluated on dev with ``glue_metrics``.

    The training split is ``data.max_train_examples`` examples, the evaluation split
    ``data.max_eval_examples`` dev examples (both subsampled with the run seed).
    """

    peft_task_type = "SEQ_CLS"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        try:
            self.spec = get_task_spec(config.data.task)
        except ValueError as exc:
            raise TaskError(f"data.task: {exc}") from None
        self._train: list[TextExample] | None = None
        self._eval: list[TextExample] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------------ data
    def _data_dir(self) -> Path | None:
        d = self.config.data.dir
        if d is None:
            return None
        p = Path(d).expanduser()
        return p if p.is_absolute() else (Path.cwd() / p)

    def _load(self, split: str, max_examples: int | None) -> list[TextExample]:
        try:
            out = load_glue(
                self.spec.name,
                split,  # type: ignore[arg-type]
                self._data_dir(),
                max_examples=max_examples,
                seed=derive_seed(self.config.seed, "data", split) % (2**32),
            )
        except DataNotFoundError as exc:
            raise TaskError(f"data ({self.spec.name}, {split} split): {exc}") from None
        if not out:
            raise TaskError(f"data: the {split} split of {self.spec.name} is empty")
        return out

    def load(self) -> None:
        self.train_examples()
        self.eval_examples()

    def train_examples(self) -> list[TextExample]:
        if self._train is None:
            self._train = self._load("train", self.config.data.max_train_examples)
        return self._train

    def eval_examples(self) -> list[TextExample]:
        """The (capped) dev examples."""
        if self._eval is None:
            self._eval = self._load("dev", self.config.data.max_eval_examples)
        return self._eval

    def partition_keys(self) -> list[Hashable]:
        if self.spec.is_regression:  # bucket the 0..5 similarity score
            return [
                min(STSB_BUCKETS - 1, max(0, int(float(e.label)))) for e in self.train_examples()
            ]
        return [int(e.label) for e in self.train_examples()]

    # ------------------------------------------------------------------ model
    def head_module_names(self) -> list[str]:
        return ["classifier"]

    def build_model(self) -> tuple[nn.Module, Any]:
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoTokenizer,
            BertConfig,
            BertForSequenceClassification,
        )
        from transformers.utils import logging as hf_logging

        name = self.config.model.name
        try:
            source = resolve_model_source(name)
        except ModelNotFoundError as exc:
            raise TaskError(str(exc)) from None
        extra: dict[str, Any] = {"num_labels": self.spec.num_labels}
        if self.spec.is_regression:
            extra["problem_type"] = "regression"
        else:
            extra["problem_type"] = "single_label_classification"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            with seeded(derive_seed(self.config.seed, "model")):
                if name == "tiny-bert":
                    cfg = BertConfig(vocab_size=tokenizer.vocab_size, **TINY_BERT, **extra)
                    model = BertForSequenceClassification(cfg)
                else:
                    cfg = AutoConfig.from_pretrained(source, **extra)
                    # the new classification head is reported as "missing": expected, not news
                    verbosity = hf_logging.get_verbosity()
                    hf_logging.set_verbosity_error()
                    try:
                        model = AutoModelForSequenceClassification.from_pretrained(
                            source, config=cfg
                        )
                    finally:
                        hf_logging.set_verbosity(verbosity)
        except OSError as exc:
            raise TaskError(
                f"model.name {name!r}: cannot load it offline ({exc}). Fix: use minilm, "
                "tiny-bert or a local model directory (no network access is assumed)."
            ) from None
        if (
            getattr(model.config, "pad_token_id", None) is None
            and tokenizer.pad_token_id is not None
        ):
            model.config.pad_token_id = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        return model, tokenizer

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("call build_model() before collate()/evaluate()")
        return self.tokenizer

    def collate(self, examples: Sequence[TextExample]) -> dict[str, Tensor]:
        tok = self._tok()
        a = [e.text_a for e in examples]
        b = [e.text_b or "" for e in examples] if examples[0].text_b is not None else None
        enc = tok(
            a,
            b,
            truncation=True,
            max_length=self.config.model.max_length,
            padding=True,
            return_tensors="pt",
        )
        if self.spec.is_regression:
            labels = torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
        else:
            labels = torch.tensor([int(e.label) for e in examples], dtype=torch.long)
        out = dict(enc)
        out["labels"] = labels
        return out

    @torch.no_grad()
    def predict(
        self, model: nn.Module, examples: Sequence[TextExample], batch_size: int = 64
    ) -> np.ndarray:
        """Predictions (class indices or scores) of ``model`` on ``examples``."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        preds: list[np.ndarray] = []
        for i in range(0, len(examples), batch_size):
            batch = self.collate(examples[i : i + batch_size])
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            if self.spec.is_regression:
                preds.append(logits[:, 0].cpu().numpy())
            else:
                preds.append(logits.argmax(-1).cpu().numpy())
        model.train(was_training)
        return np.concatenate(preds)

    def evaluate(
        self, model: nn.Module, *, max_examples: int | None = None, batch_size: int = 64
    ) -> dict[str, float]:
        """The task's GLUE metrics on the dev split and, for classification, the share of the
        examples predicted as the most-predicted class (``top_prediction_share``)."""
        examples = self.eval_examples()
        if max_examples is not None:
            examples = examples[:max_examples]
        preds = self.predict(model, examples, batch_size)
        labels = [e.label for e in examples]
        out = glue_metrics(self.spec.name, preds, labels)
        if not self.spec.is_regression:  # a diagnostic beside the task's metrics
            out[TOP_PREDICTION_SHARE] = top_prediction_share(preds)
        return out

    def primary_metric(self) -> str:
        return self.spec.primary
