"""Server-aggregation benchmark: time and peak extra memory of one server round per method.

A *server round* is ``agg.aggregate(updates)`` followed by one ``agg.readout(state, r)`` per
distinct client rank ``r`` (each readout is dropped once computed, as a server that has sent it
would). Every method runs in a fresh Python subprocess, so its peak resident memory is its own:

1. the subprocess sets the torch thread count, warms the method up on a tiny round (imports,
   BLAS/LAPACK initialisation), then builds the random client updates (seeded; ``B`` non-zero)
   and records its resident set size — the *baseline*;
2. for each of ``repeats`` rounds it builds a fresh aggregator, resets the kernel's peak-RSS
   mark (``/proc/self/clear_refs``; falls back to ``ru_maxrss``), times the round with
   ``time.perf_counter`` and reads the peak (``VmHWM``);
3. it reports the median round time and the largest ``peak − baseline`` over the repeats, next
   to the size of the client factors it aggregated.

Methods defined for one rank run with ``pad=True`` (zero-padding to the round's largest rank).
FlexLoRA forms a dense ``d×k`` matrix and a full SVD per module, so it runs on
``flexlora_modules`` modules only and is compared per module.

Run it as ``glora bench aggregation`` or ``python -m glora.bench.aggregation`` (same options).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_METHODS",
    "DENSE_METHODS",
    "BenchConfig",
    "client_ranks",
    "equivalent_command",
    "evaluate_targets",
    "make_updates",
    "measure_method",
    "render_report",
    "run_benchmark",
]

#: Methods benchmarked by default, in table order (all built-in rules).
DEFAULT_METHODS: tuple[str, ...] = (
    "glora",
    "fedit",
    "hetlora",
    "flexlora",
    "flora",
    "fedex",
    "ffa",
    "fedsa",
    "lorafair",
    "rolora",
    "fedrot",
    "florana",
)

#: Methods that form a dense ``d×k`` matrix per module: run on ``flexlora_modules`` modules.
DENSE_METHODS: frozenset[str] = frozenset({"flexlora"})

_DTYPES = ("float32", "float64")
_MB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BenchConfig:
    """Options of one benchmark run (the CLI's options, validated).

    Attributes:
        modules: number of LoRA modules (all ``d×k``).
        d: output features of every module (rows of ``B``).
        k: input features of every module (columns of ``A``).
        clients: clients in the round.
        ranks: client ranks are drawn (seeded, uniformly) from these values.
        dtype: ``"float32"`` or ``"float64"``.
        methods: registry names to benchmark, in table order.
        repeats: rounds per method (fresh aggregator each); the median time is reported.
        flexlora_modules: modules the dense methods (FlexLoRA) run on.
        seed: seed of the client ranks, weights and factors.
        threads: torch threads in each method's subprocess.
        options: method → extra constructor options (e.g. ``{"glora": {"consensus": "gram"}}``).
        timeout: seconds allowed per method subprocess (``None`` = no limit).
    """

    modules: int = 128
    d: int = 4096
    k: int = 4096
    clients: int = 20
    ranks: tuple[int, ...] = (4, 8, 16)
    dtype: str = "float32"
    methods: tuple[str, ...] = DEFAULT_METHODS
    repeats: int = 3
    flexlora_modules: int = 2
    seed: int = 0
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("modules", "d", "k", "clients", "repeats", "flexlora_modules", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.ranks or any(
            isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.ranks
        ):
            raise ValueError(f"ranks must be positive integers, got {self.ranks!r}")
        if max(self.ranks) > min(self.d, self.k):
            raise ValueError(f"rank {max(self.ranks)} exceeds min(d, k) = {min(self.d, self.k)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not self.methods:
            raise ValueError("no methods to benchmark")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")

    def modules_for(self, method: str) -> int:
        """Modules that ``method`` runs on (fewer for the dense methods)."""
        return min(self.flexlora_modules, self.modules) if method in DENSE_METHODS else self.modules


def equivalent_command(config: BenchConfig) -> str:
    """A ``glora bench aggregation`` command line that reproduces ``config`` exactly."""
    parts = [
        "glora",
        "bench",
        "aggregation",
        f"--modules {config.modules}",
        f"--d {config.d}",
        f"--k {config.k}",
        f"--clients {config.clients}",
        f"--ranks {','.join(map(str, config.ranks))}",
        f"--dtype {config.dtype}",
        f"--methods {','.join(config.methods)}",
        f"--repeats {config.repeats}",
        f"--flexlora-modules {config.flexlora_modules}",
        f"--seed {config.seed}",
        f"--threads {config.threads}",
    ]
    for method, opts in config.options.items():
        for key, value in opts.items():
            parts.append(f"--set {shlex.quote(f'{method}.{key}={json.dumps(value)}')}")
    if config.timeout is not None:
        parts.append(f"--timeout {config.timeout:g}")
    return " ".join(parts)


# ---------------------------------------------------------------------------- client updates
def client_ranks(clients: int, ranks: Sequence[int], seed: int) -> list[int]:
    """Per-client ranks drawn uniformly (seeded) from ``ranks``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ranks), (clients,), generator=gen)
    return [int(ranks[int(i)]) for i in idx]


def module_names(modules: int) -> list[str]:
    """PEFT-style names of the benchmark's modules."""
    projs = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [f"base_model.model.layers.{m // 4}.self_attn.{projs[m % 4]}" for m in range(modules)]


def make_updates(
    *,
    modules: int,
    d: int,
    k: int,
    ranks: Sequence[int],
    dtype: str = "float32",
    seed: int = 0,
) -> list[Any]:
    """Random client updates: client ``i`` has rank ``ranks[i]`` in every module.

    ``A`` has i.i.d. ``N(0, 1/k)`` entries and ``B`` i.i.d. ``N(0, 0.01²)`` (non-zero, as after
    local training); weights are seeded example counts. Module ``m``'s factors depend only on
    ``(seed, m)``, so a run on fewer modules sees the same first modules.
    """
    import torch

    from glora.types import ClientUpdate, LoRAFactors

    tdtype = getattr(torch, dtype)
    names = module_names(modules)
    gen = torch.Generator().manual_seed(seed)
    weights = [float(w) for w in torch.randint(100, 1000, (len(ranks),), generator=gen)]
    per_client: list[dict[str, Any]] = [{} for _ in ranks]
    for m, name in enumerate(names):
        g = torch.Generator().manual_seed(seed * 1_000_003 + m + 1)
        for i, r in enumerate(ranks):
            A = torch.randn(r, k, generator=g, dtype=tdtype) / math.sqrt(k)
            B = torch.randn(d, r, generator=g, dtype=tdtype) * 0.01
            per_client[i][name] = LoRAFactors(A=A, B=B)
    return [
        ClientUpdate(client_id=f"c{i:03d}", weight=weights[i], factors=per_client[i])
        for i in range(len(ranks))
    ]


def factor_bytes(updates: Sequence[Any]) -> int:
    """Total bytes of all clients' factors (``A`` and ``B`` of every module)."""
    return sum(f.nbytes() for u in updates for f in u.factors.values())


# ---------------------------------------------------------------------------- memory probes
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size (``VmRSS``; ``ru_maxrss`` where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else _ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss` (``VmHWM``)."""
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


# ---------------------------------------------------------------------------- one method
def _round(agg: Any, updates: Sequence[Any], distinct_ranks: Sequence[int]) -> Any:
    """One server round: aggregate, then one readout per distinct client rank."""
    state = agg.aggregate(updates)
    for r in distinct_ranks:
        out = agg.readout(state, r)
        del out
    return state


def measure_method(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Benchmark one method in *this* process (call it in a fresh one; see the module doc).

    ``spec`` holds ``method``, ``modules``, ``d``, ``k``, ``ranks`` (per client), ``dtype``,
    ``seed``, ``repeats``, ``threads``, ``options`` and ``pad``.
    """
    import torch

    from glora import aggregators

    torch.set_num_threads(int(spec["threads"]))
    method = str(spec["method"])
    opts = dict(spec.get("options") or {})
    if spec.get("pad"):
        opts["pad"] = True
    ranks = [int(r) for r in spec["ranks"]]
    distinct = sorted(set(ranks))

    # Warm-up on a tiny round of the same rank pattern: imports, BLAS/LAPACK initialisation.
    small = max(ranks)
    tiny = make_updates(
        modules=2, d=2 * small, k=2 * small + 1, ranks=ranks, dtype=spec["dtype"], seed=99
    )
    _round(aggregators.build(method, **opts), tiny, distinct)
    del tiny

    updates = make_updates(
        modules=int(spec["modules"]),
        d=int(spec["d"]),
        k=int(spec["k"]),
        ranks=ranks,
        dtype=spec["dtype"],
        seed=int(spec["seed"]),
    )
    client_bytes = factor_bytes(updates)
    gc.collect()
    baseline = rss_bytes()

    times: list[float] = []
    cpu_times: list[float] = []
    peaks: list[int] = []
    peak_source = "VmHWM (reset per repeat)"
    diagnostics: dict[str, Any] = {}
    for rep in range(int(spec["repeats"])):
        agg = aggregators.build(method, **opts)
        gc.collect()
        if not reset_peak_rss():
            peak_source = "ru_maxrss (lifetime peak; first repeat only is exact)"
        c0, t0 = time.process_time(), time.perf_counter()
        state = _round(agg, updates, distinct)
        elapsed = time.perf_counter() - t0
        cpu_times.append(time.process_time() - c0)
        peak = peak_rss_bytes()
        times.append(elapsed)
        peaks.append(peak - baseline)
        if rep == 0:
            diagnostics = {
                key: state.diagnostics[key]
                for key in ("proj_error_rel", "server_rank_mean", "server_rank_max")
                if key in state.diagnostics
            }
        del agg, state
        gc.collect()

    round_s = statistics.median(times)
    modules = int(spec["modules"])
    extra = max(max(peaks), 0)
    return {
        "method": method,
        "status": "ok",
        "pad": bool(spec.get("pad")),
        "options": opts,
        "modules": modules,
        "times_s": times,
        "round_s": round_s,
        "per_module_ms": 1000.0 * round_s / modules,
        "cpu_times_s": cpu_times,
        "cpu_s": statistics.median(cpu_times),
        "baseline_rss_bytes": baseline,
        "peak_extra_bytes": extra,
        "peak_extra_bytes_per_repeat": peaks,
        "peak_source": peak_source,
        "client_factor_bytes": client_bytes,
        "extra_over_client": extra / client_bytes if client_bytes else math.nan,
        "ru_maxrss_bytes": _ru_maxrss_bytes(),
        "threads": torch.get_num_threads(),
        "diagnostics": diagnostics,
    }


def _worker_main() -> None:
    """Subprocess entry: a JSON spec on stdin → the JSON result of :func:`measure_method`."""
    spec = json.loads(sys.stdin.read())
    result = measure_method(spec)
    sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")
    sys.stdout.flush()


def _run_in_subprocess(spec: Mapping[str, Any], timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, "-c", "from glora.bench.aggregation import _worker_main; _worker_main()"]
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    try:
        proc = subprocess.run(
            cmd,
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"error: timed out after {timeout:g} s"}
    marker = "@@RESULT@@"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    last = tail[-1] if tail else f"exit code {proc.returncode}"
    return {"status": f"error: {last}"}


# ---------------------------------------------------------------------------- the benchmark
def _availability(method: str) -> tuple[bool, bool, str]:
    """``(available, native_mixed_ranks, reason)`` of a registry name."""
    from glora import aggregators

    try:
        cls = aggregators.get_class(method)
    except (ValueError, ImportError, AttributeError) as exc:
        return False, False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return True, bool(getattr(cls, "mixed_ranks", False)), ""


def run_benchmark(
    config: BenchConfig,
    *,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every method of ``config`` in its own subprocess and return the JSON-able report."""
    import torch

    ranks = client_ranks(config.clients, config.ranks, config.seed)
    results: list[dict[str, Any]] = []
    for method in config.methods:
        available, native, reason = _availability(method)
        modules = config.modules_for(method)
        row: dict[str, Any] = {"method": method, "modules": modules}
        if not available:
            row.update(status="not available", reason=reason)
            results.append(row)
            if progress:
                progress(f"{method}: not available ({reason})")
            continue
        spec = {
            "method": method,
            "modules": modules,
            "d": config.d,
            "k": config.k,
            "ranks": ranks,
            "dtype": config.dtype,
            "seed": config.seed,
            "repeats": config.repeats,
            "threads": config.threads,
            "options": dict(config.options.get(method, {})),
            "pad": not native,
        }
        if progress:
            progress(f"{method}: {modules} module(s), {config.repeats} repeat(s) ...")
        row.update(_run_in_subprocess(spec, config.timeout))
        row.setdefault("pad", not native)
        results.append(row)
        if progress:
            status = row.get("status")
            if status == "ok":
                progress(f"{method}: round {row['round_s']:.3f} s")
            else:
                progress(f"{method}: {status}")
    return {
        "benchmark": "server-aggregation",
        "command": command,
        "equivalent_command": equivalent_command(config),
        "config": {**asdict(config), "options": {m: dict(o) for m, o in config.options.items()}},
        "client_ranks": ranks,
        "distinct_ranks": sorted(set(ranks)),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "available_cores": len(os.sched_getaffinity(0)),
            "threads": config.threads,
        },
        "results": results,
        "targets": evaluate_targets(results),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def evaluate_targets(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The three target ratios of the aggregation core, each with PASS / FAIL / n/a.

    * GLoRA round time ≤ 3 × FedIT round time;
    * FlexLoRA time per module ≥ 100 × GLoRA time per module;
    * GLoRA peak extra memory ≤ the size of the client factors.

    Verdicts use wall-clock times. The time targets also carry ``ratio_cpu``, the same ratio of
    process CPU times (for information: less sensitive to other load on a shared machine).
    """
    ok = {r["method"]: r for r in results if r.get("status") == "ok"}
    glora, fedit, flex = ok.get("glora"), ok.get("fedit"), ok.get("flexlora")

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    def per_module_cpu(row: Mapping[str, Any] | None) -> float | None:
        if row is None or "cpu_s" not in row:
            return None
        return float(row["cpu_s"]) / int(row["modules"])

    def target(
        name: str, ratio: float | None, limit: float, at_most: bool, ratio_cpu: float | None
    ) -> dict[str, Any]:
        if ratio is None or not math.isfinite(ratio):
            verdict = "n/a"
        else:
            verdict = "PASS" if (ratio <= limit if at_most else ratio >= limit) else "FAIL"
        bound = f"{'≤' if at_most else '≥'} {limit:g}"
        return {
            "target": name,
            "ratio": ratio,
            "ratio_cpu": ratio_cpu,
            "bound": bound,
            "verdict": verdict,
        }

    both = glora is not None and fedit is not None
    dense = glora is not None and flex is not None
    return [
        target(
            "GLoRA round / FedIT round",
            div(glora["round_s"], fedit["round_s"]) if both else None,
            3.0,
            True,
            div(glora.get("cpu_s"), fedit.get("cpu_s")) if both else None,
        ),
        target(
            "FlexLoRA per module / GLoRA per module",
            div(flex["per_module_ms"], glora["per_module_ms"]) if dense else None,
            100.0,
            False,
            div(per_module_cpu(flex), per_module_cpu(glora)) if dense else None,
        ),
        target(
            "GLoRA peak extra memory / client factor size",
            div(glora["peak_extra_bytes"], glora["client_factor_bytes"]) if glora else None,
            1.0,
            True,
            None,
        ),
    ]


# ---------------------------------------------------------------------------- output
def render_report(report: Mapping[str, Any], console: Any | None = None) -> None:
    """Print the report as rich tables (results, targets) plus the command lines."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = report["config"]
    env = report["environment"]
    ranks = report["client_ranks"]
    counts = ", ".join(f"r={r}: {ranks.count(r)}" for r in sorted(set(ranks)))
    console.print(f"[bold]command:[/bold] {report.get('command') or report['equivalent_command']}")
    console.print(f"[bold]equivalent:[/bold] {report['equivalent_command']}")
    console.print(
        f"shape: {cfg['modules']} modules of {cfg['d']}×{cfg['k']} ({cfg['dtype']}), "
        f"{cfg['clients']} clients ({counts}); torch threads: {env['threads']} "
        f"(available cores: {env['available_cores']}); torch {env['torch']}; CPU: {env['cpu']}"
    )
    table = Table(
        title="Server round: aggregate + one readout per distinct client rank",
        caption="ranks: native = mixed ranks supported; pad = one-rank method run with pad=True "
        "(zero-padded to r_max). CPU s = process CPU time of the round (all threads). "
        "extra = peak RSS in the round − RSS with the updates built.",
    )
    for col, justify in (
        ("method", "left"),
        ("ranks", "left"),
        ("modules", "right"),
        ("round s", "right"),
        ("CPU s", "right"),
        ("ms/module", "right"),
        ("peak extra MB", "right"),
        ("factors MB", "right"),
        ("extra/factors", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in report["results"]:
        if row.get("status") != "ok":
            table.add_row(row["method"], "", str(row.get("modules", "")), row.get("status", "?"))
            continue
        table.add_row(
            row["method"],
            "pad" if row["pad"] else "native",
            str(row["modules"]),
            f"{row['round_s']:.3f}",
            f"{row['cpu_s']:.3f}",
            f"{row['per_module_ms']:.2f}",
            f"{row['peak_extra_bytes'] / _MB:.1f}",
            f"{row['client_factor_bytes'] / _MB:.1f}",
            f"{row['extra_over_client']:.2f}",
        )
    console.print(table)
    dense = [
        r for r in report["results"] if r["method"] in DENSE_METHODS and r.get("status") == "ok"
    ]
    for row in dense:
        full = row["per_module_ms"] * cfg["modules"] / 1000.0
        console.print(
            f"{row['method']} ran on {row['modules']} of {cfg['modules']} modules; "
            f"extrapolated full round ≈ {full:.1f} s"
        )
    targets = Table(title="Targets (measured in this run)")
    for col in ("target", "ratio", "bound", "verdict", "ratio of CPU times"):
        targets.add_column(col)
    for t in report["targets"]:
        style = {"PASS": "green", "FAIL": "red"}.get(t["verdict"], "yellow")
        targets.add_row(
            t["target"],
            _fmt_ratio(t["ratio"]),
            t["bound"],
            f"[{style}]{t['verdict']}[/{style}]",
            _fmt_ratio(t.get("ratio_cpu"), missing="—"),
        )
    console.print(targets)


def _fmt_ratio(value: float | None, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.3g}"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The results and targets as Markdown (for ``docs/benchmarks.md``)."""
    lines = [
        "| method | ranks | modules | round s | CPU s | per-module ms | peak extra MB "
        "| extra / client factors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['method']} | {row.get('status')} | | | | | | |")
            continue
        lines.append(
            f"| {row['method']} | {'pad' if row['pad'] else 'native'} | {row['modules']} "
            f"| {row['round_s']:.3f} | {row['cpu_s']:.3f} | {row['per_module_ms']:.2f} "
            f"| {row['peak_extra_bytes'] / _MB:.1f} | {row['extra_over_client']:.2f} |"
        )
    lines += [
        "",
        "| target | ratio (wall) | bound | verdict | ratio of CPU times |",
        "|---|---:|---|---|---:|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {_fmt_ratio(t['ratio'])} | {t['bound']} | {t['verdict']} "
            f"| {_fmt_ratio(t.get('ratio_cpu'), missing='—')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """``python -m glora.bench.aggregation``: the same options as ``glora bench aggregation``."""
    import typer

    from glora.cli.bench import aggregation

    typer.run(aggregation)


if __name__ == "__main__":
    main()
