"""The glora ClientApp: local training with the simulator's own client code.

A node's partition comes from ``context.node_config["partition-id"]``; the data partition,
rank, model, task and aggregator come from the same YAML config as ``glora run`` (run config key
``config``), built by :class:`glora.sim.engine.Simulation` and cached per process. Training is
:func:`glora.sim.client.train_local` on the simulator's :class:`~glora.sim.model.AdapterModel`;
the plan's ``local`` factors (and a ``local`` head) are kept in ``context.state``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

__all__ = ["build_client_app", "handle_query", "handle_train", "host"]

#: Keys in ``context.state``.
LOCAL_FACTORS, LOCAL_HEAD = "glora-local-factors", "glora-local-head"
#: Error code of a ClientApp-side failure (reported in the server's ``dropped`` reason).
CLIENT_ERROR = 1

_HOSTS: dict[tuple[str, float], Any] = {}


def host(config_path: str) -> Any:
    """The :class:`~glora.sim.engine.Simulation` of ``config_path``, built once per process."""
    from glora.config import load_config
    from glora.sim.engine import Simulation

    path = str(Path(config_path).resolve())
    key = (path, os.path.getmtime(path))
    if key not in _HOSTS:
        _HOSTS.clear()
        _HOSTS[key] = Simulation(load_config(path))
    return _HOSTS[key]


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            "this SuperNode has no integer partition-id in its node config; start it with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def handle_query(msg: Message, context: Context) -> Message:
    """Answer the server's discovery query with this node's partition id."""
    pid = _partition_id(context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """One round of local training (see the module docstring); an error reply on failure."""
    try:
        return _train(msg, context)
    except Exception as exc:  # reported to the server, which drops this client for the round
        return Message(
            Error(code=CLIENT_ERROR, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg
        )


def _train(msg: Message, context: Context) -> Message:
    from glora.flower.codec import (
        decode_factor_parts,
        decode_factors,
        decode_tensors,
        encode_factors,
        encode_tensors,
    )
    from glora.sim.model import AdapterModel
    from glora.types import LoRAFactors

    sim = host(str(context.run_config["config"]))
    pid = _partition_id(context)
    cfg = msg.content["config"]
    rnd, rank = int(cfg["server-round"]), int(cfg["rank"])  # type: ignore[arg-type]
    if not 0 <= pid < sim.num_clients:
        raise ValueError(f"partition-id {pid} is outside 0..{sim.num_clients - 1} of the config")
    if int(cfg["partition-id"]) != pid:  # type: ignore[arg-type]
        raise ValueError(f"message for partition {cfg['partition-id']} reached partition {pid}")
    if rank != sim.ranks[pid]:
        raise ValueError(
            f"server sent rank {rank}, but the config gives partition {pid} rank {sim.ranks[pid]}"
        )
    tr = sim.config.training
    plan = sim.agg.client_plan(rnd)

    # start factors: the readout, replaced by the factors this node keeps locally
    parts = decode_factor_parts(msg.content["factors"])
    held = (
        decode_factor_parts(context.state[LOCAL_FACTORS])  # type: ignore[arg-type]
        if LOCAL_FACTORS in context.state.array_records
        else {}
    )
    start: dict[str, LoRAFactors] = {}
    for m in sim.model.modules:
        named = dict(parts.get(m, {}))
        for which in plan.local:
            if which in held.get(m, {}):
                named[which] = held[m][which]
        missing = [w for w in ("A", "B") if w not in named]
        if missing:
            raise ValueError(f"module {m!r}: factor(s) {missing} neither sent nor held locally")
        start[m] = LoRAFactors(A=named["A"].float(), B=named["B"].float())

    base = decode_factors(msg.content["base"]) if "base" in msg.content.array_records else {}
    sim.model.set_base(AdapterModel.dense(base) if base else None)
    head = decode_tensors(msg.content["head"]) if "head" in msg.content.array_records else {}
    if tr.head == "local" and LOCAL_HEAD in context.state.array_records:
        head = decode_tensors(context.state[LOCAL_HEAD])  # type: ignore[arg-type]
    train_head = tr.head != "frozen"
    indices = sim.client_indices[pid]
    done = sim.train_client(rnd, pid, start, head or None)
    result, trained, new_head, up = done.result, done.trained, done.head, done.uploaded
    if up is None:
        raise RuntimeError(result.error)

    if plan.local:  # keep this node's local factors for the next rounds
        keep = {m: trained[m] for m in sim.model.modules}
        context.state[LOCAL_FACTORS] = encode_factors(keep, plan.local)
    if tr.head == "local":
        context.state[LOCAL_HEAD] = encode_tensors(new_head)

    content = RecordDict(
        {
            "factors": encode_factors(up, plan.upload),
            "metrics": MetricRecord(
                {
                    "partition-id": pid,
                    "num-examples": len(indices),
                    "train_loss": float(result.mean_loss)
                    if math.isfinite(result.mean_loss)
                    else 0.0,
                    "rank": rank,
                    "steps": result.steps,
                }
            ),
        }
    )
    if train_head and tr.head == "fedavg":
        content["head"] = encode_tensors(new_head)
    return Message(content, reply_to=msg)


def build_client_app() -> ClientApp:
    """The ClientApp: ``query`` answers the partition id, ``train`` trains locally."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context)

    return app
