"""Aggregation fidelity: exactness and gauge sensitivity of every server rule.

For each registered method (plus a few labelled variants) and each scenario, one round of
client updates is aggregated and the method's *effective* update ``agg.effective_update(state)``
(what the global model changes by) is compared, densely per module, with

* the exact weighted average ``ΔW* = Σ_i p_i B̃_i A_i`` — the relative error
  ``‖ΔW_eff − ΔW*‖_F / ‖ΔW*‖_F`` (Frobenius norms summed over all modules);
* itself after a random per-client gauge ``(B̃_i G_i, G_i⁻¹ A_i)`` — the gauge sensitivity
  ``‖ΔW_eff(gauged) − ΔW_eff‖_F / ‖ΔW_eff‖_F``, for orthogonal ``G_i`` and for general
  well-conditioned invertible ``G_i`` (singular values log-uniform in ``[1/κ^{1/2}, κ^{1/2}]``).

Scenarios:

* random updates: a shared global start ``(A_0, B_0)`` of rank ``r_max`` that every client truncates
  to its rank, plus Gaussian drift (``drift``) on both factors — homogeneous ranks and
  heterogeneous ranks (same-rank rules get ``pad=True``, labelled);
* real updates (``--updates DIR``): one round of client updates saved by :func:`save_updates`
  (optionally with the adapter the clients received, ``reference.safetensors``).

Methods whose clients keep one factor frozen and shared (FFA-LoRA, RoLoRA in a B-round) are run on
updates whose frozen factor is the shared start (the server is initialised with it); the gauge
question does not arise for them (reported as ``n/a``). FedSA-LoRA keeps ``B`` on the clients, so
its global effective update carries no client ``B`` (reported, not hidden). FedRot-LoRA's client
step :meth:`~glora.aggregators.base.Aggregator.prepare_upload` is applied to every client (after
the gauge) against the received start, as a client would, in round ``round`` (default 2).

Run ``python -m glora.bench.fidelity --help`` or ``glora bench fidelity --help``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glora import aggregators
from glora.types import ClientUpdate, InvalidUpdate, LoRAFactors, UnsupportedRanks

__all__ = [
    "FORMAT",
    "FidelityRow",
    "Scenario",
    "Variant",
    "apply_gauge",
    "capture_updates",
    "default_variants",
    "evaluate",
    "exact_average",
    "load_reference",
    "load_updates",
    "main",
    "random_scenario",
    "render_table",
    "run_fidelity",
    "save_updates",
]

FORMAT = "glora-client-updates/1"
DEFAULT_SHAPES: dict[str, tuple[int, int]] = {
    "layer.0.query": (48, 32),
    "layer.0.value": (48, 32),
    "layer.1.dense": (40, 64),
}
HET_RANKS = (2, 4, 8, 16)
_EXTRA = "__extra__"


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Variant:
    """One row of the table: a registry method with options and a display label."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scenario:
    """One round of client updates, plus the adapter the clients started from (if known).

    Attributes:
        name: display name.
        updates: the clients' uploads (folded factors).
        reference: module → the received global adapter at rank ``r_max`` (clients truncate it);
            ``None`` when unknown (FedRot's alignment and frozen-factor methods then need care).
        frozen_updates: the same clients with a frozen shared ``A`` (= ``reference``'s), for
            methods that train ``B`` only; ``None`` when such updates are not available.
    """

    name: str
    updates: list[ClientUpdate]
    reference: dict[str, LoRAFactors] | None = None
    frozen_updates: list[ClientUpdate] | None = None

    @property
    def ranks(self) -> list[int]:
        """Client ranks (of the first module)."""
        return [next(iter(u.factors.values())).rank for u in self.updates]


@dataclass
class FidelityRow:
    """Result of one variant on one scenario (``None`` = not applicable, see ``note``)."""

    scenario: str
    method: str
    label: str
    ranks: list[int]
    padded: bool
    error: float | None
    gauge_orthogonal: float | None
    gauge_general: float | None
    note: str = ""


def default_variants(server_rank_sum: bool = True) -> list[Variant]:
    """Every registered method with default options, plus labelled variants.

    Extras: GLoRA with ``server_rank`` = ``Σ r_i`` (exact, filled in per scenario) and
    FedRot-LoRA with hard alignment (``lam=1``).
    """
    out = [Variant(name, name) for name in aggregators.available()]
    if server_rank_sum and "glora" in aggregators.available():
        idx = [v.method for v in out].index("glora") + 1
        out.insert(idx, Variant("glora (R=Σr)", "glora", {"server_rank": "sum"}))
    if "fedrot" in aggregators.available():
        idx = [v.method for v in out].index("fedrot") + 1
        out.insert(idx, Variant("fedrot (λ=1)", "fedrot", {"lam": 1.0}))
    return out


# ---------------------------------------------------------------------------- helpers
def exact_average(updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
    """The dense exact weighted average ``ΔW* = Σ p_i B̃_i A_i`` per module (small layers)."""
    total = sum(float(u.weight) for u in updates)
    out: dict[str, Tensor] = {}
    for u in updates:
        for m, f in u.factors.items():
            term = (float(u.weight) / total) * f.delta()
            out[m] = term if m not in out else out[m] + term
    return out


def _dense(factors: Mapping[str, LoRAFactors], dtype: torch.dtype) -> dict[str, Tensor]:
    return {m: f.delta().to(dtype) for m, f in factors.items()}


def _rel(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """``sqrt(Σ_m ‖a_m − b_m‖²) / sqrt(Σ_m ‖b_m‖²)``; NaN when ``b`` is zero."""
    num = sum(float((a[m] - b[m]).norm() ** 2) for m in b)
    den = sum(float(b[m].norm() ** 2) for m in b)
    return math.sqrt(num / den) if den > 0 else math.nan


def _gauge_matrix(r: int, gen: torch.Generator, *, orthogonal: bool, cond: float) -> Tensor:
    Q1 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64)).Q
    if orthogonal:
        if float(torch.linalg.det(Q1)) < 0:  # a proper rotation (det +1)
            Q1 = torch.cat([-Q1[:, :1], Q1[:, 1:]], dim=1)
        return Q1
    Q2 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64)).Q
    half = 0.5 * math.log(cond)
    s = torch.exp((torch.rand(r, generator=gen, dtype=torch.float64) * 2 - 1) * half)
    return Q1 @ torch.diag(s) @ Q2.mT


def apply_gauge(
    updates: Sequence[ClientUpdate], *, seed: int, orthogonal: bool, cond: float = 4.0
) -> list[ClientUpdate]:
    """A random per-client, per-module gauge ``(B̃ G, G⁻¹ A)``: every product is unchanged.

    ``orthogonal`` draws a rotation ``G`` (``det G = +1``) from the QR of a Gaussian matrix;
    otherwise ``G`` has
    random singular vectors and singular values log-uniform in ``[κ^{-1/2}, κ^{1/2}]``
    (condition number ``≤ κ = cond``).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for u in updates:
        fs = {}
        for m, f in u.factors.items():
            G = _gauge_matrix(f.rank, gen, orthogonal=orthogonal, cond=cond)
            A = torch.linalg.solve(G, f.A.to(torch.float64)).to(f.dtype)
            B = (f.B.to(torch.float64) @ G).to(f.dtype)
            fs[m] = LoRAFactors(A=A, B=B)
        out.append(ClientUpdate(u.client_id, u.weight, fs, u.extra))
    return out


def random_scenario(
    name: str,
    ranks: Sequence[int],
    shapes: Mapping[str, tuple[int, int]] | None = None,
    *,
    seed: int = 0,
    drift: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Scenario:
    """Clients that start from one global adapter of rank ``r_max`` and drift randomly.

    Client ``i`` (weight ``i + 1``) uploads ``(B_0[:, :r_i] + drift·N, A_0[:r_i] + drift·N)``;
    its frozen-``A`` twin uploads ``(B_0[:, :r_i] + drift·N, A_0[:r_i])``.
    """
    shapes = dict(shapes or DEFAULT_SHAPES)
    gen = torch.Generator().manual_seed(seed)
    r_max = max(ranks)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    reference = {
        m: LoRAFactors(A=randn(r_max, k) / math.sqrt(k), B=randn(d, r_max) / math.sqrt(r_max))
        for m, (d, k) in shapes.items()
    }
    ups, frozen = [], []
    for i, r in enumerate(ranks):
        fs, ffs = {}, {}
        for m, (d, k) in shapes.items():
            ref = reference[m].truncate(r)
            dA = drift * randn(r, k) / math.sqrt(k)
            dB = drift * randn(d, r) / math.sqrt(r_max)
            fs[m] = LoRAFactors(A=(ref.A + dA).to(dtype), B=(ref.B + dB).to(dtype))
            ffs[m] = LoRAFactors(A=ref.A.to(dtype), B=(ref.B + dB).to(dtype))
        ups.append(ClientUpdate(f"c{i}", float(i + 1), fs))
        frozen.append(ClientUpdate(f"c{i}", float(i + 1), ffs))
    ref_t = {m: f.to(dtype) for m, f in reference.items()}
    return Scenario(name, ups, ref_t, frozen)


def _frozen_factor(name: str, options: Mapping[str, Any]) -> str | None:
    """The factor a method keeps frozen and shared in round 1 (``None``: trains both)."""
    agg = aggregators.build(name, **options)
    frozen = {"A", "B"} - set(agg.client_plan(1).train)
    return next(iter(sorted(frozen))) if frozen else None


def _shared_frozen_from_updates(
    updates: Sequence[ClientUpdate], factor: str
) -> dict[str, LoRAFactors] | None:
    """If every client carries the same ``factor`` (on the common rank prefix), the shared
    adapter at the largest rank (other factor zero); otherwise ``None``."""
    big = max(updates, key=lambda u: next(iter(u.factors.values())).rank)
    out = {}
    for m, fb in big.factors.items():
        for u in updates:
            f = u.factors[m]
            r = f.rank
            x = f.A if factor == "A" else f.B.mT
            y = fb.A[:r] if factor == "A" else fb.B[:, :r].mT
            if not torch.allclose(x.to(torch.float64), y.to(torch.float64), rtol=1e-5, atol=1e-7):
                return None
        out[m] = LoRAFactors(A=fb.A, B=torch.zeros_like(fb.B)) if factor == "A" else fb
    return out


# ---------------------------------------------------------------------------- core
def _effective(
    variant: Variant,
    options: dict[str, Any],
    updates: Sequence[ClientUpdate],
    *,
    reference: Mapping[str, LoRAFactors] | None,
    init: Mapping[str, LoRAFactors] | None,
    round: int,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    agg = aggregators.build(variant.method, **options)
    if init is not None:
        agg.init_state(dict(init))
    ups = list(updates)
    if reference is not None:
        prepared = []
        for u in ups:
            received = {m: reference[m].truncate(f.rank) for m, f in u.factors.items()}
            trained = agg.prepare_upload(round, received=received, trained=dict(u.factors))
            prepared.append(ClientUpdate(u.client_id, u.weight, trained, u.extra))
        ups = prepared
    state = agg.aggregate(ups)
    return _dense(agg.effective_update(state), dtype)


def evaluate(
    variant: Variant,
    scenario: Scenario,
    *,
    gauge_seed: int = 1,
    cond: float = 4.0,
    round: int = 2,
) -> FidelityRow:
    """Exactness error and gauge sensitivities of ``variant`` on ``scenario``."""
    ranks = scenario.ranks
    cls = aggregators.get_class(variant.method)
    options = dict(variant.options)
    if options.get("server_rank") == "sum":
        options["server_rank"] = sum(ranks)
    padded = len(set(ranks)) > 1 and not cls.mixed_ranks
    if padded:
        options["pad"] = True
    row = FidelityRow(scenario.name, variant.method, variant.label, ranks, padded, None, None, None)
    if padded:
        row.note = "zero-padded (pad=True)"
    dtype = scenario.updates[0].factors[next(iter(scenario.updates[0].factors))].dtype
    frozen = _frozen_factor(variant.method, options)
    updates, init = scenario.updates, None
    notes = [row.note] if row.note else []
    if frozen is not None:
        if scenario.frozen_updates is not None and scenario.reference is not None:
            updates, init = scenario.frozen_updates, scenario.reference
        else:
            init = _shared_frozen_from_updates(scenario.updates, frozen)
            if init is None:
                row.note = "; ".join(
                    [
                        *notes,
                        f"n/a: clients do not share a frozen {frozen} (not a frozen-{frozen} run)",
                    ]
                )
                return row
        notes.append(f"shared frozen {frozen}")
    try:
        exact = exact_average(updates)
        eff = _effective(
            variant,
            options,
            updates,
            reference=scenario.reference,
            init=init,
            round=round,
            dtype=dtype,
        )
        row.error = _rel(eff, exact)
        if frozen is not None:
            notes.append("gauge n/a (shared factor fixes it)")
        else:
            eff_norm = math.sqrt(sum(float(t.norm() ** 2) for t in eff.values()))
            if eff_norm == 0:
                notes.append("gauge n/a (zero effective update)")
            else:
                for orth in (True, False):
                    gauged = apply_gauge(updates, seed=gauge_seed, orthogonal=orth, cond=cond)
                    eff_g = _effective(
                        variant,
                        options,
                        gauged,
                        reference=scenario.reference,
                        init=init,
                        round=round,
                        dtype=dtype,
                    )
                    value = _rel(eff_g, eff)
                    if orth:
                        row.gauge_orthogonal = value
                    else:
                        row.gauge_general = value
        local = aggregators.build(variant.method, **options).client_plan(round).local
        if local - {frozen}:
            notes.append(f"personalised: {','.join(sorted(local - {frozen}))} kept on clients")
    except UnsupportedRanks as exc:
        notes.append(f"unsupported: {exc}")
    except InvalidUpdate as exc:
        notes.append(f"invalid: {exc}")
    row.note = "; ".join(dict.fromkeys(n for n in notes if n))
    return row


def run_fidelity(
    scenarios: Sequence[Scenario],
    variants: Sequence[Variant] | None = None,
    *,
    gauge_seed: int = 1,
    cond: float = 4.0,
    round: int = 2,
) -> list[FidelityRow]:
    """:func:`evaluate` every variant (default :func:`default_variants`) on every scenario."""
    variants = list(variants) if variants is not None else default_variants()
    return [
        evaluate(v, s, gauge_seed=gauge_seed, cond=cond, round=round)
        for s in scenarios
        for v in variants
    ]


# ---------------------------------------------------------------------------- I/O
def _safe_name(client_id: str, i: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", client_id)[:64] or "client"
    return f"{i:04d}_{stem}.safetensors"


def _flat(factors: Mapping[str, LoRAFactors], extra: Mapping[str, Tensor] | None = None) -> dict:
    flat = {}
    for m, f in factors.items():
        flat[f"{m}/A"] = f.A.detach().contiguous().cpu()
        flat[f"{m}/B"] = f.B.detach().contiguous().cpu()
    for name, t in (extra or {}).items():
        flat[f"{_EXTRA}/{name}"] = t.detach().contiguous().cpu()
    return flat


def _unflat(flat: Mapping[str, Tensor]) -> tuple[dict[str, LoRAFactors], dict[str, Tensor]]:
    parts: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    for key, t in flat.items():
        if key.startswith(f"{_EXTRA}/"):
            extra[key[len(_EXTRA) + 1 :]] = t
            continue
        module, _, which = key.rpartition("/")
        if which not in ("A", "B") or not module:
            raise ValueError(f"unexpected key {key!r} in a client-update file")
        parts.setdefault(module, {})[which] = t
    factors = {}
    for m, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"module {m!r} lacks A or B")
        factors[m] = LoRAFactors(A=ab["A"], B=ab["B"])
    return factors, extra


def save_updates(
    updates: Sequence[ClientUpdate],
    directory: str | Path,
    *,
    reference: Mapping[str, LoRAFactors] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save one round of client updates: one safetensors file per client plus ``clients.json``.

    Each client file holds ``<module>/A`` and ``<module>/B`` (folded factors) and, if any,
    ``__extra__/<name>`` tensors. ``clients.json``: ``{"format", "clients": [{"client_id",
    "weight", "file"}], "reference", "meta"}``. ``reference`` (optional) is the global adapter
    the clients received, at the largest rank, saved as ``reference.safetensors``.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, u in enumerate(updates):
        fname = _safe_name(u.client_id, i)
        save_file(_flat(u.factors, u.extra), str(out / fname))
        entries.append({"client_id": u.client_id, "weight": float(u.weight), "file": fname})
    ref_name = None
    if reference is not None:
        ref_name = "reference.safetensors"
        save_file(_flat(reference), str(out / ref_name))
    index = {"format": FORMAT, "clients": entries, "reference": ref_name, "meta": dict(meta or {})}
    (out / "clients.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _index(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "clients.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a client-update directory")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def load_updates(directory: str | Path) -> list[ClientUpdate]:
    """The client updates saved by :func:`save_updates`, in saved order."""
    from safetensors.torch import load_file

    index = _index(directory)
    out = []
    for e in index["clients"]:
        factors, extra = _unflat(load_file(str(Path(directory) / e["file"])))
        out.append(ClientUpdate(str(e["client_id"]), float(e["weight"]), factors, extra))
    return out


def load_reference(directory: str | Path) -> dict[str, LoRAFactors] | None:
    """The received global adapter saved with the updates, or ``None``."""
    from safetensors.torch import load_file

    index = _index(directory)
    if not index.get("reference"):
        return None
    factors, _ = _unflat(load_file(str(Path(directory) / index["reference"])))
    return factors


def updates_scenario(directory: str | Path, *, dtype: torch.dtype = torch.float64) -> Scenario:
    """A :class:`Scenario` from a saved round (cast to ``dtype``; extra tensors dropped)."""
    ups = [
        ClientUpdate(u.client_id, u.weight, {m: f.to(dtype) for m, f in u.factors.items()})
        for u in load_updates(directory)
    ]
    ref = load_reference(directory)
    ref_t = None if ref is None else {m: f.to(dtype) for m, f in ref.items()}
    return Scenario(f"updates:{Path(directory).name}", ups, ref_t, None)


def capture_updates(sim: Any, directory: str | Path, rounds: Sequence[int] | None = None) -> None:
    """Save the client updates each round of a simulation hands to its aggregator.

    Sets ``sim.aggregate_hook`` (a :class:`glora.sim.engine.Simulation`): before aggregating
    round ``t`` in ``rounds`` (default: all), the kept updates and the global adapter the clients
    started from (its readout at the largest client rank) are written with :func:`save_updates`
    to ``directory/round_XXXX``. Use the result with ``glora bench fidelity --updates``.
    """
    agg = sim.agg
    r_max = max(int(r) for r in sim.ranks)
    wanted = None if rounds is None else {int(r) for r in rounds}

    def hook(t: int, updates: Sequence[ClientUpdate]) -> None:
        if wanted is None or t in wanted:
            save_updates(
                updates,
                Path(directory) / f"round_{t:04d}",
                reference=agg.readout(sim.state, r_max),
                meta={"round": t, "method": agg.name, "seed": getattr(sim, "seed", None)},
            )

    sim.aggregate_hook = hook


# ---------------------------------------------------------------------------- output
def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if math.isnan(x):
        return "nan"
    return f"{x:.2e}"


def render_table(rows: Sequence[FidelityRow]) -> list[Any]:
    """One rich table per scenario."""
    from rich.table import Table

    tables = []
    for scen in dict.fromkeys(r.scenario for r in rows):
        sub = [r for r in rows if r.scenario == scen]
        t = Table(title=f"{scen}  (ranks {sub[0].ranks})")
        for col in ("method", "‖eff−ΔW*‖/‖ΔW*‖", "orth. gauge", "general gauge", "note"):
            t.add_column(col, overflow="fold")
        for r in sub:
            t.add_row(
                r.label, _fmt(r.error), _fmt(r.gauge_orthogonal), _fmt(r.gauge_general), r.note
            )
        tables.append(t)
    return tables


def markdown_table(rows: Sequence[FidelityRow]) -> str:
    """The rows as Markdown tables, one per scenario."""
    lines: list[str] = []
    for scen in dict.fromkeys(r.scenario for r in rows):
        sub = [r for r in rows if r.scenario == scen]
        lines += [
            f"**{scen}** (client ranks {sub[0].ranks})",
            "",
            "| method | ‖eff−ΔW*‖/‖ΔW*‖ | orthogonal gauge | general gauge | note |",
            "|---|---|---|---|---|",
        ]
        for r in sub:
            lines.append(
                f"| {r.label} | {_fmt(r.error)} | {_fmt(r.gauge_orthogonal)} "
                f"| {_fmt(r.gauge_general)} | {r.note} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_ranks(text: str) -> list[int]:
    """``"8,8,8,8"`` or ``"8x4"`` (four clients of rank 8) → list of ranks."""
    text = text.strip()
    if "x" in text and "," not in text:
        r, _, n = text.partition("x")
        return [int(r)] * int(n)
    return [int(x) for x in text.split(",") if x.strip()]


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    """``"48x32,40x64"`` → ``{"m0": (48, 32), "m1": (40, 64)}`` (d×k per module)."""
    out = {}
    for i, item in enumerate(x for x in text.split(",") if x.strip()):
        d, _, k = item.strip().partition("x")
        out[f"m{i}"] = (int(d), int(k))
    return out


def build_scenarios(
    *,
    homogeneous: str = "8x4",
    heterogeneous: str = "2,4,8,16",
    shapes: Mapping[str, tuple[int, int]] | None = None,
    seed: int = 0,
    drift: float = 1.0,
    dtype: torch.dtype = torch.float64,
    updates_dirs: Sequence[str | Path] = (),
    random: bool = True,
) -> list[Scenario]:
    """The default scenarios: homogeneous and heterogeneous random ranks, plus saved rounds."""
    out: list[Scenario] = []
    if random:
        for label, spec, s in (
            ("homogeneous", homogeneous, seed),
            ("heterogeneous", heterogeneous, seed + 1),
        ):
            if spec:
                out.append(
                    random_scenario(
                        f"random {label}",
                        parse_ranks(spec),
                        shapes,
                        seed=s,
                        drift=drift,
                        dtype=dtype,
                    )
                )
    out += [updates_scenario(d, dtype=dtype) for d in updates_dirs]
    return out


def rows_to_json(rows: Sequence[FidelityRow]) -> list[dict[str, Any]]:
    """JSON-able rows (NaN → ``None``)."""
    out = []
    for r in rows:
        d = asdict(r)
        for k in ("error", "gauge_orthogonal", "gauge_general"):
            if isinstance(d[k], float) and math.isnan(d[k]):
                d[k] = None
        out.append(d)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m glora.bench.fidelity``: the same command as ``glora bench fidelity``."""
    import typer

    from glora.cli.bench_fidelity import register

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app, standalone=True)
    app(args=list(argv) if argv is not None else None, prog_name="python -m glora.bench.fidelity")


if __name__ == "__main__":
    main()
