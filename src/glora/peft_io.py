"""Reading and writing standard PEFT LoRA adapter directories.

A PEFT adapter directory holds ``adapter_config.json`` (a :class:`peft.LoraConfig`) and
``adapter_model.safetensors`` (or the legacy ``adapter_model.bin``). Its LoRA tensors are keyed
``<module>.lora_A.weight`` (``r×k``) and ``<module>.lora_B.weight`` (``d×r``), where ``<module>`` is
the prefix written by PEFT's ``get_peft_model_state_dict`` (e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query``); that prefix is glora's module
name. Every other tensor (a classifier saved through ``modules_to_save``, trained biases) is a
*non-LoRA tensor* kept by key.

Conventions:

* :func:`load_adapter` folds the LoRA scale ``s = α/r`` (``α/√r`` with rsLoRA, per module after
  ``rank_pattern`` / ``alpha_pattern``) into ``B``: ``LoRAFactors(A=lora_A, B=s·lora_B)``.
* ``A`` and ``B`` are told apart by key name only, never by shape.
* ``fan_in_fan_out=True`` (GPT-2 ``Conv1D``): the *base* weight is stored ``k×d`` (in × out), but
  PEFT's ``lora_A``/``lora_B`` are plain ``nn.Linear`` weights in the ``d×k`` (out × in)
  convention and PEFT merges ``(s·lora_B @ lora_A)ᵀ`` into the base weight. The factors are
  therefore already in glora's ``d×k`` convention and need no transposition; the flag is kept in
  :class:`AdapterInfo` and written back by :func:`save_adapter` so that PEFT merges them
  transposed. Layer shapes reported here are always ``(d, k)`` = (out, in).
* :func:`save_adapter` writes ``r = max rank``, ``lora_alpha = r`` (scale 1, ``lora_B = B``) and
  per-module ``rank_pattern`` / ``alpha_pattern`` entries for modules of another rank, keyed by
  the escaped full module path so that PEFT's pattern rule matches exactly that module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from glora.fileio import staged_dir
from glora.types import LoRAFactors, fold, lora_scale

__all__ = [
    "ADAPTER_BIN",
    "ADAPTER_CONFIG",
    "ADAPTER_SAFETENSORS",
    "AdapterError",
    "AdapterInfo",
    "IncompatibleAdapters",
    "check_compatible",
    "load_adapter",
    "pattern_key",
    "peft_module_key",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

#: State-dict prefixes PEFT puts before the base model's own module path.
_PEFT_PREFIXES = ("base_model.model.", "base_model.")
_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"
#: Config options that change what the saved tensors mean; glora refuses them.
_UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA) adapters",
    "lora_bias": "LoRA adapters with a bias on lora_B (lora_bias=True)",
    "use_qalora": "QALoRA adapters",
    "alora_invocation_tokens": "activated LoRA (aLoRA) adapters",
    "arrow_config": "Arrow routing adapters",
    "kasa_config": "KaSA adapters",
    "monteclora_config": "MonteCLoRA adapters",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) adapters",
    "target_parameters": "adapters on nn.Parameter targets (target_parameters)",
    "layer_replication": "adapters with layer_replication",
}


class AdapterError(ValueError):
    """A PEFT adapter directory that cannot be read or written (the message says why)."""


class IncompatibleAdapters(AdapterError):
    """Adapters that cannot be aggregated together (names the adapter, module and difference)."""


@dataclass
class AdapterInfo:
    """Metadata of one PEFT LoRA adapter.

    Attributes:
        path: the adapter directory.
        base_model_name_or_path: the base model the adapter was trained on (may be None).
        task_type: PEFT task type (e.g. ``"SEQ_CLS"``, ``"CAUSAL_LM"``) or None.
        target_modules: the config's ``target_modules`` (a list of names or a regex string).
        fan_in_fan_out: True for ``Conv1D`` bases whose weight is stored ``k×d`` (GPT-2).
        use_rslora: scale ``α/√r`` instead of ``α/r``.
        ranks: module → rank ``r`` (after ``rank_pattern``).
        alphas: module → ``α`` (after ``alpha_pattern``).
        scales: module → the LoRA scale folded into ``B``.
        shapes: module → ``(d, k)`` of the adapted weight (out × in).
        modules_to_save: the config's ``modules_to_save`` (or None).
        extra_tensors: non-LoRA tensors by state-dict key
            (e.g. ``base_model.model.classifier.weight``).
        config: the raw ``adapter_config.json`` content.
    """

    path: Path
    base_model_name_or_path: str | None
    task_type: str | None
    target_modules: list[str] | str | None
    fan_in_fan_out: bool
    use_rslora: bool
    ranks: dict[str, int]
    alphas: dict[str, float]
    scales: dict[str, float]
    shapes: dict[str, tuple[int, int]]
    modules_to_save: list[str] | None
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        """Module names, sorted."""
        return sorted(self.ranks)

    @property
    def name(self) -> str:
        """The directory name (used as the client id by the CLI)."""
        return self.path.name


def peft_module_key(module: str) -> str:
    """The base model's own module path: ``module`` without PEFT's ``base_model.model.`` prefix.

    This is the key PEFT matches ``rank_pattern`` / ``alpha_pattern`` against.
    """
    for prefix in _PEFT_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


def pattern_key(pattern_keys: Sequence[str], module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key PEFT applies to ``module`` (None: no pattern).

    Uses PEFT's own rule (``peft.utils.other.get_pattern_key``: the first key ``p`` with
    ``re.match(rf"(.*\\.)?({p})$", key)``) on the module's path without the PEFT prefix.
    """
    from peft.utils.other import get_pattern_key

    key = peft_module_key(module)
    found = get_pattern_key(list(pattern_keys), key)
    return found if found in pattern_keys else None


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise AdapterError(f"{str(path)!r} is not a directory (expected a PEFT adapter directory)")
    if not cfg_path.is_file():
        raise AdapterError(
            f"{str(path)!r} has no {ADAPTER_CONFIG}: not a PEFT adapter directory "
            "(save one with PeftModel.save_pretrained)"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {str(cfg_path)!r}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{str(cfg_path)!r} must hold a JSON object, got {type(cfg).__name__}")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{str(path)!r} is a {cfg.get('peft_type')!r} adapter; glora reads LoRA adapters only "
            "(peft_type 'LORA')"
        )
    for option, what in _UNSUPPORTED_OPTIONS.items():
        value = cfg.get(option)
        if value not in (None, False, [], {}, ""):
            raise AdapterError(
                f"{str(path)!r}: {what} are not supported ({option}={value!r}); "
                "glora aggregates plain LoRA updates ΔW = s·B@A"
            )
    for option in ("r", "lora_alpha"):
        value = cfg.get(option)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(
                f"{str(cfg_path)!r}: {option} must be a positive number, got {value!r}"
            )
    return cfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    st, bin_ = path / ADAPTER_SAFETENSORS, path / ADAPTER_BIN
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st), device="cpu")
        if bin_.is_file():
            data = torch.load(str(bin_), map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
                raise AdapterError(f"{str(bin_)!r} does not hold a state dict of tensors")
            return dict(data)
    except AdapterError:
        raise
    except Exception as exc:  # safetensors / pickle errors have many types
        raise AdapterError(f"cannot read the adapter weights in {str(path)!r}: {exc}") from None
    raise AdapterError(f"{str(path)!r} has neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}")


def load_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, LoRAFactors], AdapterInfo]:
    """Read a PEFT LoRA adapter directory.

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
            ``adapter_model.bin``, read with ``torch.load(weights_only=True)``).

    Returns:
        ``(factors, info)``: module → folded :class:`LoRAFactors` (``A`` ``r×k``, ``B`` ``d×r``,
        ``B @ A`` = PEFT's delta weight in the ``d×k`` out×in convention), float32 unless the
        adapter is stored in float64; and the adapter's :class:`AdapterInfo`.

    Raises:
        AdapterError: missing files, unreadable JSON or weights, a non-LoRA or unsupported adapter
            type (DoRA, ...), a module with ``lora_A`` but no ``lora_B`` (or vice versa), or
            tensors whose rank disagrees with the config.
    """
    p = Path(path)
    cfg = _read_config(p)
    tensors = _read_tensors(p)
    rank_pattern: dict[str, int] = dict(cfg.get("rank_pattern") or {})
    alpha_pattern: dict[str, float] = dict(cfg.get("alpha_pattern") or {})
    use_rslora = bool(cfg.get("use_rslora", False))

    a_keys = {k[: -len(_LORA_A)]: k for k in tensors if k.endswith(_LORA_A)}
    b_keys = {k[: -len(_LORA_B)]: k for k in tensors if k.endswith(_LORA_B)}
    lora_keys = set(a_keys.values()) | set(b_keys.values())
    lora_like = [k for k in tensors if ".lora_" in k and k not in lora_keys]
    if lora_like:
        raise AdapterError(
            f"{str(p)!r}: unsupported LoRA tensor {lora_like[0]!r} (embedding/DoRA/other LoRA "
            "variants are not supported; expected only '<module>.lora_A.weight' and "
            "'<module>.lora_B.weight')"
        )
    if set(a_keys) != set(b_keys):
        odd = sorted(set(a_keys) ^ set(b_keys))[0]
        has = "lora_A" if odd in a_keys else "lora_B"
        raise AdapterError(f"{str(p)!r}, module {odd!r}: has {has} but not its partner factor")
    if not a_keys:
        raise AdapterError(f"{str(p)!r} holds no LoRA tensors ('<module>.lora_A.weight')")

    factors: dict[str, LoRAFactors] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    scales: dict[str, float] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for module in sorted(a_keys):
        lora_A, lora_B = tensors[a_keys[module]], tensors[b_keys[module]]
        if lora_A.dim() != 2 or lora_B.dim() != 2:
            raise AdapterError(
                f"{str(p)!r}, module {module!r}: lora_A {tuple(lora_A.shape)} / lora_B "
                f"{tuple(lora_B.shape)} are not matrices (only Linear/Conv1D layers are supported)"
            )
        rkey = pattern_key(list(rank_pattern), module)
        akey = pattern_key(list(alpha_pattern), module)
        r = int(rank_pattern[rkey]) if rkey is not None else int(cfg["r"])
        alpha = float(alpha_pattern[akey]) if akey is not None else float(cfg["lora_alpha"])
        if lora_A.shape[0] != r or lora_B.shape[1] != r:
            raise AdapterError(
                f"{str(p)!r}, module {module!r}: the config gives rank {r} but lora_A has "
                f"{lora_A.shape[0]} rows and lora_B has {lora_B.shape[1]} columns"
            )
        dtype = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
        s = lora_scale(alpha, r, use_rslora=use_rslora)
        factors[module] = fold(lora_A.to(dtype), lora_B.to(dtype), s)
        ranks[module], alphas[module], scales[module] = r, alpha, s
        shapes[module] = (int(lora_B.shape[0]), int(lora_A.shape[1]))

    info = AdapterInfo(
        path=p,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type"),
        target_modules=cfg.get("target_modules"),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        use_rslora=use_rslora,
        ranks=ranks,
        alphas=alphas,
        scales=scales,
        shapes=shapes,
        modules_to_save=cfg.get("modules_to_save"),
        extra_tensors={k: v for k, v in tensors.items() if k not in lora_keys},
        config=cfg,
    )
    return factors, info


def save_adapter(
    path: str | os.PathLike[str],
    factors: Mapping[str, LoRAFactors],
    *,
    base_model_name_or_path: str | None,
    target_modules: list[str] | str | None,
    task_type: str | None = None,
    fan_in_fan_out: bool = False,
    extra_tensors: Mapping[str, Tensor] | None = None,
    modules_to_save: list[str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``factors`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads.

    The config has ``r`` = the largest module rank and ``lora_alpha = r`` (scale 1, so
    ``lora_B = B``); modules of another rank get ``rank_pattern``/``alpha_pattern`` entries keyed by
    their escaped full path. The directory is written next to ``path`` under a temporary name and
    renamed into place, so a failure never leaves a half-written adapter.

    Args:
        path: the directory to create.
        factors: module (PEFT state-dict prefix) → folded factors (``A`` ``r×k``, ``B`` ``d×r``).
        base_model_name_or_path: recorded in the config (PEFT loads the base from it).
        target_modules: the config's ``target_modules``; None → the modules' last name parts.
        task_type: PEFT task type, e.g. ``"SEQ_CLS"``.
        fan_in_fan_out: True for ``Conv1D`` bases (GPT-2); the factors stay ``d×k``.
        extra_tensors: non-LoRA tensors written under their keys (e.g. a classifier).
        modules_to_save: the config's ``modules_to_save``.
        overwrite: replace an existing ``path`` (default: refuse).

    Raises:
        AdapterError: no factors, a bad factor, or ``path`` exists and ``overwrite`` is False.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(path)
    if not factors:
        raise AdapterError("no LoRA modules to save")
    if out.exists() and not overwrite:
        raise AdapterError(f"{str(out)!r} already exists; choose a new output directory")
    ranks: dict[str, int] = {}
    tensors: dict[str, Tensor] = {}
    for module, f in factors.items():
        if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1] or f.rank < 1:
            raise AdapterError(
                f"module {module!r}: A {tuple(f.A.shape)} and B {tuple(f.B.shape)} "
                "are not r×k / d×r"
            )
        ranks[module] = f.rank
        tensors[f"{module}{_LORA_A}"] = f.A.detach().cpu().contiguous()
        tensors[f"{module}{_LORA_B}"] = f.B.detach().cpu().contiguous()
    for key, t in (extra_tensors or {}).items():
        if key in tensors:
            raise AdapterError(f"non-LoRA tensor {key!r} clashes with a LoRA tensor key")
        tensors[key] = t.detach().cpu().contiguous()

    r = max(ranks.values())
    pattern = {re.escape(peft_module_key(m)): rm for m, rm in sorted(ranks.items()) if rm != r}
    if target_modules is None:
        target_modules = sorted({peft_module_key(m).rsplit(".", 1)[-1] for m in ranks})
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_modules,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    for module, rm in ranks.items():  # the pattern must select exactly the intended rank
        key = pattern_key(list(pattern), module)
        if (pattern[key] if key is not None else r) != rm:  # pragma: no cover - defensive
            raise AdapterError(f"module {module!r}: rank_pattern does not select rank {rm}")

    with staged_dir(out, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_SAFETENSORS), metadata={"format": "pt"})


def _fmt_targets(t: list[str] | str | None) -> str:
    return repr(sorted(t)) if isinstance(t, list) else repr(t)


def check_compatible(
    infos: Sequence[AdapterInfo], *, modules: Literal["same", "intersection"] = "same"
) -> list[str]:
    """Check that adapters can be aggregated and return the module list to use.

    Checks: one base model (when recorded), the same ``fan_in_fan_out``, the same module set and
    ``target_modules`` (``modules="same"``) or at least one common module (``"intersection"``,
    an explicit opt-in that drops the others), and equal ``(d, k)`` per module.

    Returns:
        The module names to aggregate, sorted.

    Raises:
        IncompatibleAdapters: naming the adapter, the module and what differs.
    """
    if modules not in ("same", "intersection"):
        raise ValueError(f"modules must be 'same' or 'intersection', got {modules!r}")
    if not infos:
        raise IncompatibleAdapters("no adapters were given")
    ref = infos[0]
    for info in infos[1:]:
        a, b = ref.base_model_name_or_path, info.base_model_name_or_path
        if a and b and a != b:
            raise IncompatibleAdapters(
                f"adapter {str(info.path)!r} was trained on base model {b!r}, but "
                f"{str(ref.path)!r} on {a!r}"
            )
        if info.fan_in_fan_out != ref.fan_in_fan_out:
            raise IncompatibleAdapters(
                f"adapter {str(info.path)!r} has fan_in_fan_out={info.fan_in_fan_out}, but "
                f"{str(ref.path)!r} has {ref.fan_in_fan_out}"
            )
    common = set(ref.ranks)
    for info in infos[1:]:
        common &= set(info.ranks)
    if modules == "same":
        for info in infos[1:]:
            missing = sorted(set(ref.ranks) - set(info.ranks))
            extra = sorted(set(info.ranks) - set(ref.ranks))
            if missing or extra:
                parts = []
                if missing:
                    parts.append(
                        f"lacks module(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                    )
                if extra:
                    parts.append(
                        f"has extra module(s) {extra[:3]}{' ...' if len(extra) > 3 else ''}"
                    )
                raise IncompatibleAdapters(
                    f"adapter {str(info.path)!r} {' and '.join(parts)} compared with "
                    f"{str(ref.path)!r} (target_modules {_fmt_targets(info.target_modules)} vs "
                    f"{_fmt_targets(ref.target_modules)}); pass --modules intersection to "
                    "aggregate only the common modules"
                )
    if not common:
        raise IncompatibleAdapters("the adapters have no LoRA module in common")
    for m in sorted(common):
        for info in infos[1:]:
            if info.shapes[m] != ref.shapes[m]:
                d1, k1 = ref.shapes[m]
                d2, k2 = info.shapes[m]
                raise IncompatibleAdapters(
                    f"adapter {str(info.path)!r}, module {m!r}: layer shape {d2}×{k2} (out×in) "
                    f"differs from {d1}×{k1} in {str(ref.path)!r} (different base models?)"
                )
    return sorted(common)
