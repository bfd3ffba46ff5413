"""Core value types of glora: LoRA factors, client updates, server state and client plans.

Conventions (see ``docs/design.md``):

* ``LoRAFactors(A, B)`` holds one module's update with the LoRA scale *folded* into ``B``:
  ``A`` is ``r×k``, ``B`` is ``d×r`` and ``ΔW = B @ A`` is the update of the ``d×k`` weight
  (``nn.Linear`` layout: ``d`` = out features, ``k`` = in features). A PEFT adapter stores
  ``lora_A`` (``r×k``) and ``lora_B`` (``d×r``) with ``ΔW = s · lora_B @ lora_A``; :func:`fold`
  and :func:`unfold` convert between the two with the scale ``s`` of :func:`lora_scale`.
* Every server rule consumes :class:`ClientUpdate` objects and produces a :class:`ServerState`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "ClientPlan",
    "ClientUpdate",
    "Factor",
    "InvalidUpdate",
    "LoRAFactors",
    "ServerState",
    "UnsupportedRanks",
    "fold",
    "lora_scale",
    "unfold",
]

Factor = Literal["A", "B"]


class InvalidUpdate(ValueError):
    """A malformed client update (or a malformed set of updates).

    The message always names the client and the module when the problem is local to one of
    them, plus the problem itself, e.g. ``client 'c3', module 'q_proj': A has 4 rows but B has
    8 columns (the rank must agree)``.
    """

    def __init__(self, problem: str, *, client_id: str | None = None, module: str | None = None):
        self.problem = problem
        self.client_id = client_id
        self.module = module
        where = []
        if client_id is not None:
            where.append(f"client {client_id!r}")
        if module is not None:
            where.append(f"module {module!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


class UnsupportedRanks(InvalidUpdate):
    """Clients of different ranks were sent to a method that is defined for one rank only."""


@dataclass(frozen=True)
class LoRAFactors:
    """One module's low-rank update ``ΔW = B @ A`` with the LoRA scale folded into ``B``.

    Attributes:
        A: ``r×k`` (rank × in features).
        B: ``d×r`` (out features × rank).
    """

    A: Tensor
    B: Tensor

    @property
    def rank(self) -> int:
        """The rank ``r`` (rows of ``A``)."""
        return int(self.A.shape[0])

    @property
    def d(self) -> int:
        """Output dimension (rows of ``B``)."""
        return int(self.B.shape[0])

    @property
    def k(self) -> int:
        """Input dimension (columns of ``A``)."""
        return int(self.A.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def delta(self) -> Tensor:
        """The dense ``d×k`` update ``B @ A``. For tests and small layers only."""
        return self.B @ self.A

    def to(self, dtype: torch.dtype) -> LoRAFactors:
        """The same factors cast to ``dtype``."""
        return LoRAFactors(A=self.A.to(dtype), B=self.B.to(dtype))

    def truncate(self, rank: int) -> LoRAFactors:
        """The first ``rank`` components: rows of ``A`` and columns of ``B``."""
        return LoRAFactors(A=self.A[:rank], B=self.B[:, :rank])

    def pad(self, rank: int) -> LoRAFactors:
        """Zero-pad to ``rank`` components (zero rows of ``A``, zero columns of ``B``)."""
        extra = rank - self.rank
        if extra < 0:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}")
        if extra == 0:
            return self
        A = torch.cat([self.A, self.A.new_zeros(extra, self.k)], dim=0)
        B = torch.cat([self.B, self.B.new_zeros(self.d, extra)], dim=1)
        return LoRAFactors(A=A, B=B)

    def nbytes(self, which: frozenset[str] | None = None) -> int:
        """Bytes of the factors named in ``which`` (default both), as sent over a network."""
        which = frozenset({"A", "B"}) if which is None else which
        total = 0
        if "A" in which:
            total += self.A.numel() * self.A.element_size()
        if "B" in which:
            total += self.B.numel() * self.B.element_size()
        return total


def lora_scale(alpha: float, rank: int, *, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale: ``α / r``, or ``α / √r`` with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def fold(lora_A: Tensor, lora_B: Tensor, scale: float) -> LoRAFactors:
    """Fold PEFT tensors (``lora_A`` r×k, ``lora_B`` d×r, scale ``s``) into ``LoRAFactors``."""
    return LoRAFactors(A=lora_A, B=lora_B * scale)


def unfold(factors: LoRAFactors, scale: float) -> tuple[Tensor, Tensor]:
    """Split folded factors back into PEFT's ``(lora_A, lora_B)`` for a client of scale ``s``."""
    if scale == 0:
        raise ValueError("cannot unfold with a zero LoRA scale")
    return factors.A, factors.B / scale


@dataclass(frozen=True)
class ClientUpdate:
    """What one client uploads after local training.

    Attributes:
        client_id: stable client identity.
        weight: aggregation weight, e.g. the number of training examples; normalised over the
            round's participants by the server (``p_i = w_i / Σ_j w_j``).
        factors: module name → folded factors (the client's whole adapter after training).
        extra: non-LoRA trainable tensors (e.g. a classification head), averaged with FedAvg
            weights by the engine's head policy; aggregators ignore them.
    """

    client_id: str
    weight: float
    factors: Mapping[str, LoRAFactors]
    extra: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientPlan:
    """How a client takes part in a round, as a method decides it (pure metadata).

    Engines (the simulator, the Flower ClientApp) follow the plan without method-specific code.

    Attributes:
        train: factors that receive gradients this round (the others are frozen).
        upload: factors the client sends; the server's rule reads only these. A factor that is
            not uploaded is filled in by the transport with the one the client started from.
        download: factors the server sends, plus any ``local`` factor the client does not hold
            yet (e.g. FFA-LoRA's frozen ``A`` on a client's first round).
        local: factors the client keeps between rounds: once it has a stored value it starts
            from it instead of the server's readout (FedSA-LoRA keeps ``B``, FFA-LoRA its frozen
            ``A``).
    """

    train: frozenset[str] = frozenset({"A", "B"})
    upload: frozenset[str] = frozenset({"A", "B"})
    download: frozenset[str] = frozenset({"A", "B"})
    local: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, list[str]]:
        return {k: sorted(getattr(self, k)) for k in ("train", "upload", "download", "local")}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientPlan:
        return cls(**{k: frozenset(v) for k, v in data.items()})


@dataclass
class ServerState:
    """Everything a server keeps between rounds.

    Attributes:
        method: registry name of the aggregator that produced it.
        round: number of aggregations done (0 = the initial state).
        tensors: module → named tensors of the method (e.g. GLoRA's ``U_ref`` and ``C``).
        base_delta: module → cumulative change of the frozen base weight since round 0, in
            folded factors (``W0 ← W0_original + B @ A``). Empty for methods that never change the
            base (only FedEx-LoRA and FLoRA use it). Engines apply it to the frozen model.
        info: JSON-able metadata that must survive a resume.
        diagnostics: JSON-able figures from the last aggregation, for logging.
    """

    method: str
    round: int = 0
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    base_delta: dict[str, LoRAFactors] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def flat_tensors(self) -> dict[str, Tensor]:
        """All tensors under flat keys: ``t/<module>/<name>`` and ``base/<module>/A|B``."""
        flat: dict[str, Tensor] = {}
        for module, named in self.tensors.items():
            for name, tensor in named.items():
                flat[f"t/{module}/{name}"] = tensor
        for module, f in self.base_delta.items():
            flat[f"base/{module}/A"] = f.A
            flat[f"base/{module}/B"] = f.B
        return flat

    @classmethod
    def from_flat(
        cls,
        method: str,
        round: int,
        flat: Mapping[str, Tensor],
        info: Mapping[str, Any] | None = None,
        diagnostics: Mapping[str, Any] | None = None,
    ) -> ServerState:
        """Inverse of :meth:`flat_tensors`."""
        tensors: dict[str, dict[str, Tensor]] = {}
        base: dict[str, dict[str, Tensor]] = {}
        for key, tensor in flat.items():
            kind, _, rest = key.partition("/")
            module, _, name = rest.rpartition("/")
            if kind == "t" and module:
                tensors.setdefault(module, {})[name] = tensor
            elif kind == "base" and module and name in ("A", "B"):
                base.setdefault(module, {})[name] = tensor
            else:
                raise ValueError(f"unexpected key {key!r} in a server-state file")
        base_delta = {}
        for module, ab in base.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"base delta of module {module!r} lacks A or B")
            base_delta[module] = LoRAFactors(A=ab["A"], B=ab["B"])
        return cls(
            method=method,
            round=round,
            tensors=tensors,
            base_delta=base_delta,
            info=dict(info or {}),
            diagnostics=dict(diagnostics or {}),
        )
