"""Server aggregation rules: one module per rule, plus this registry.

>>> from glora import aggregators
>>> aggregators.available()[:3]
['fedex', 'fedit', 'fedrot']
>>> agg = aggregators.build("glora", server_rank=16)
"""

from __future__ import annotations

import importlib
from typing import Any

from glora.aggregators.base import Aggregator

__all__ = ["Aggregator", "available", "build", "get_class", "register"]

# name -> "module:Class" of the built-in rules, imported on first use.
_BUILTIN: dict[str, str] = {
    "fedit": "glora.aggregators.fedit:FedIT",
    "ffa": "glora.aggregators.ffa:FFALoRA",
    "fedsa": "glora.aggregators.fedsa:FedSALoRA",
    "flora": "glora.aggregators.flora:FLoRA",
    "fedex": "glora.aggregators.fedex:FedExLoRA",
    "flexlora": "glora.aggregators.flexlora:FlexLoRA",
    "hetlora": "glora.aggregators.hetlora:HetLoRA",
    "lorafair": "glora.aggregators.lorafair:LoRAFAIR",
    "rolora": "glora.aggregators.rolora:RoLoRA",
    "fedrot": "glora.aggregators.fedrot:FedRotLoRA",
    "florana": "glora.aggregators.florana:FLoRANA",
    "glora": "glora.aggregators.glora:GLoRA",
}
_REGISTERED: dict[str, type[Aggregator]] = {}


def register(name: str, cls: type[Aggregator], *, force: bool = False) -> None:
    """Register a user-defined rule under ``name`` (``force`` replaces an existing one)."""
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise TypeError(f"{cls!r} is not an Aggregator subclass")
    if not force and (name in _REGISTERED or name in _BUILTIN):
        raise ValueError(
            f"aggregator {name!r} is already registered; pass force=True to replace it"
        )
    _REGISTERED[name] = cls


def available() -> list[str]:
    """Names of every registered aggregation rule, sorted."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_class(name: str) -> type[Aggregator]:
    """The class registered under ``name``; ValueError listing the valid names otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = _BUILTIN.get(name) if isinstance(name, str) else None
    if target is None:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {', '.join(available())}")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build(name: str, **options: Any) -> Aggregator:
    """Instantiate the rule ``name`` with keyword ``options``.

    Raises:
        ValueError: unknown name or option (listing the valid ones), or a bad option value.
    """
    cls = get_class(name)
    valid = cls.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for aggregator {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    try:
        return cls(**options)
    except TypeError as exc:  # wrong argument types that the constructor did not catch itself
        raise ValueError(f"bad options for aggregator {name!r}: {exc}") from exc
