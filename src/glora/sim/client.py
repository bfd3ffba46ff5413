"""Local training of one client on the shared :class:`~glora.sim.model.AdapterModel`.

All randomness is derived from ``derive_seed(seed, purpose, round, client)``: the batch order
(``"data"``) and dropout (``"dropout"``, via ``torch.manual_seed``), so a resumed run repeats an
uninterrupted one bit for bit without saving any RNG state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from glora.linalg import derive_seed
from glora.sim.model import AdapterModel
from glora.tasks.base import Task

__all__ = ["LocalResult", "LossHook", "batch_order", "train_local"]

#: ``hook(client_id, round, step, loss) -> loss``: lets tests corrupt or inspect a loss.
LossHook = Callable[[str, int, int, Tensor], Tensor]


@dataclass
class LocalResult:
    """Outcome of one client's local training.

    Attributes:
        steps: optimizer steps done.
        mean_loss: mean training loss over those steps (NaN if none).
        error: why the client must be dropped (non-finite loss), or None.
    """

    steps: int
    mean_loss: float
    error: str | None = None


def batch_order(
    n: int, batch_size: int, *, steps: int | None, epochs: int | None, seed: int
) -> list[np.ndarray]:
    """Batches of local example positions: ``steps`` batches (reshuffled each pass) or full
    ``epochs`` passes; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    bs = min(batch_size, n)
    batches: list[np.ndarray] = []
    if epochs is not None:
        for _ in range(epochs):
            perm = rng.permutation(n)
            batches.extend(perm[i : i + bs] for i in range(0, n, bs))
        return batches
    assert steps is not None
    perm, pos = rng.permutation(n), 0
    while len(batches) < steps:
        if pos + bs > n:
            perm, pos = rng.permutation(n), 0
        batches.append(perm[pos : pos + bs])
        pos += bs
    return batches


def train_local(
    model: AdapterModel,
    task: Task,
    examples: Sequence[Any],
    params: list[torch.nn.Parameter],
    *,
    client_id: str,
    round: int,
    seed: int,
    steps: int | None,
    epochs: int | None,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    bf16: bool = False,
    loss_hook: LossHook | None = None,
    on_step: Callable[[], None] | None = None,
) -> LocalResult:
    """Train the active adapter (and head) of ``model`` on ``examples`` with a fresh AdamW.

    ``params`` are the trainable parameters (from :meth:`AdapterModel.activate`). Stops at the
    first non-finite loss and reports it in :attr:`LocalResult.error`.
    """
    order = batch_order(
        len(examples),
        batch_size,
        steps=steps,
        epochs=epochs,
        seed=derive_seed(seed, "data", round, client_id),
    )
    torch.manual_seed(derive_seed(seed, "dropout", round, client_id))
    net = model.peft
    net.train()
    device = model.device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None
    autocast: Any = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    losses: list[float] = []
    for step, idx in enumerate(order):
        batch = task.collate([examples[int(i)] for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = net(**batch).loss
        if loss_hook is not None:
            loss = loss_hook(client_id, round, step, loss)
        value = float(loss.detach())
        if not math.isfinite(value):
            return LocalResult(
                len(losses), _mean(losses), f"non-finite training loss ({value}) at step {step}"
            )
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(value)
        if on_step is not None:
            on_step()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    return LocalResult(len(losses), _mean(losses))


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
