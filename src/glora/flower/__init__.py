"""Flower integration of glora (optional extra ``glora[flower]``).

* :class:`~glora.flower.strategy.GLoRAStrategy`: a ``flwr.serverapp.strategy.Strategy`` that
  wraps any glora aggregator (per-node rank payloads, validation, checkpoint/resume);
* :mod:`glora.flower.codec`: LoRA factors and tensors <-> ``ArrayRecord``;
* :mod:`glora.flower.server` / :mod:`glora.flower.client`: the ServerApp and ClientApp, which
  run the same YAML config as ``glora run`` (``apps/flower`` is the thin app folder);
* :mod:`glora.flower.launch`: a localhost federation (SuperLink + N SuperNodes, optional TLS
  and SuperNode authentication) started and stopped by PID (``glora flower run``).
"""

from __future__ import annotations

from glora.flower.strategy import GLoRAStrategy, default_client_id

__all__ = ["GLoRAStrategy", "default_client_id"]
