"""The run configuration of ``glora run`` (pydantic, ``extra="forbid"`` everywhere).

A config is a YAML file with the sections below (defaults shown)::

    name: sst2-glora
    seed: 0
    model:   {name: minilm, target_modules: [query, value], max_length: 64}
    data:    {task: sst2, dir: ../shared/data/glue, max_train_examples: null,
              max_eval_examples: null}
    federation: {clients: 10, partition: dirichlet, alpha: 0.5, ranks: [2, 4, 8, 16],
                 participation: 0.5}
    method:  {name: glora}        # + the aggregator's options as extra keys
    training: {rounds: 10, local_steps: 20, local_epochs: null, batch_size: 16, lr: 5.0e-4,
               lora_alpha: 16, use_rslora: false, head: fedavg, device: auto, bf16: false,
               eval_every: 1, checkpoint_every: 1}
    output:  {dir: runs}

* ``model.name``: ``minilm`` (the packaged all-MiniLM-L6-v2, offline), ``tiny-bert`` (a tiny,
  randomly initialised BERT built from a config with the MiniLM tokenizer: for tests and CI),
  anything else is a Hugging Face model id or a local path.
* ``data.task`` picks the task plug-in (:func:`glora.tasks.build_task`); ``data`` accepts
  task-specific optional fields in ``data.options`` (a free mapping passed to the task).
  ``data.dir`` is resolved against the current directory; ``null`` = the task's default source
  (the Hugging Face hub for GLUE).
* ``federation.ranks``: an int (every client), a list (cycled over clients) or a named
  distribution ``"uniform:2,4,8,16"`` (a seeded draw per client).
* ``federation.participation``: a fraction in (0, 1] (float) or a client count (int).
* ``method.name``: any registered aggregator (:func:`glora.aggregators.available`) or
  ``centralized`` (one client holding all the training data, FedIT underneath, the same number of
  gradient steps as the federation: ``rounds × local_steps × participants per round``).
* ``training.head``: ``fedavg`` (train + FedAvg), ``local`` (each client keeps its own head; the
  global model is evaluated with the FedAvg of the heads) or ``frozen``.
* Further ``training`` fields: ``eval_batch_size`` (64), ``weight_decay`` (0), ``lora_dropout``
  (0), ``num_threads`` (CPU threads; null = the CPUs this process may use; a seed reproduces
  a run bit for bit only on the same thread count, since it sets the summation order),
  ``personalized_eval_examples`` (200: dev examples per client in the personalised evaluation).

:func:`load_config` reads a file, applies ``--set`` overrides and validates; errors are raised
as :class:`ConfigError` whose message lists every problem with its dotted path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from glora import aggregators
from glora.linalg import derive_seed

__all__ = [
    "CENTRALIZED",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "TrainingConfig",
    "apply_overrides",
    "format_validation_error",
    "load_config",
    "validate_config",
]

#: The method name of the centralized baseline (not an aggregator).
CENTRALIZED = "centralized"


class ConfigError(ValueError):
    """An invalid configuration; the message lists each problem with its dotted path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class ModelConfig(_Section):
    """The pretrained model and the LoRA target modules."""

    name: str = "minilm"
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    max_length: int = Field(64, ge=8)


class DataConfig(_Section):
    """The task and where its data lives; ``options`` holds task-specific fields."""

    task: str = "sst2"
    dir: str | None = None
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


_RANK_DIST = re.compile(r"^uniform:\s*(\d+(\s*,\s*\d+)*)$")


class FederationConfig(_Section):
    """Clients, their data partition, their LoRA ranks and the participation per round."""

    clients: int = Field(10, ge=1)
    partition: Literal["iid", "dirichlet", "quantity", "by_task", "by_category"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    ranks: int | list[int] | str = Field(default_factory=lambda: [2, 4, 8, 16])
    participation: float | int = 0.5

    @field_validator("ranks")
    @classmethod
    def _check_ranks(cls, v: int | list[int] | str) -> int | list[int] | str:
        if isinstance(v, bool):
            raise ValueError("ranks must be an int, a list of ints or 'uniform:r1,r2,...'")
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"ranks must be positive, got {v}")
        elif isinstance(v, list):
            if not v or any(r < 1 for r in v):
                raise ValueError("ranks must be a non-empty list of positive ints")
        else:
            if not _RANK_DIST.match(v.strip()):
                raise ValueError(
                    f"unknown rank distribution {v!r}; allowed: an int, a list of ints, or "
                    "'uniform:r1,r2,...' (a seeded draw per client)"
                )
            if any(int(x) < 1 for x in v.split(":", 1)[1].split(",")):
                raise ValueError("ranks must be positive")
        return v

    @field_validator("participation")
    @classmethod
    def _check_participation(cls, v: float | int) -> float | int:
        if isinstance(v, bool):
            raise ValueError("participation must be a fraction in (0, 1] or a client count")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"participation fraction must be in (0, 1], got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"participation count must be >= 1, got {v}")
        return v

    def client_ranks(self, seed: int) -> list[int]:
        """The rank of each client (deterministic in ``seed``)."""
        if isinstance(self.ranks, int):
            return [self.ranks] * self.clients
        if isinstance(self.ranks, list):
            return [self.ranks[i % len(self.ranks)] for i in range(self.clients)]
        choices = [int(x) for x in self.ranks.split(":", 1)[1].split(",")]
        rng = np.random.default_rng(derive_seed(seed, "ranks"))
        return [int(r) for r in rng.choice(choices, size=self.clients)]

    def participants_per_round(self) -> int:
        """How many clients take part in each round."""
        if isinstance(self.participation, int):
            return self.participation
        return max(1, math.floor(self.participation * self.clients + 1e-9))


class MethodConfig(_Section):
    """The aggregation rule: ``name`` plus its constructor options as extra keys."""

    model_config = ConfigDict(extra="allow")

    name: str = "glora"

    @property
    def options(self) -> dict[str, Any]:
        """The aggregator options (every key but ``name``)."""
        return dict(self.model_extra or {})

    @property
    def aggregator(self) -> str:
        """The registry name of the rule the engine runs (FedIT for ``centralized``)."""
        return "fedit" if self.name == CENTRALIZED else self.name


class TrainingConfig(_Section):
    """Local training, evaluation and checkpointing."""

    rounds: int = Field(10, ge=1)
    local_steps: int | None = Field(20, ge=1)
    local_epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(5.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    head: Literal["fedavg", "local", "frozen"] = "fedavg"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    num_threads: int | None = Field(None, ge=1)
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    personalized_eval_examples: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if self.local_epochs is not None:
            self.local_steps = None
        elif self.local_steps is None:
            raise ValueError("set training.local_steps or training.local_epochs")
        return self


class OutputConfig(_Section):
    """Where runs are written: ``<dir>/<name>/``."""

    dir: str = "runs"


class RunConfig(_Section):
    """A whole ``glora run`` configuration."""

    name: str = Field("run", min_length=1)
    seed: int = Field(0, ge=0)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if "/" in v or v in (".", ".."):
            raise ValueError("name must be a plain directory name (no '/')")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        fed = self.federation
        if isinstance(fed.participation, int) and fed.participation > fed.clients:
            raise ValueError(
                f"federation.participation: {fed.participation} clients per round but only "
                f"{fed.clients} clients"
            )
        return self

    # ------------------------------------------------------------------ derived
    @property
    def run_dir(self) -> Path:
        """``output.dir / name``."""
        return Path(self.output.dir) / self.name

    def is_centralized(self) -> bool:
        return self.method.name == CENTRALIZED

    def effective_federation(self) -> tuple[int, list[int], float | int, int | None]:
        """``(clients, ranks, participation, local_steps)`` that the engine runs.

        The centralized baseline is one client of the largest rank, taking part every round and
        doing ``local_steps × participants per round`` steps per round.
        """
        ranks = self.federation.client_ranks(self.seed)
        if not self.is_centralized():
            return (
                self.federation.clients,
                ranks,
                self.federation.participation,
                (self.training.local_steps),
            )
        steps = self.training.local_steps
        if steps is not None:
            steps *= self.federation.participants_per_round()
        return 1, [max(ranks)], 1.0, steps

    def with_resolved_paths(self) -> RunConfig:
        """This config with a relative ``data.dir`` resolved against the current directory.

        For processes that run elsewhere (Flower's ServerApp and ClientApps) but must read the
        same data as the user who started them.
        """
        if self.data.dir is None:
            return self
        data_dir = str(Path(self.data.dir).expanduser().resolve())
        return self.model_copy(update={"data": self.data.model_copy(update={"dir": data_dir})})

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (method options inline)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------- errors


def _loc_str(loc: Iterable[Any]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _fields_at(loc: tuple[Any, ...]) -> list[str] | None:
    """The allowed keys of the section that holds ``loc``'s last element (for 'extra' errors)."""
    model: Any = RunConfig
    for p in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(p))
        if field is None:
            return None
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``dotted.path: message`` (with the allowed keys for unknown keys)."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        # union members add their type names to the location; drop them
        loc = tuple(
            p for p in loc if p not in ("int", "float", "str", "list[int]", "function-after")
        )
        path = _loc_str(loc) or "(config)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(loc)
            msg = "unknown key" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        lines.append(f"{path}: {msg}")
    return "\n".join(dict.fromkeys(lines))


# ---------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    out = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        parts = key.strip().split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            else:
                child = dict(child)
            node[p] = child
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def _check_method(cfg: RunConfig) -> None:
    """Validate the method name and options through the aggregator registry."""
    name = cfg.method.name
    valid = [*aggregators.available(), CENTRALIZED]
    if name not in valid:
        raise ConfigError(
            f"method.name: unknown method {name!r}; allowed values: {', '.join(valid)}"
        )
    options = {"seed": cfg.seed, **cfg.method.options}
    cls = aggregators.get_class(cfg.method.aggregator)
    unknown = sorted(set(cfg.method.options) - set(cls.option_names()))
    if unknown:
        raise ConfigError(
            f"method.{unknown[0]}: unknown option for {name!r}; valid options: "
            f"{', '.join(o for o in cls.option_names() if o != 'seed')}"
        )
    try:
        aggregators.build(cfg.method.aggregator, **options)
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    ranks = cfg.federation.client_ranks(cfg.seed)
    if (
        not cfg.is_centralized()
        and len(set(ranks)) > 1
        and not cls.mixed_ranks
        and not cfg.method.options.get("pad", False)
    ):
        raise ConfigError(
            f"federation.ranks: method {name!r} is defined for one LoRA rank but the clients "
            f"have ranks {sorted(set(ranks))}; use equal ranks (e.g. ranks: {max(ranks)}) or set "
            "method.pad: true (zero-padding extension)"
        )


def validate_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig` (raises :class:`ConfigError`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("(config): the file must hold a YAML mapping of sections")
    try:
        cfg = RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    _check_method(cfg)
    return cfg


def read_raw(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (ConfigError when missing or malformed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the file must hold a YAML mapping of sections")
    return raw


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read ``path``, apply ``--set`` overrides and validate."""
    return validate_config(apply_overrides(read_raw(path), overrides))
