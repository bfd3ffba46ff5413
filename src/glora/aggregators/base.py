"""The aggregator protocol shared by every server rule.

An :class:`Aggregator` is an engine-free object with

* server side: :meth:`~Aggregator.init_state` (round 0 from the initial global adapter),
  :meth:`~Aggregator.aggregate` (one round: validated updates → new :class:`ServerState`),
  :meth:`~Aggregator.readout` (the adapter a client of a given rank starts from) and
  :meth:`~Aggregator.effective_update` (the global model's total change relative to the original
  base weights);
* client side, pure functions of the round number: :meth:`~Aggregator.client_plan` (which
  factors are trained, uploaded, downloaded or kept locally) and
  :meth:`~Aggregator.prepare_upload` (a transform before upload, e.g. FedRot-LoRA's alignment).

The simulator and the Flower strategy drive every method through exactly these calls.
Rounds are numbered from 1; ``state.round`` counts finished aggregations.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from glora.linalg import compress_exact, derive_seed, fresh_factors
from glora.robust import apply_norm_guard, check_norm_guard_options
from glora.types import (
    ClientPlan,
    ClientUpdate,
    LoRAFactors,
    ServerState,
    UnsupportedRanks,
)
from glora.validation import DEFAULT_MAX_ABS, RoundInput, validate_updates

__all__ = ["Aggregator", "fedavg_tensors", "fill_to_rank", "pad_factors", "weighted_sum"]


def weighted_sum(tensors: Sequence[Tensor], p: Tensor) -> Tensor:
    """``Σ_i p_i T_i`` for tensors of one shape (``p`` is cast to their dtype)."""
    out = tensors[0] * p[0].to(tensors[0].dtype)
    for i in range(1, len(tensors)):
        out = out + tensors[i] * p[i].to(tensors[i].dtype)
    return out


def fedavg_tensors(
    tensors: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """FedAvg of named tensors (e.g. classification heads): ``Σ_i t_i · (w_i / Σ_j w_j)``.

    Summed in the order given; the simulator and the Flower strategy both call this, so their
    heads agree bit for bit. Empty input gives an empty dict.
    """
    if not tensors or not tensors[0]:
        return {}
    total = sum(float(w) for w in weights)
    return {
        k: sum(t[k] * (float(w) / total) for t, w in zip(tensors, weights))  # type: ignore[misc]
        for k in tensors[0]
    }


def pad_factors(factors: Sequence[LoRAFactors], rank: int) -> list[LoRAFactors]:
    """Zero-pad every client's factors to ``rank`` (HetLoRA-style zero padding)."""
    return [f.pad(rank) for f in factors]


def fill_to_rank(f: LoRAFactors, rank: int, *, seed: int) -> LoRAFactors:
    """``f`` truncated to ``rank``, or extended with fresh components (``A`` random, ``B`` zero).

    Fresh components keep the product unchanged and give both factors a gradient next round.
    Rows ``f.rank .. rank-1`` come from one rank-``rank`` draw seeded by ``seed``, so readouts
    of different ranks stay nested.
    """
    if rank <= f.rank:
        return f.truncate(rank)
    A0, B0 = fresh_factors(f.d, f.k, rank, seed=seed, dtype=f.dtype)
    A = torch.cat([f.A, A0[f.rank :].to(f.A.device)], dim=0)
    B = torch.cat([f.B, B0[:, f.rank :].to(f.B.device)], dim=1)
    return LoRAFactors(A=A, B=B)


class Aggregator(ABC):
    """Base class of every server rule (see the module docstring for the protocol).

    Subclasses set ``name`` (registry key) and ``mixed_ranks`` (native support for clients of
    different ranks) and implement :meth:`_aggregate` and, if their state is not a plain adapter
    ``{"A", "B"}`` per module, :meth:`_readout`.

    Args:
        pad: for a method defined for one rank only, accept mixed ranks by zero-padding every
            client to the round's largest rank (labelled as the zero-padding extension; the
            readout truncates to the client's rank). Ignored by methods with native support.
        max_rank: reject updates of a larger rank.
        max_abs: reject updates with an entry larger than this in magnitude.
        seed: seeds the fresh components of readouts (deterministic per round and module).
        norm_guard: robust-aggregation option, off (``None``) by default: a multiple (``≥ 1``) of
            the round's median client update norm ``sqrt(Σ_m ‖B̃_i A_i‖_F²)``; clients above it
            are handled per ``norm_guard_mode`` (see :func:`glora.robust.apply_norm_guard`).
        norm_guard_mode: ``"reject"`` (drop the outliers, never all clients) or ``"clip"``
            (scale their ``B̃`` down to the threshold norm). What happened is recorded in
            ``state.diagnostics["norm_guard"]``.
    """

    name: ClassVar[str] = ""
    mixed_ranks: ClassVar[bool] = False

    def __init__(
        self,
        *,
        pad: bool = False,
        max_rank: int | None = None,
        max_abs: float = DEFAULT_MAX_ABS,
        seed: int = 0,
        norm_guard: float | None = None,
        norm_guard_mode: Literal["reject", "clip"] = "reject",
    ) -> None:
        if not isinstance(pad, bool):
            raise ValueError(f"pad must be true or false, got {pad!r}")
        if max_rank is not None and (
            isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
        ):
            raise ValueError(f"max_rank must be a positive integer or None, got {max_rank!r}")
        if not (isinstance(max_abs, (int, float)) and max_abs > 0):
            raise ValueError(f"max_abs must be a positive number, got {max_abs!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.pad = pad
        self.max_rank = max_rank
        self.max_abs = float(max_abs)
        check_norm_guard_options(norm_guard, norm_guard_mode)
        self.seed = seed
        self.norm_guard = None if norm_guard is None else float(norm_guard)
        self.norm_guard_mode = norm_guard_mode
        self._state: ServerState | None = None

    # ------------------------------------------------------------------ options
    @classmethod
    def option_names(cls) -> list[str]:
        """Keyword options accepted by the constructor (own and inherited)."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in names:
                    names.append(p.name)
        return sorted(names)

    def options(self) -> dict[str, Any]:
        """The constructor options of this instance (JSON-able), e.g. for a checkpoint."""
        return {name: getattr(self, name) for name in self.option_names()}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> ServerState | None:
        """The state after the last :meth:`aggregate` (or :meth:`init_state`)."""
        return self._state

    def load_state(self, state: ServerState) -> None:
        """Resume from a saved state (e.g. a checkpoint)."""
        if state.method != self.name:
            raise ValueError(f"state was produced by {state.method!r}, not by {self.name!r}")
        self._state = state

    def init_state(self, initial: Mapping[str, LoRAFactors]) -> ServerState:
        """Set round 0 from the initial global adapter (module → folded factors).

        The readout of the initial state is ``initial`` truncated (or freshly extended) to each
        client's rank; :meth:`_init` lets a method keep more (FFA-LoRA's frozen ``A``).
        """
        rnd = self._validate([ClientUpdate("initial-adapter", 1.0, initial)], with_state=False)
        state = ServerState(method=self.name, round=0)
        for m in rnd.modules:
            f = rnd.factors[m][0]
            state.tensors[m] = {"A": f.A.clone(), "B": f.B.clone()}
        state.info["shapes"] = {m: list(s) for m, s in rnd.shapes.items()}
        self._init(state)
        self._state = state
        return state

    def _init(self, state: ServerState) -> None:  # noqa: B027 - optional hook, not abstract
        """Hook: add method-specific round-0 state (default: nothing)."""

    # ------------------------------------------------------------------ server API
    def aggregate(self, updates: Sequence[ClientUpdate]) -> ServerState:
        """Validate one round of updates and return (and keep) the new server state.

        Invalid input raises :class:`InvalidUpdate` and leaves the current state untouched;
        inputs are never mutated.
        """
        rnd = self._validate(updates, with_state=True)
        guard: dict[str, Any] | None = None
        if self.norm_guard is not None:
            n_in = rnd.n
            rnd, actions = apply_norm_guard(rnd, self.norm_guard, self.norm_guard_mode)
            guard = {
                "multiple": self.norm_guard,
                "mode": self.norm_guard_mode,
                "clients": n_in,
                "kept": rnd.n,
                "actions": actions,
            }
        if rnd.mixed_ranks() and not self.mixed_ranks and not self.pad:
            module = next(m for m in rnd.modules if len(set(rnd.ranks[m])) > 1)
            detail = "; ".join(f"{c}: r={r}" for c, r in zip(rnd.client_ids, rnd.ranks[module]))
            raise UnsupportedRanks(
                f"{self.name} is defined for one LoRA rank, but the clients have different "
                f"ranks ({detail}). Give every client the same rank, use a method with native "
                "mixed-rank support (glora, flexlora, hetlora, flora), or set the method option "
                "pad to true for zero-padding (pad=True in Python, method.pad: true in a config).",
                module=module,
            )
        prev = self._state
        new = self._aggregate(rnd, prev)
        new.method = self.name
        new.round = self.next_round(prev)
        if guard is not None:
            new.diagnostics["norm_guard"] = guard
        if prev is not None:
            new.info.setdefault("shapes", prev.info.get("shapes"))
        else:
            new.info.setdefault("shapes", {m: list(s) for m, s in rnd.shapes.items()})
        self._state = new
        return new

    @abstractmethod
    def _aggregate(self, rnd: RoundInput, prev: ServerState | None) -> ServerState:
        """Compute the new state from a validated round (``prev`` is None before round 1)."""

    def readout(self, state: ServerState, rank: int | None = None) -> dict[str, LoRAFactors]:
        """The folded adapter a client of ``rank`` starts from next round (``B @ A`` is its update).

        ``rank=None`` gives the server's full global adapter. Components beyond what the state
        holds are fresh (``A`` random, ``B`` zero), which leaves the product unchanged.
        """
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
        if state.method != self.name:
            raise ValueError(f"state was produced by {state.method!r}, not by {self.name!r}")
        if state.round == 0:
            return self._adapter_readout(state, rank)
        return self._readout(state, rank)

    def _readout(self, state: ServerState, rank: int | None) -> dict[str, LoRAFactors]:
        """Default: the state holds a plain adapter ``{"A", "B"}`` per module."""
        return self._adapter_readout(state, rank)

    def _adapter_readout(self, state: ServerState, rank: int | None) -> dict[str, LoRAFactors]:
        out = {}
        for m, named in state.tensors.items():
            f = LoRAFactors(A=named["A"], B=named["B"])
            out[m] = f if rank is None else fill_to_rank(f, rank, seed=self.fresh_seed(state, m))
        return out

    def fresh_seed(self, state: ServerState, module: str) -> int:
        """Seed of the fresh readout components of ``module`` after ``state.round``."""
        return derive_seed(self.seed, self.name, state.round, module)

    def effective_update(self, state: ServerState) -> dict[str, LoRAFactors]:
        """The global model's total update relative to the original base weights, in factors.

        ``base_delta`` (if any) plus the full readout, ``W = W0 + B @ A``; when a base delta
        exists the concatenation is re-expressed exactly in its numerical rank
        (:func:`glora.linalg.compress_exact`).
        """
        adapter = self.readout(state)
        if not state.base_delta:
            return adapter
        out = {}
        for m, f in adapter.items():
            base = state.base_delta.get(m)
            if base is None:
                out[m] = f
            else:
                base = base.to(f.dtype)
                both = LoRAFactors(A=torch.cat([base.A, f.A], 0), B=torch.cat([base.B, f.B], 1))
                out[m] = compress_exact(both)
        return out

    # ------------------------------------------------------------------ client hooks
    def client_plan(self, round: int) -> ClientPlan:
        """How clients take part in ``round`` (1-based). Default: train and exchange both."""
        return ClientPlan()

    def prepare_upload(
        self,
        round: int,
        received: Mapping[str, LoRAFactors],
        trained: Mapping[str, LoRAFactors],
    ) -> dict[str, LoRAFactors]:
        """Client-side transform of the trained (folded) factors before upload. Default: none."""
        return dict(trained)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def next_round(prev: ServerState | None) -> int:
        """The 1-based number of the round being aggregated after ``prev``."""
        return (prev.round if prev is not None else 0) + 1

    def _validate(self, updates: Sequence[ClientUpdate], *, with_state: bool) -> RoundInput:
        expected = None
        if with_state and self._state is not None and self._state.info.get("shapes"):
            expected = {m: (int(s[0]), int(s[1])) for m, s in self._state.info["shapes"].items()}
        return validate_updates(
            updates, expected_shapes=expected, max_rank=self.max_rank, max_abs=self.max_abs
        )

    def _same_rank_factors(self, rnd: RoundInput, module: str) -> list[LoRAFactors]:
        """The clients' factors of ``module``, zero-padded to the largest rank when ranks differ.

        ``aggregate`` has already rejected mixed ranks unless ``pad`` (or native support).
        """
        fs = rnd.factors[module]
        r = rnd.max_rank(module)
        return pad_factors(fs, r) if any(f.rank != r for f in fs) else list(fs)

    @staticmethod
    def _prev_adapter(prev: ServerState | None, module: str) -> LoRAFactors | None:
        if prev is None or module not in prev.tensors:
            return None
        named = prev.tensors[module]
        if "A" not in named or "B" not in named:
            return None
        return LoRAFactors(A=named["A"], B=named["B"])
