"""A Flower ``Strategy`` that drives any glora aggregator through the protocol of docs/design.md.

Per round ``t`` the strategy

1. samples partition ids with :func:`glora.data.partition.sample_participants` (the simulator's
   sampling, seeded by ``(seed, t)``), and maps them to SuperNodes learned from a ``QUERY``
   message that asks every new node for its ``partition-id``;
2. sends each node its own message: the readout ``agg.readout(state, rank)`` restricted to the
   plan's ``download`` factors (plus the ``local`` factors the node does not hold yet), the
   global head, the base-weight delta when non-empty, the round and the rank;
3. decodes every reply, fills the factors that were not uploaded with the ones the node started
   from, validates each reply alone (:func:`glora.validation.validate_updates`) and drops error
   or malformed replies with a logged reason;
4. aggregates the valid updates (sorted by partition id) with the wrapped aggregator, averages
   the head with FedAvg weights, and appends a line to ``metrics.jsonl``.

A round with fewer than ``min_replies`` valid replies is skipped with the state unchanged.
:meth:`GLoRAStrategy.start` replaces Flower's round loop to checkpoint the whole server state
every ``checkpoint_every`` rounds and to resume from the latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor

from glora.aggregators.base import Aggregator, fedavg_tensors
from glora.data.partition import sample_participants
from glora.flower.codec import (
    FACTOR_NAMES,
    RecordError,
    decode_factor_parts,
    decode_factors,
    decode_tensors,
    encode_factors,
    encode_tensors,
)
from glora.sim.rundir import Checkpoint, RunDir, jsonable
from glora.types import ClientUpdate, InvalidUpdate, LoRAFactors, ServerState
from glora.validation import validate_updates

__all__ = ["GLoRAStrategy", "default_client_id"]

log = logging.getLogger("glora.flower")

#: Record names inside a message's RecordDict.
FACTORS, HEAD, BASE, CONFIG, METRICS = "factors", "head", "base", "config", "metrics"
#: Required keys of a training reply's MetricRecord.
REPLY_METRICS = ("partition-id", "num-examples", "train_loss", "rank")


def default_client_id(partition_id: int) -> str:
    """The client id of a partition, as the in-process simulator names it (``"0"``, ``"1"``…)."""
    return str(partition_id)


@dataclass
class _Sent:
    """What the strategy sent to one partition in the current round."""

    node_id: int
    rank: int
    start: dict[str, LoRAFactors]


def _message(grid: Grid, content: RecordDict, kind: str, node: int, group: str) -> Message:
    """A message to ``node``; outside a running app (unit tests) through ``grid.create_message``."""
    try:
        return Message(content, dst_node_id=node, message_type=kind, group_id=group)
    except RuntimeError:  # TaskIdentity not set: no Flower runtime around us
        return grid.create_message(content, kind, node, group)


def _content_bytes(content: RecordDict) -> int:
    return sum(rec.count_bytes() for rec in content.array_records.values())


class GLoRAStrategy(Strategy):
    """Wraps any glora :class:`~glora.aggregators.base.Aggregator` as a Flower strategy.

    Args:
        aggregator: built with :func:`glora.aggregators.build`; holds the server state.
        num_clients: number of partitions (``partition-id`` 0 .. num_clients-1).
        ranks: LoRA rank per partition id (length ``num_clients``) or a function of it.
        participation: fraction in (0, 1] or a count, as in the simulator.
        seed: experiment seed of the participant sampling.
        initial: the round-0 global adapter (module → folded factors); may instead be given
            as ``initial_arrays`` to :meth:`start` (keys ``<module>/A``, ``<module>/B``).
        initial_head: the round-0 global head tensors (FedAvg'd each round).
        min_replies: a round with fewer valid replies is skipped, state unchanged.
        run_dir: the run directory (:class:`glora.sim.rundir.RunDir` or a path) where
            ``metrics.jsonl`` and ``checkpoints/`` go, in ``glora run``'s format (None: nothing
            written). The strategy does not lock it; the caller does.
        checkpoint_every: checkpoint every k rounds (0: only after the last round).
        head_policy: ``"fedavg"`` (replies carry the head; FedAvg), ``"local"`` or
            ``"frozen"`` (replies carry no head; the global head never changes).
        method_label: the ``method`` field of ``metrics.jsonl`` (default: the aggregator name).
        discovery_timeout: seconds to wait for every partition's SuperNode before round 1.
        client_id: partition id → client id of the :class:`ClientUpdate`.
        train_config: extra scalars sent to every node in the message's ConfigRecord.
        evaluate: optional server-side evaluation ``(round, strategy) -> metrics | None``; its
            result fills the ``metrics`` field of the round's line.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        num_clients: int,
        ranks: Sequence[int] | Callable[[int], int],
        participation: float | int = 1.0,
        seed: int = 0,
        initial: Mapping[str, LoRAFactors] | None = None,
        initial_head: Mapping[str, Tensor] | None = None,
        min_replies: int = 1,
        run_dir: RunDir | str | Path | None = None,
        checkpoint_every: int = 0,
        head_policy: str = "fedavg",
        method_label: str | None = None,
        discovery_timeout: float = 120.0,
        client_id: Callable[[int], str] = default_client_id,
        train_config: Mapping[str, int | float | str | bool] | None = None,
        evaluate: Callable[[int, GLoRAStrategy], Mapping[str, Any] | None] | None = None,
    ) -> None:
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 1:
            raise ValueError(f"min_replies must be an integer >= 1, got {min_replies!r}")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        if not callable(ranks):
            ranks = [int(r) for r in ranks]
            if len(ranks) != num_clients:
                raise ValueError(f"ranks has {len(ranks)} entries for {num_clients} clients")
        self.aggregator = aggregator
        self.num_clients = num_clients
        self._ranks = ranks
        self.participation = participation
        self.seed = seed
        self.min_replies = min_replies
        if head_policy not in ("fedavg", "local", "frozen"):
            raise ValueError(f"head_policy must be fedavg, local or frozen, got {head_policy!r}")
        self.head_policy = head_policy
        self.run_dir = (
            run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
        )
        self.checkpoint_every = checkpoint_every
        self.discovery_timeout = discovery_timeout
        self.client_id = client_id
        self.train_config = dict(train_config or {})
        self.evaluate = evaluate
        self.head: dict[str, Tensor] = {k: v.clone() for k, v in (initial_head or {}).items()}
        self.completed_round = 0
        self.history: list[dict[str, Any]] = []
        self.last_log: dict[str, Any] | None = None
        # partition id -> node id (learned from QUERY replies), and partitions holding their
        # plan's local factors (FedSA's B) in the node's context.state.
        self.nodes: dict[int, int] = {}
        self._has_local: set[int] = set()
        self._sent: dict[int, _Sent] = {}
        self._sent_msgs: dict[int, Message] = {}
        self._bytes_down = 0
        self._sampled: list[int] = []
        self._pre_dropped: dict[str, str] = {}
        self.method_label = method_label or aggregator.name
        if initial is not None:
            aggregator.init_state(initial)

    # ------------------------------------------------------------------ helpers
    @property
    def state(self) -> ServerState:
        """The wrapped aggregator's current server state."""
        if self.aggregator.state is None:
            raise RuntimeError("the strategy has no server state: pass initial= or initial_arrays")
        return self.aggregator.state

    def rank_of(self, partition_id: int) -> int:
        """LoRA rank of a partition."""
        r = self._ranks(partition_id) if callable(self._ranks) else self._ranks[partition_id]
        return int(r)

    def sample(self, server_round: int) -> list[int]:
        """The partition ids taking part in ``server_round`` (the simulator's sampling)."""
        return sample_participants(self.num_clients, self.participation, server_round, self.seed)

    def global_adapter(self) -> dict[str, LoRAFactors]:
        """The global model's total update (``agg.effective_update``), for the final adapter."""
        return self.aggregator.effective_update(self.state)

    def global_arrays(self) -> ArrayRecord:
        """The full global adapter (readout at no rank) as an ArrayRecord."""
        return encode_factors(self.aggregator.readout(self.state))

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "GLoRAStrategy: method=%s num_clients=%d participation=%s seed=%d min_replies=%d "
            "checkpoint_every=%d aggregator=%r",
            self.aggregator.name,
            self.num_clients,
            self.participation,
            self.seed,
            self.min_replies,
            self.checkpoint_every,
            self.aggregator,
        )

    # ------------------------------------------------------------------ node discovery
    def discover(self, grid: Grid, *, wait_for: Iterable[int] = (), timeout: float = 0.0) -> None:
        """Learn the partition id of every connected node not seen before (QUERY messages).

        Waits (polling every second, at most ``timeout`` s) until every partition in
        ``wait_for`` has a node. Nodes that left the grid are forgotten.
        """
        wanted = set(wait_for)
        deadline = time.monotonic() + max(0.0, timeout)
        queried: set[int] = set()
        while True:
            online = {int(n) for n in grid.get_node_ids()}
            for pid in [p for p, n in self.nodes.items() if n not in online]:
                del self.nodes[pid]
                self._has_local.discard(pid)
            known = set(self.nodes.values())
            new = sorted(online - known - queried)
            if new:
                self._query(grid, new, max(5.0, deadline - time.monotonic()))
                queried.update(new)
            if wanted <= set(self.nodes) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        missing = sorted(wanted - set(self.nodes))
        if missing:
            log.warning("no SuperNode answered for partition(s) %s", missing)

    def _query(self, grid: Grid, node_ids: Sequence[int], timeout: float) -> None:
        msgs = [
            _message(
                grid,
                RecordDict({CONFIG: ConfigRecord({"query": "partition-id"})}),
                MessageType.QUERY,
                nid,
                "discovery",
            )
            for nid in node_ids
        ]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                log.warning("QUERY to node %s failed: %s", reply.metadata.src_node_id, reply.error)
                continue
            try:
                pid = int(reply.content[METRICS]["partition-id"])
                node = int(reply.metadata.src_node_id)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("malformed QUERY reply dropped: %s", exc)
                continue
            if not 0 <= pid < self.num_clients:
                log.warning(
                    "node %d reports partition-id %d outside 0..%d", node, pid, self.num_clients - 1
                )
                continue
            if self.nodes.get(pid) not in (None, node):
                log.warning(
                    "partition %d moved from node %d to node %d", pid, self.nodes[pid], node
                )
                self._has_local.discard(pid)
            self.nodes[pid] = node

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled partition with a node: its rank's readout and the head."""
        state = self.state
        plan = self.aggregator.client_plan(server_round)
        self._sampled = self.sample(server_round)
        self._sent = {}
        self._sent_msgs = {}
        self._bytes_down = 0
        self._pre_dropped = {}
        base = encode_factors(state.base_delta) if state.base_delta else None
        head = encode_tensors(self.head)
        messages: list[Message] = []
        readouts: dict[int, dict[str, LoRAFactors]] = {}
        for pid in self._sampled:
            node = self.nodes.get(pid)
            if node is None:
                reason = "no SuperNode serves this partition"
                self._pre_dropped[self.client_id(pid)] = reason
                log.warning("round %d: client %s: %s", server_round, self.client_id(pid), reason)
                continue
            rank = self.rank_of(pid)
            if rank not in readouts:
                readouts[rank] = self.aggregator.readout(state, rank)
            start = readouts[rank]
            send = set(plan.download)
            if pid not in self._has_local:
                send |= set(plan.local)
            cfg: dict[str, Any] = dict(config.items()) if config is not None else {}
            cfg.update(self.train_config)
            cfg.update(
                {
                    "server-round": server_round,
                    "rank": rank,
                    "method": self.aggregator.name,
                    "partition-id": pid,
                    "factors-sent": ",".join(sorted(send)),
                }
            )
            content = RecordDict(
                {
                    FACTORS: encode_factors(start, sorted(send)),
                    HEAD: head,
                    CONFIG: ConfigRecord(cfg),
                }
            )
            if base is not None:
                content[BASE] = base
            self._bytes_down += _content_bytes(content)
            self._sent[pid] = _Sent(node_id=node, rank=rank, start=start)
            msg = _message(grid, content, MessageType.TRAIN, node, str(server_round))
            self._sent_msgs[pid] = msg
            messages.append(msg)
        return messages

    def _decode_reply(
        self, server_round: int, reply: Message, seen: set[int]
    ) -> tuple[int, ClientUpdate, float, int]:
        """Decode and check one reply; raises ValueError/InvalidUpdate/RecordError with a reason."""
        content = reply.content
        metrics = content.metric_records.get(METRICS) if METRICS in content else None
        if metrics is None:
            raise RecordError("the reply has no 'metrics' MetricRecord")
        missing = [k for k in REPLY_METRICS if k not in metrics]
        if missing:
            raise RecordError(f"metrics lack {', '.join(missing)}")
        pid_raw = metrics["partition-id"]
        if isinstance(pid_raw, float) and not pid_raw.is_integer():
            raise RecordError(f"partition-id {pid_raw!r} is not an integer")
        pid = int(pid_raw)  # type: ignore[arg-type]
        if pid not in self._sent:
            raise RecordError(f"partition {pid} was not sampled in round {server_round}")
        if pid in seen:
            raise RecordError(f"a second reply for partition {pid}")
        sent = self._sent[pid]
        src = getattr(getattr(reply, "metadata", None), "src_node_id", None)
        if isinstance(src, int) and src != sent.node_id:
            raise RecordError(f"partition {pid} replied from node {src}, not from {sent.node_id}")
        cid = self.client_id(pid)
        rank = metrics["rank"]
        if rank != sent.rank:
            raise InvalidUpdate(
                f"reports rank {rank}, but was sent rank {sent.rank}", client_id=cid
            )
        n = metrics["num-examples"]
        loss = metrics["train_loss"]
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise InvalidUpdate(f"num-examples must be finite and > 0, got {n!r}", client_id=cid)
        if not isinstance(loss, (int, float)):
            raise InvalidUpdate(f"train_loss is not a number: {loss!r}", client_id=cid)
        if FACTORS not in content.array_records:
            raise InvalidUpdate("the reply has no 'factors' ArrayRecord", client_id=cid)
        parts = decode_factor_parts(content.array_records[FACTORS])
        plan = self.aggregator.client_plan(server_round)
        unknown = sorted(set(parts) - set(sent.start))
        if unknown:
            raise InvalidUpdate(f"unexpected module(s) {unknown[:5]}", client_id=cid)
        factors: dict[str, LoRAFactors] = {}
        for module, start in sent.start.items():
            got = parts.get(module, {})
            named: dict[str, Tensor] = {}
            for name in FACTOR_NAMES:
                if name in plan.upload:
                    if name not in got:
                        raise InvalidUpdate(
                            f"factor {name} is missing (the plan uploads {sorted(plan.upload)})",
                            client_id=cid,
                            module=module,
                        )
                    named[name] = got[name]
            dtype = next(iter(named.values())).dtype if named else start.A.dtype
            for name in FACTOR_NAMES:
                if name not in plan.upload:  # the transport fills in what the node started from
                    named[name] = (start.A if name == "A" else start.B).to(dtype)
            factors[module] = LoRAFactors(A=named["A"], B=named["B"])
        head: dict[str, Tensor] = {}
        if self.head_policy == "fedavg":
            if HEAD in content.array_records:
                head = decode_tensors(content.array_records[HEAD])
            if set(head) != set(self.head):
                diff = sorted(set(head) ^ set(self.head))
                raise InvalidUpdate(
                    f"head tensors {diff[:5]} differ from the global head", client_id=cid
                )
            for name, t in head.items():
                if tuple(t.shape) != tuple(self.head[name].shape):
                    raise InvalidUpdate(
                        f"head tensor {name!r} has shape {tuple(t.shape)}, expected "
                        f"{tuple(self.head[name].shape)}",
                        client_id=cid,
                    )
                head[name] = t.to(self.head[name].dtype)
        update = ClientUpdate(client_id=cid, weight=float(n), factors=factors, extra=head)
        shapes = self.state.info.get("shapes")
        validate_updates(
            [update],
            expected_shapes={m: (int(s[0]), int(s[1])) for m, s in shapes.items()}
            if shapes
            else None,
            max_rank=self.aggregator.max_rank,
            max_abs=self.aggregator.max_abs,
        )
        return pid, update, float(loss), _content_bytes(content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply alone, drop bad ones, aggregate the rest (see the module doc).

        Leaves the round's ``metrics.jsonl`` record (``glora run``'s fields) in ``last_log``.
        """
        dropped: dict[str, str] = dict(self._pre_dropped)
        bytes_up = 0
        valid: dict[int, tuple[ClientUpdate, float]] = {}
        for reply in replies:
            if reply.has_error():
                err = reply.error
                reason = (
                    f"error reply (code {getattr(err, 'code', '?')}): {getattr(err, 'reason', err)}"
                )
                who = self._who(reply)
                log.warning("round %d: dropped client %s: %s", server_round, who, reason)
                dropped[who] = reason
                continue
            try:
                pid, update, loss, nbytes = self._decode_reply(server_round, reply, set(valid))
            except (RecordError, InvalidUpdate, ValueError, TypeError, KeyError) as exc:
                who = self._who(reply)
                reason = f"invalid update: {exc}"
                log.warning("round %d: dropped client %s: %s", server_round, who, reason)
                dropped.setdefault(who, reason)
                continue
            bytes_up += nbytes
            valid[pid] = (update, loss)
        for pid in sorted(self._sent):
            cid = self.client_id(pid)
            if pid not in valid and cid not in dropped:
                dropped[cid] = "no reply before the round timeout"
                log.warning("round %d: dropped client %s: %s", server_round, cid, dropped[cid])
        pids = sorted(valid)
        losses = [valid[p][1] for p in pids]
        record: dict[str, Any] = {
            "round": server_round,
            "method": self.method_label,
            "participants": [self.client_id(p) for p in self._sampled],
            "dropped": dropped,
            "train_loss": float(sum(losses) / len(losses)) if losses else float("nan"),
            "metrics": {},
            "bytes_up": int(bytes_up),
            "bytes_down": int(self._bytes_down),
            "server_seconds": 0.0,
            "diagnostics": {},
        }
        self.last_log = record
        error: str | None = None
        if len(pids) < self.min_replies:
            error = f"{len(pids)} valid replies, fewer than min_replies={self.min_replies}"
        else:
            updates = [valid[p][0] for p in pids]
            s0 = time.perf_counter()
            try:
                self.aggregator.aggregate(updates)
            except InvalidUpdate as exc:
                error = f"aggregation rejected the round: {exc}"
            else:
                if self.head_policy == "fedavg" and self.head:
                    self.head = fedavg_tensors(
                        [u.extra for u in updates], [u.weight for u in updates]
                    )
                if self.aggregator.client_plan(server_round).local:
                    self._has_local.update(pids)
            record["server_seconds"] = time.perf_counter() - s0
        record["diagnostics"] = jsonable(self.state.diagnostics)
        if error is not None:
            record["aggregation_error"] = error
            log.warning("round %d skipped (server state unchanged): %s", server_round, error)
            return None, None
        total = sum(valid[p][0].weight for p in pids)
        metrics = MetricRecord(
            {"train_loss": record["train_loss"], "num-replies": len(pids), "num-examples": total}
        )
        return self.global_arrays(), metrics

    def _who(self, reply: Message) -> str:
        """The client id of a reply's partition: by sender node, by the message it answers
        (error replies made by the SuperLink for an unreachable node), or by its metrics."""
        meta = getattr(reply, "metadata", None)
        src = getattr(meta, "src_node_id", None)
        for pid, sent in self._sent.items():
            if isinstance(src, int) and sent.node_id == src:
                return self.client_id(pid)
        answered = getattr(meta, "reply_to_message_id", None)
        if isinstance(answered, str) and answered:
            for pid, msg in self._sent_msgs.items():
                if getattr(getattr(msg, "metadata", None), "message_id", None) == answered:
                    return self.client_id(pid)
        try:
            return self.client_id(int(reply.content[METRICS]["partition-id"]))
        except Exception:
            return f"node {src}"

    # ------------------------------------------------------------------ evaluate (server-side)
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the global model is evaluated on the server."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """No federated evaluation."""
        return None

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Checkpoint:
        """The whole server state in ``glora run``'s checkpoint format (no client stores)."""
        return Checkpoint(
            round=self.completed_round,
            state=self.state,
            options=jsonable(self.aggregator.options()),
            head=dict(self.head),
            client_tensors={},
            client_meta={},
        )

    def save(self) -> Path | None:
        """Checkpoint to ``run_dir/checkpoints`` (atomically); None without a run dir."""
        if self.run_dir is None:
            return None
        path = self.run_dir.save_checkpoint(self.checkpoint())
        log.info("checkpoint saved: %s", path)
        return path

    def restore(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint's server state, head and round counter."""
        if ckpt.state.method != self.aggregator.name:
            raise ValueError(
                f"checkpoint was written by {ckpt.state.method!r}, not {self.aggregator.name!r}"
            )
        self.aggregator.load_state(ckpt.state)
        self.head = {k: v.clone() for k, v in ckpt.head.items()}
        self.completed_round = ckpt.round
        self._has_local.clear()  # a node's context.state does not survive a new run

    def resume(self) -> bool:
        """Restore the latest checkpoint of ``run_dir`` if any; True if one was loaded."""
        if self.run_dir is None or not self.run_dir.checkpoint_rounds():
            return False
        self.restore(self.run_dir.load_checkpoint())
        log.info("resumed from the checkpoint of round %d", self.completed_round)
        return True

    # ------------------------------------------------------------------ round loop
    def run_round(
        self, grid: Grid, rnd: int, timeout: float, config: ConfigRecord
    ) -> dict[str, Any]:
        """Discover nodes, send, receive, aggregate and evaluate round ``rnd``; its record."""
        t0 = time.perf_counter()
        wait = self.discovery_timeout if not self.nodes else 0.0
        self.discover(grid, wait_for=self.sample(rnd), timeout=wait)
        messages = list(self.configure_train(rnd, self.global_arrays(), config, grid))
        replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
        self.aggregate_train(rnd, replies)
        assert self.last_log is not None
        record = self.last_log
        if self.evaluate is not None:
            res = self.evaluate(rnd, self)
            if res is not None:
                record["metrics"] = dict(res)
        record["wall_seconds"] = time.perf_counter() - t0
        self.completed_round = rnd
        self.history.append(record)
        if self.run_dir is not None:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self.run_dir.append_metrics(record)
        return record

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        resume: bool = False,
    ) -> Result:
        """Run rounds ``completed_round + 1 .. num_rounds`` with checkpoints (and resume).

        Flower's own ``start`` has no checkpoint or resume; this loop checkpoints the whole
        server state (aggregator state, head, round) every ``checkpoint_every`` rounds and after
        the last one, and with ``resume=True`` continues from the latest checkpoint of
        ``run_dir`` (dropping the ``metrics.jsonl`` lines of the rounds it redoes).

        Args:
            grid: the ServerApp's grid.
            initial_arrays: the round-0 adapter (``<module>/A``, ``<module>/B``) if the
                strategy was built without ``initial``; ignored when resuming.
            num_rounds: total number of rounds of the run (not the number still to do).
            timeout: seconds to wait for the replies of one round.
            train_config: extra scalars for every training message.
            evaluate_config: unused (no federated evaluation).
            evaluate_fn: Flower-style server-side evaluation of the global arrays (kept in the
                returned Result; use ``evaluate=`` of the constructor for ``metrics.jsonl``).
            resume: load the latest checkpoint of ``run_dir`` first (if there is one).
        """
        if resume and self.resume():
            assert self.run_dir is not None
            self.run_dir.truncate_metrics(self.completed_round)
        elif self.aggregator.state is None:
            if initial_arrays is None or len(initial_arrays) == 0:
                raise ValueError("no initial adapter: pass initial= or initial_arrays")
            self.aggregator.init_state(decode_factors(initial_arrays))
        self.summary()
        result = Result(arrays=self.global_arrays())
        config = train_config if train_config is not None else ConfigRecord()
        for rnd in range(self.completed_round + 1, num_rounds + 1):
            log.info("[ROUND %d/%d]", rnd, num_rounds)
            record = self.run_round(grid, rnd, timeout, config)
            result.arrays = self.global_arrays()
            if evaluate_fn is not None:
                res = evaluate_fn(rnd, result.arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
            result.train_metrics_clientapp[rnd] = MetricRecord(
                {"train_loss": record["train_loss"], "num-dropped": len(record["dropped"])}
            )
            log.info(
                "round %d: %d sampled, %d dropped, train_loss=%.4f",
                rnd,
                len(record["participants"]),
                len(record["dropped"]),
                record["train_loss"],
            )
            if rnd == num_rounds or (self.checkpoint_every and rnd % self.checkpoint_every == 0):
                self.save()
        return result
