"""Test doubles for the Flower strategy: a fake Grid and fake ClientApps (no Flower runtime)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from unittest.mock import Mock

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from glora.aggregators.base import Aggregator
from glora.flower.codec import decode_factor_parts, decode_tensors, encode_factors, encode_tensors
from glora.types import LoRAFactors

Handler = Callable[[int, Message], "Message | None"]


def reply(content: RecordDict, src_node_id: int | None = None) -> Mock:
    """A mock reply with a real RecordDict content (flower.md §10)."""
    msg = Mock(spec=Message)
    msg.content = content
    msg.has_error.return_value = False
    msg.metadata = Mock(src_node_id=src_node_id)
    return msg


def error_reply(reason: str, src_node_id: int | None = None) -> Mock:
    """A mock error reply."""
    msg = Mock(spec=Message)
    msg.has_error.return_value = True
    msg.error = Mock(code=0, reason=reason)
    msg.metadata = Mock(src_node_id=src_node_id)
    return msg


class FakeGrid(Grid):
    """A Grid whose nodes are Python callables; messages are Mocks with real content."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.sent: list[Mock] = []

    def set_run(self, run_id: int) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        return None

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        msg = Mock(spec=Message)
        msg.content = content
        msg.metadata = Mock(dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)
        return msg

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            self.sent.append(msg)  # type: ignore[arg-type]
            nid = msg.metadata.dst_node_id
            handler = self.handlers.get(nid)
            if handler is None:
                continue
            r = handler(nid, msg)
            if r is not None:
                out.append(r)
        return out


class FakeClient:
    """A deterministic fake ClientApp: 'training' adds a seeded perturbation to the factors.

    It follows the aggregator's plan like the real ClientApp: keeps ``local`` factors, uploads
    ``upload`` factors, returns the head plus 0.1·(pid+1).
    """

    def __init__(self, pid: int, agg: Aggregator, num_examples: int = 10) -> None:
        self.pid = pid
        self.agg = agg
        self.num_examples = num_examples
        self.local: dict[str, dict[str, torch.Tensor]] = {}
        self.received: list[dict[str, Any]] = []

    def __call__(self, node_id: int, msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            return reply(RecordDict({"metrics": MetricRecord({"partition-id": self.pid})}), node_id)
        cfg = msg.content["config"]
        rnd = int(cfg["server-round"])
        rank = int(cfg["rank"])
        parts = decode_factor_parts(msg.content["factors"])
        self.received.append({"round": rnd, "rank": rank, "parts": parts, "cfg": dict(cfg)})
        plan = self.agg.client_plan(rnd)
        start: dict[str, LoRAFactors] = {}
        for m, named in parts.items():
            named = dict(named)
            for name in plan.local:
                if name in self.local.get(m, {}):
                    named[name] = self.local[m][name]
            start[m] = LoRAFactors(A=named["A"], B=named["B"])
        g = torch.Generator().manual_seed(1000 * rnd + self.pid)
        trained = {}
        for m, f in start.items():
            A = f.A + (
                0.1 * torch.randn(f.A.shape, generator=g, dtype=f.A.dtype)
                if "A" in plan.train
                else 0
            )
            B = f.B + (
                0.1 * torch.randn(f.B.shape, generator=g, dtype=f.B.dtype)
                if "B" in plan.train
                else 0
            )
            trained[m] = LoRAFactors(A=A, B=B)
        trained = self.agg.prepare_upload(rnd, received=start, trained=trained)
        for m, f in trained.items():
            for name in plan.local:
                self.local.setdefault(m, {})[name] = f.A if name == "A" else f.B
        head = {k: v + 0.1 * (self.pid + 1) for k, v in decode_tensors(msg.content["head"]).items()}
        content = RecordDict(
            {
                "factors": encode_factors(trained, plan.upload),
                "head": encode_tensors(head),
                "metrics": MetricRecord(
                    {
                        "partition-id": self.pid,
                        "num-examples": self.num_examples,
                        "train_loss": 1.0 / rnd + self.pid,
                        "rank": rank,
                    }
                ),
            }
        )
        return reply(content, node_id)


def node_id(pid: int) -> int:
    """A fake random-looking node id for partition ``pid``."""
    return 7_000_000 + 13 * pid


def make_grid(
    agg: Aggregator, num_clients: int, num_examples: list[int] | None = None
) -> tuple[FakeGrid, dict[int, FakeClient]]:
    clients = {
        pid: FakeClient(pid, agg, (num_examples or [10 + pid for _ in range(num_clients)])[pid])
        for pid in range(num_clients)
    }
    grid = FakeGrid({node_id(pid): c for pid, c in clients.items()})
    return grid, clients


__all__ = [
    "ArrayRecord",
    "ConfigRecord",
    "FakeClient",
    "FakeGrid",
    "error_reply",
    "make_grid",
    "node_id",
    "reply",
]
