"""``glora aggregate`` and ``glora inspect``: server aggregation of PEFT adapters from the shell.

``glora aggregate a/ b/ c/ --method flexlora --rank 8 -o out/`` loads standard PEFT LoRA adapter
directories, treats each as one client's upload (client id = directory name, weight 1 unless
``--weights``), runs one round of the chosen rule and writes the result as a PEFT adapter (or, with
``--merge-into BASE``, as a merged full model). ``glora inspect a/`` prints each module's rank,
``α``, scale, ``‖ΔW‖_F`` and singular values, computed in factored form (gauge-invariant).

Every user error prints a one-paragraph message and exits with code 2; nothing is half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor

from glora.linalg import compress_exact, factored_svd
from glora.peft_io import (
    AdapterError,
    AdapterInfo,
    check_compatible,
    load_adapter,
    peft_module_key,
    save_adapter,
)
from glora.types import ClientUpdate, InvalidUpdate, LoRAFactors, UnsupportedRanks

__all__ = [
    "UsageError",
    "aggregate_adapters",
    "compress_exact",
    "inspect_adapter",
    "parse_set_options",
    "register",
]

#: PEFT task type → transformers Auto class used by ``--merge-into``.
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class UsageError(Exception):
    """A user error of the CLI: printed as a message, exit code 2."""


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(message: str) -> typer.Exit:
    _err_console().print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=2)


# ---------------------------------------------------------------------------- helpers
def parse_set_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["method.server_rank=16", "method.pad=true"]`` → ``{"server_rank": 16, "pad": True}``.

    Values are parsed as YAML scalars (``true``, ``16``, ``0.9``, ``auto``, ``null``).

    Raises:
        UsageError: an item without ``=``, without the ``method.`` prefix, or a non-scalar value.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected method.OPTION=VALUE")
        section, dot, name = key.partition(".")
        if section != "method" or not dot or not name:
            raise UsageError(
                f"--set {item!r}: only method options can be set here; write method.{key}=VALUE"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {item!r}: cannot parse the value: {exc}") from None
        if isinstance(value, (dict, list)):
            raise UsageError(f"--set {item!r}: the value must be a scalar")
        out[name] = value
    return out


def _parse_weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0] * n
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) != n:
        raise UsageError(f"--weights has {len(parts)} value(s) but {n} adapter(s) were given")
    weights = []
    for p in parts:
        try:
            w = float(p)
        except ValueError:
            raise UsageError(f"--weights: {p!r} is not a number") from None
        if not math.isfinite(w) or w <= 0:
            raise UsageError(f"--weights: {p!r} must be a finite number > 0")
        weights.append(w)
    return weights


def _concat(a: LoRAFactors | None, b: LoRAFactors) -> LoRAFactors:
    if a is None:
        return b
    return LoRAFactors(A=torch.cat([a.A, b.A], 0), B=torch.cat([a.B, b.B], 1))


def _unique_ids(infos: Sequence[AdapterInfo]) -> list[str]:
    ids: list[str] = []
    for info in infos:
        base = info.name or str(info.path)
        cid, i = base, 2
        while cid in ids:
            cid, i = f"{base}#{i}", i + 1
        ids.append(cid)
    return ids


def _average_extra(infos: Sequence[AdapterInfo], p: Sequence[float]) -> dict[str, Tensor]:
    keys = set(infos[0].extra_tensors)
    for info in infos[1:]:
        if set(info.extra_tensors) != keys:
            diff = sorted(set(info.extra_tensors) ^ keys)
            raise UsageError(
                f"adapter {str(info.path)!r} has non-LoRA tensors {diff[:3]} that "
                f"{str(infos[0].path)!r} lacks (or vice versa); the adapters must save the same "
                "modules_to_save"
            )
    out: dict[str, Tensor] = {}
    for key in sorted(keys):
        ts = [info.extra_tensors[key] for info in infos]
        for info, t in zip(infos, ts, strict=True):
            if t.shape != ts[0].shape:
                raise UsageError(
                    f"adapter {str(info.path)!r}, non-LoRA tensor {key!r}: shape {tuple(t.shape)} "
                    f"differs from {tuple(ts[0].shape)} in {str(infos[0].path)!r}"
                )
        if not ts[0].is_floating_point():
            out[key] = ts[0]
            continue
        acc = sum((t.to(torch.float64) * w for t, w in zip(ts, p, strict=True)), torch.zeros(()))
        out[key] = acc.to(ts[0].dtype)
    return out


# ---------------------------------------------------------------------------- aggregate
def aggregate_adapters(
    adapter_dirs: Sequence[str | os.PathLike[str]],
    *,
    method: str,
    output: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    options: Mapping[str, Any] | None = None,
    modules: str = "same",
    merge_into: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Aggregate PEFT adapters with one round of ``method`` and write the result to ``output``.

    Returns a summary (method, clients, modules, ranks, what was written).

    Raises:
        UsageError: every user error, with a message for the shell.
    """
    from glora import aggregators

    say = console or Console(highlight=False)
    out = Path(output)
    if out.exists():
        raise UsageError(f"output {str(out)!r} already exists; choose a new directory")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {rank}")
    if modules not in ("same", "intersection"):
        raise UsageError(f"--modules must be 'same' or 'intersection', got {modules!r}")
    try:
        agg = aggregators.build(method, **dict(options or {}))
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    try:
        loaded = [load_adapter(d) for d in adapter_dirs]
        infos = [info for _, info in loaded]
        names = check_compatible(infos, modules=modules)  # type: ignore[arg-type]
    except AdapterError as exc:
        raise UsageError(str(exc)) from None
    if weights is None:
        weights = [1.0] * len(loaded)
    if len(weights) != len(loaded):
        raise UsageError(f"{len(weights)} weight(s) for {len(loaded)} adapter(s)")
    total = float(sum(weights))
    p = [float(w) / total for w in weights]
    dtype = (
        torch.float64
        if all(f.dtype == torch.float64 for fs, _ in loaded for f in fs.values())
        else torch.float32
    )
    ids = _unique_ids(infos)
    updates = [
        ClientUpdate(cid, float(w), {m: fs[m].to(dtype) for m in names})
        for cid, w, (fs, _) in zip(ids, weights, loaded, strict=True)
    ]
    extra = _average_extra(infos, p)

    try:
        state = agg.aggregate(updates)
    except UnsupportedRanks as exc:
        raise UsageError(
            f"{exc}\nHint: pass --set method.pad=true to zero-pad every adapter to the largest "
            "rank, or use a mixed-rank method (glora, flexlora, hetlora, flora)."
        ) from None
    except InvalidUpdate as exc:
        raise UsageError(f"invalid adapters for {method}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{method} failed: {exc}") from None

    has_base = bool(state.base_delta)
    ref = infos[0]
    base_name = next((i.base_model_name_or_path for i in infos if i.base_model_name_or_path), None)
    target_modules: list[str] | str | None = ref.target_modules
    if modules == "intersection" and set(names) != set(ref.ranks):
        target_modules = [peft_module_key(m) for m in names]  # exactly these modules
    if isinstance(target_modules, list):
        target_modules = sorted(target_modules)

    note = None
    if rank is not None:
        readout = agg.readout(state, rank)
        if has_base and merge_into is None:
            raise UsageError(
                f"{method} changes the base weights (state.base_delta), so its result is not a "
                f"rank-{rank} adapter: readout(state, {rank}) alone would drop the base change. "
                "Drop --rank to write the exact effective update as an adapter (of a higher "
                "rank), or pass --merge-into BASE to write a merged full model."
            )
        result = {m: _concat(state.base_delta.get(m), f) for m, f in readout.items()}
        if has_base:
            result = {m: compress_exact(f, min_rank=1) for m, f in result.items()}
    else:
        result = agg.effective_update(state)
        if has_base:
            result = {m: compress_exact(f, min_rank=1) for m, f in result.items()}
            if merge_into is None:
                ranks_out = sorted({f.rank for f in result.values()})
                note = (
                    f"{method} changes the base weights; the adapter written holds the exact "
                    f"effective update base_delta + B@A (rank {ranks_out}), not readout(state) "
                    "alone. Use --merge-into BASE for a merged full model."
                )
    result = {m: f.to(dtype) for m, f in sorted(result.items())}

    if merge_into is not None:
        with_tokenizer = _merge_into(
            merge_into,
            out,
            result,
            base_model_name_or_path=base_name or merge_into,
            target_modules=target_modules,
            task_type=ref.task_type,
            fan_in_fan_out=ref.fan_in_fan_out,
            extra_tensors=extra,
            modules_to_save=ref.modules_to_save,
        )
        written = "merged model" + (" and the base's tokenizer" if with_tokenizer else "")
    else:
        try:
            save_adapter(
                out,
                result,
                base_model_name_or_path=base_name,
                target_modules=target_modules,
                task_type=ref.task_type,
                fan_in_fan_out=ref.fan_in_fan_out,
                extra_tensors=extra,
                modules_to_save=ref.modules_to_save,
            )
        except AdapterError as exc:
            raise UsageError(str(exc)) from None
        written = "adapter"
    if note:
        say.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    out_ranks = sorted({f.rank for f in result.values()})
    summary = (
        f"[green]wrote[/green] {written} {escape(str(out))}: {method} over {len(ids)} adapter(s) "
        f"({', '.join(escape(i) for i in ids)}), {len(result)} module(s), rank {out_ranks}"
    )
    if extra:
        summary += f", {len(extra)} non-LoRA tensor(s) averaged"
    say.print(summary, soft_wrap=True)
    return {
        "method": method,
        "clients": ids,
        "weights": p,
        "modules": list(result),
        "ranks": {m: f.rank for m, f in result.items()},
        "written": written,
        "output": str(out),
    }


def _merge_into(
    base: str,
    out: Path,
    factors: Mapping[str, LoRAFactors],
    *,
    base_model_name_or_path: str,
    target_modules: list[str] | str | None,
    task_type: str | None,
    fan_in_fan_out: bool,
    extra_tensors: Mapping[str, Tensor],
    modules_to_save: list[str] | None,
) -> bool:
    """Write ``base`` + the update as a merged full model (PEFT's ``merge_and_unload``).

    The base's tokenizer, when ``base`` has one, is saved beside the model so the output loads
    like any checkpoint. Returns whether a tokenizer was written.
    """
    import transformers
    from peft import PeftModel

    auto_name = _AUTO_CLASSES.get(str(task_type).upper(), "AutoModel") if task_type else "AutoModel"
    auto_cls = getattr(transformers, auto_name)
    try:
        model = auto_cls.from_pretrained(base)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad model
        raise UsageError(f"cannot load base model {base!r} with {auto_name}: {exc}") from None
    named = dict(model.named_modules())
    for m, f in factors.items():
        key = peft_module_key(m)
        layer = named.get(key)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor):
            raise UsageError(
                f"module {m!r}: the base model {base!r} ({auto_name}) has no layer {key!r}"
            )
        want = (f.k, f.d) if fan_in_fan_out else (f.d, f.k)
        if tuple(weight.shape) != want:
            raise UsageError(
                f"module {m!r}: base weight {tuple(weight.shape)} does not match the update "
                f"{f.d}×{f.k} (fan_in_fan_out={fan_in_fan_out})"
            )
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    tokenizer = None
    try:
        save_adapter(
            work / "adapter",
            factors,
            base_model_name_or_path=base_model_name_or_path,
            target_modules=target_modules,
            task_type=task_type,
            fan_in_fan_out=fan_in_fan_out,
            extra_tensors=extra_tensors,
            modules_to_save=modules_to_save,
        )
        peft_model = PeftModel.from_pretrained(model, str(work / "adapter"))
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(work / "model"))
        tokenizer = _base_tokenizer(base)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(work / "model"))
        os.replace(work / "model", out)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot merge into {base!r}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tokenizer is not None


def _base_tokenizer(base: str) -> Any:
    """The tokenizer stored with ``base``, or None when it has none (a weights-only folder).

    A local folder must hold ``tokenizer_config.json`` or ``tokenizer.json``: given neither,
    transformers may build an empty tokenizer from the model config, which is not the base's.
    """
    from transformers import AutoTokenizer

    local = Path(base)
    if local.is_dir() and not any(
        (local / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(base)
    except Exception:  # no tokenizer files: transformers raises OSError/ValueError/TypeError
        return None


# ---------------------------------------------------------------------------- inspect
def inspect_adapter(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Per-module summary of a PEFT adapter (JSON-able).

    For each module: ``d``, ``k``, ``rank``, ``alpha``, ``scale``, ``fro_norm`` (``‖ΔW‖_F``) and
    ``singular_values`` (descending, ``min(r, d, k)`` of them) of ``ΔW = s·lora_B @ lora_A``,
    computed with :func:`~glora.linalg.factored_svd` (no ``d×k`` matrix; gauge-invariant).
    """
    factors, info = load_adapter(path)
    mods = []
    for m in sorted(factors):
        f = factors[m].to(torch.float64)
        _, S, _ = factored_svd(f.B, f.A)
        mods.append(
            {
                "module": m,
                "d": f.d,
                "k": f.k,
                "rank": info.ranks[m],
                "alpha": info.alphas[m],
                "scale": info.scales[m],
                "fro_norm": float(S.norm()),
                "singular_values": [float(s) for s in S],
            }
        )
    return {
        "path": str(info.path),
        "base_model_name_or_path": info.base_model_name_or_path,
        "task_type": info.task_type,
        "target_modules": info.target_modules,
        "fan_in_fan_out": info.fan_in_fan_out,
        "use_rslora": info.use_rslora,
        "modules_to_save": info.modules_to_save,
        "modules": mods,
        "extra_tensors": {k: list(t.shape) for k, t in sorted(info.extra_tensors.items())},
    }


def _print_inspect(data: Mapping[str, Any], console: Console) -> None:
    table = Table(title=f"{data['path']} (base: {data['base_model_name_or_path']})")
    for col in ("module", "d×k", "r", "α", "scale", "‖ΔW‖_F", "singular values"):
        left = col in ("module", "singular values")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    for row in data["modules"]:
        sv = row["singular_values"]
        shown = ", ".join(f"{s:.3g}" for s in sv[:6]) + (" …" if len(sv) > 6 else "")
        table.add_row(
            escape(row["module"]),
            f"{row['d']}×{row['k']}",
            str(row["rank"]),
            f"{row['alpha']:g}",
            f"{row['scale']:.4g}",
            f"{row['fro_norm']:.4g}",
            shown,
        )
    console.print(table)
    extras = data["extra_tensors"]
    flags = f"fan_in_fan_out={data['fan_in_fan_out']}, use_rslora={data['use_rslora']}"
    console.print(f"task_type={data['task_type']}, {flags}, non-LoRA tensors: {len(extras)}")
    for key, shape in extras.items():
        console.print(f"  {escape(key)} {tuple(shape)}")


# ---------------------------------------------------------------------------- typer
def register(app: typer.Typer) -> None:
    """Add ``aggregate`` and ``inspect`` to ``app``."""

    @app.command("aggregate")
    def aggregate_cmd(
        adapters: Annotated[
            list[Path], typer.Argument(help="PEFT LoRA adapter directories (one per client).")
        ],
        method: Annotated[str, typer.Option("--method", "-m", help="Aggregation rule name.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Output directory (new).")],
        weights: Annotated[
            str | None, typer.Option(help="Comma-separated client weights (default 1 each).")
        ] = None,
        rank: Annotated[
            int | None, typer.Option(help="Rank of the written adapter (default: the method's).")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Method option, e.g. method.server_rank=16 (repeatable)."),
        ] = None,
        modules: Annotated[
            str, typer.Option(help="'same' (default) or 'intersection' of the adapters' modules.")
        ] = "same",
        merge_into: Annotated[
            str | None,
            typer.Option(
                help="Base model dir/id: write a merged full model instead of an adapter."
            ),
        ] = None,
    ) -> None:
        """Aggregate PEFT LoRA adapters with one round of a federated rule; write a PEFT adapter."""
        try:
            options = parse_set_options(set_)
            w = _parse_weights(weights, len(adapters))
            aggregate_adapters(
                adapters,
                method=method,
                output=output,
                weights=w,
                rank=rank,
                options=options,
                modules=modules,
                merge_into=merge_into,
            )
        except UsageError as exc:
            raise _fail(str(exc)) from None

    @app.command("inspect")
    def inspect_cmd(
        adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory.")],
        as_json: Annotated[
            bool, typer.Option("--json", help="Print JSON instead of a table.")
        ] = False,
    ) -> None:
        """Show each module's rank, α, scale, ‖ΔW‖_F and singular values (factored SVD)."""
        try:
            data = inspect_adapter(adapter)
        except AdapterError as exc:
            raise _fail(str(exc)) from None
        if as_json:
            typer.echo(json.dumps(data, indent=2))
        else:
            _print_inspect(data, Console(highlight=False))
