"""The in-process federated LoRA simulator.

:class:`Simulation` drives the aggregator protocol of ``docs/design.md`` with no per-method code:
one frozen base model, one PEFT adapter per distinct client rank, client-local stores for the
factors a plan keeps local and (``training.head: local``) the clients' heads. Each round ``t``:

1. sample the participants; set the frozen weights to ``W0 + base_delta``;
2. per participant ``j`` of rank ``r_j``: ``start = agg.readout(state, r_j)``, replaced by the
   client's stored factor for each ``plan.local`` factor it holds; unfold into adapter
   ``r{r_j}``; train ``plan.train`` (+ the head unless frozen) with a fresh AdamW; fold;
   ``agg.prepare_upload``; keep ``plan.local`` factors; upload ``plan.upload`` factors (the others
   filled with the start ones) and the head as ``ClientUpdate.extra``;
3. validate each update alone and drop the invalid ones and non-finite losses (with a reason);
4. ``state = agg.aggregate(kept)``; FedAvg of the heads;
5. evaluate ``W0 + agg.effective_update(state)`` (adapters disabled) and, for methods with local
   parts, a personalised model per participant; log a ``metrics.jsonl`` record; checkpoint.

The centralized baseline is the same loop with one client (see :mod:`glora.config`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, TaskID
from torch import Tensor

from glora import aggregators
from glora.aggregators.base import Aggregator, fedavg_tensors
from glora.config import RunConfig
from glora.data.partition import sample_participants
from glora.linalg import derive_seed, fresh_factors
from glora.sim.client import LocalResult, LossHook, train_local
from glora.sim.model import AdapterModel
from glora.sim.rundir import Checkpoint, RunDir, jsonable, tensor_bytes
from glora.tasks import Task, build_task
from glora.types import ClientUpdate, InvalidUpdate, LoRAFactors, ServerState
from glora.validation import validate_updates

__all__ = [
    "AggregateHook",
    "ClientStore",
    "Simulation",
    "UpdateHook",
    "client_partition",
    "resolve_device",
]

UpdateHook = Callable[[int, Mapping[str, LoRAFactors], ClientUpdate], None]
"""``hook(round, start, update)``: a kept client update and the factors the client started from."""

AggregateHook = Callable[[int, Sequence[ClientUpdate]], None]
"""``hook(round, kept)``: a round's kept client updates, just before the server aggregates them."""


def client_partition(config: RunConfig, task: Task, n_examples: int) -> list[list[int]]:
    """The training-example indices of each client of ``config``'s run (client order).

    One client (centralized) holds all ``n_examples``; otherwise ``task.partition`` with the
    run's scheme and α, seeded from ``config.seed``, so a run and any tool that reads its
    config see the same split. ``task`` must be loaded. ValueError names a bad federation.
    """
    num_clients = config.effective_federation()[0]
    if num_clients == 1:
        return [list(range(n_examples))]
    try:
        return task.partition(
            num_clients,
            config.federation.partition,
            alpha=config.federation.alpha,
            seed=derive_seed(config.seed, "partition") % (2**32),
        )
    except ValueError as exc:
        raise ValueError(f"federation: {exc}") from None


def resolve_device(config: RunConfig) -> torch.device:
    """``training.device`` → a torch device; on CPU also sets the thread count."""
    want = config.training.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device: cuda requested but no CUDA device is available")
        return torch.device("cuda")
    threads = config.training.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, threads))
    return torch.device("cpu")


@dataclass
class ClientStore:
    """What one client keeps between rounds.

    Attributes:
        factors: module → {"A"|"B": tensor} of the plan's ``local`` factors.
        head: the client's own head (``training.head: local``).
        base_round: the last aggregation round whose base-delta increment it has received.
        seen_head: whether it has received the head once.
    """

    factors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    head: dict[str, Tensor] | None = None
    base_round: int = 0
    seen_head: bool = False


@dataclass
class _Outcome:
    update: ClientUpdate | None
    result: LocalResult
    bytes_up: int
    bytes_down: int
    trained: dict[str, LoRAFactors]
    head: dict[str, Tensor]
    start: dict[str, LoRAFactors]


@dataclass
class ClientTraining:
    """What :meth:`Simulation.train_client` returns.

    Attributes:
        result: steps, mean loss, and the reason to drop the client (or None).
        trained: the client's folded factors after training (its own coordinates).
        uploaded: the factors after ``prepare_upload``, float32; None if training failed.
        head: the head tensors after training.
    """

    result: LocalResult
    trained: dict[str, LoRAFactors]
    uploaded: dict[str, LoRAFactors] | None
    head: dict[str, Tensor]


class Simulation:
    """A federated run of ``config`` (see the module docstring).

    Args:
        config: the validated run configuration.
        task: the task plug-in (default: :func:`glora.tasks.build_task`).
        run_dir: where to write metrics, checkpoints and the adapter (None: nothing written).
        console: rich console for messages (None: quiet).
        progress: rich progress bars for rounds, clients and steps (None: no bars).
        loss_hook: ``hook(client_id, round, step, loss) -> loss`` (tests).
        update_hook: called once per kept client update of a round, before aggregation, with
            the round, the client's start factors (readout + local factors, float32) and its
            :class:`ClientUpdate` (analysis tools such as ``scripts/experiments.py trace``).
        aggregate_hook: called once per round that has kept updates, with the round and the
            list the aggregator is about to receive, while ``self.state`` is still the state
            the clients started from (:func:`glora.bench.fidelity.capture_updates`).
    """

    def __init__(
        self,
        config: RunConfig,
        task: Task | None = None,
        *,
        run_dir: RunDir | None = None,
        console: Console | None = None,
        progress: Progress | None = None,
        loss_hook: LossHook | None = None,
        update_hook: UpdateHook | None = None,
        aggregate_hook: AggregateHook | None = None,
    ) -> None:
        self.config = config
        self.task = task or build_task(config)
        self.run_dir = run_dir
        self.console = console
        self.progress = progress
        self.loss_hook = loss_hook
        self.update_hook = update_hook
        self.aggregate_hook = aggregate_hook
        self.device = resolve_device(config)
        self.seed = config.seed
        tr = config.training
        self.num_clients, self.ranks, self.participation, self.local_steps = (
            config.effective_federation()
        )
        self.local_epochs = tr.local_epochs

        self.task.load()
        base, _ = self.task.build_model()
        self.model = AdapterModel(
            base,
            self.ranks,
            target_modules=config.model.target_modules,
            lora_alpha=tr.lora_alpha,
            use_rslora=tr.use_rslora,
            lora_dropout=tr.lora_dropout,
            head_names=self.task.head_module_names(),
            device=self.device,
        )
        self.examples = list(self.task.train_examples())
        self.client_indices = client_partition(config, self.task, len(self.examples))
        self.agg: Aggregator = aggregators.build(
            config.method.aggregator, **{"seed": self.seed, **config.method.options}
        )
        self.r_max = max(self.ranks)
        initial = {
            m: LoRAFactors(*fresh_factors(d, k, self.r_max, seed=derive_seed(self.seed, "init", m)))
            for m, (d, k) in self.model.shapes.items()
        }
        self.state: ServerState = self.agg.init_state(initial)
        self.head: dict[str, Tensor] = self.model.get_head()
        self.stores: dict[str, ClientStore] = {}
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self._train_head = tr.head != "frozen"

    # ------------------------------------------------------------------ helpers
    def client_id(self, i: int) -> str:
        return str(i)

    def _log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def _store(self, cid: str) -> ClientStore:
        return self.stores.setdefault(cid, ClientStore())

    def _set_base_from_state(self) -> None:
        self.model.set_base(
            AdapterModel.dense(self.state.base_delta) if self.state.base_delta else None
        )

    def _client_start(
        self, cid: str, rank: int, local: frozenset[str]
    ) -> tuple[dict[str, LoRAFactors], set[str]]:
        """The client's start factors (readout + its local factors) and the local ones it lacks."""
        readout = self.agg.readout(self.state, rank)
        store = self._store(cid)
        start: dict[str, LoRAFactors] = {}
        lacking: set[str] = set()
        for m in self.model.modules:
            f = readout[m]
            A, B = f.A.float(), f.B.float()
            held = store.factors.get(m, {})
            for which in local:
                if which in held:
                    if which == "A":
                        A = held["A"]
                    else:
                        B = held["B"]
                else:
                    lacking.add(which)
            start[m] = LoRAFactors(A=A, B=B)
        return start, lacking

    # ------------------------------------------------------------------ one client
    def _run_client(self, t: int, i: int, steps_task: TaskID | None) -> _Outcome:
        cid = self.client_id(i)
        rank = self.ranks[i]
        plan = self.agg.client_plan(t)
        store = self._store(cid)
        start, lacking = self._client_start(cid, rank, plan.local)
        # bytes down: the plan's factors, local factors the client lacks, head, base increments
        down = sum(f.nbytes(plan.download | (lacking - plan.download)) for f in start.values())
        head_policy = self.config.training.head
        if head_policy == "fedavg" or not store.seen_head:
            down += tensor_bytes(self.head)
        store.seen_head = True
        increments = self.state.info.get("base_delta_increments", {}) or {}
        down += sum(int(b) for r, b in increments.items() if int(r) > store.base_round)
        store.base_round = self.state.round

        head = store.head if (head_policy == "local" and store.head is not None) else self.head
        if self.progress is not None and steps_task is not None:
            n = len(self.client_indices[i])
            total = self.local_steps or math.ceil(n / min(n, self.config.training.batch_size)) * (
                self.local_epochs or 1
            )
            self.progress.reset(steps_task, total=total, description=f"client {cid} steps")
        done = self.train_client(
            t,
            i,
            start,
            head,
            on_step=(
                (lambda: self.progress.advance(steps_task))  # type: ignore[union-attr]
                if self.progress is not None and steps_task is not None
                else None
            ),
        )
        result, trained, new_head, uploaded = done.result, done.trained, done.head, done.uploaded
        n = len(self.client_indices[i])
        if uploaded is None:
            return _Outcome(None, result, 0, down, trained, new_head, start)
        factors = {
            m: LoRAFactors(
                A=uploaded[m].A if "A" in plan.upload else start[m].A.float(),
                B=uploaded[m].B if "B" in plan.upload else start[m].B.float(),
            )
            for m in self.model.modules
        }
        extra = new_head if self._train_head and head_policy == "fedavg" else {}
        up = sum(f.nbytes(plan.upload) for f in factors.values()) + tensor_bytes(extra)
        update = ClientUpdate(client_id=cid, weight=float(n), factors=factors, extra=extra)
        return _Outcome(update, result, up, down, trained, new_head, start)

    def train_client(
        self,
        t: int,
        i: int,
        start: Mapping[str, LoRAFactors],
        head: Mapping[str, Tensor] | None = None,
        *,
        on_step: Callable[[], None] | None = None,
    ) -> ClientTraining:
        """Local training of client ``i`` in round ``t`` — the code every engine shares.

        Loads ``start`` (folded factors at the client's rank) and ``head`` into the model,
        freezes what the method's plan does not train, trains on the client's partition, reads
        the factors back and applies the method's ``prepare_upload``. The base weights must
        already be set (``W0 + base_delta``). ``uploaded`` is None when training failed.
        """
        rank = self.ranks[i]
        plan = self.agg.client_plan(t)
        if head:
            self.model.set_head(dict(head))
        self.model.load_factors(rank, dict(start))
        params = self.model.activate(rank, plan.train, self._train_head)
        examples = [self.examples[j] for j in self.client_indices[i]]
        tr = self.config.training
        result = train_local(
            self.model,
            self.task,
            examples,
            params,
            client_id=self.client_id(i),
            round=t,
            seed=self.seed,
            steps=self.local_steps,
            epochs=self.local_epochs,
            batch_size=tr.batch_size,
            lr=tr.lr,
            weight_decay=tr.weight_decay,
            bf16=tr.bf16 and self.device.type == "cuda",
            loss_hook=self.loss_hook,
            on_step=on_step,
        )
        trained = self.model.read_factors(rank)
        new_head = self.model.get_head()
        uploaded = None
        if result.error is None:
            prepared = self.agg.prepare_upload(t, dict(start), trained)
            uploaded = {m: LoRAFactors(A=f.A.float(), B=f.B.float()) for m, f in prepared.items()}
        return ClientTraining(result, trained, uploaded, new_head)

    # ------------------------------------------------------------------ one round
    def run_round(
        self, t: int, clients_task: TaskID | None = None, steps_task: TaskID | None = None
    ) -> dict[str, Any]:
        """Run round ``t`` (1-based) and return its ``metrics.jsonl`` record."""
        t0 = time.perf_counter()
        participants = sample_participants(
            self.num_clients,
            self.participation,
            t,
            derive_seed(self.seed, "participants") % (2**32),
        )
        plan = self.agg.client_plan(t)
        self._set_base_from_state()
        if self.progress is not None and clients_task is not None:
            self.progress.reset(
                clients_task, total=len(participants), description=f"round {t} clients"
            )
        kept: list[ClientUpdate] = []
        dropped: dict[str, str] = {}
        losses: list[float] = []
        bytes_up = bytes_down = 0
        outcomes: dict[str, _Outcome] = {}
        expected = {m: tuple(s) for m, s in self.model.shapes.items()}
        for i in participants:
            out = self._run_client(t, i, steps_task)
            cid = self.client_id(i)
            outcomes[cid] = out
            bytes_down += out.bytes_down
            if out.result.steps and math.isfinite(out.result.mean_loss):
                losses.append(out.result.mean_loss)
            if out.update is None:
                dropped[cid] = out.result.error or "training failed"
            else:
                try:
                    validate_updates([out.update], expected_shapes=expected)  # type: ignore[arg-type]
                except InvalidUpdate as exc:
                    dropped[cid] = f"invalid update: {exc}"
                else:
                    kept.append(out.update)
                    bytes_up += out.bytes_up
            if cid in dropped:
                self._log(f"[yellow]round {t}: dropped client {cid}: {dropped[cid]}[/yellow]")
            if self.progress is not None and clients_task is not None:
                self.progress.advance(clients_task)
        # client-side bookkeeping of the clients whose round succeeded
        for u in kept:
            out = outcomes[u.client_id]
            store = self._store(u.client_id)
            for m in self.model.modules:
                for which in plan.local:
                    tensor = out.trained[m].A if which == "A" else out.trained[m].B
                    store.factors.setdefault(m, {})[which] = tensor.clone()
            if self.config.training.head == "local":
                store.head = out.head
            if self.update_hook is not None:
                self.update_hook(t, out.start, u)
        if kept and self.aggregate_hook is not None:
            self.aggregate_hook(t, kept)
        s0 = time.perf_counter()
        aggregation_error = None
        if kept:
            try:
                self.state = self.agg.aggregate(kept)
            except InvalidUpdate as exc:
                aggregation_error = str(exc)
                self._log(f"[red]round {t}: aggregation rejected the round: {exc}[/red]")
        else:
            aggregation_error = "no valid client update"
            self._log(f"[red]round {t}: no valid client update; the state is unchanged[/red]")
        server_seconds = time.perf_counter() - s0
        if aggregation_error is None and self._train_head:
            self.head = fedavg_tensors(
                [outcomes[u.client_id].head for u in kept], [u.weight for u in kept]
            )
        self.round = t
        record: dict[str, Any] = {
            "round": t,
            "method": self.config.method.name,
            "participants": [self.client_id(i) for i in participants],
            "dropped": dropped,
            "train_loss": float(sum(losses) / len(losses)) if losses else None,
            "metrics": {},
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "server_seconds": server_seconds,
            "diagnostics": jsonable(self.state.diagnostics),
        }
        if aggregation_error is not None:
            record["aggregation_error"] = aggregation_error
        tr = self.config.training
        if t % tr.eval_every == 0 or t == tr.rounds:
            record["metrics"] = self.evaluate_global()
            if plan.local or tr.head == "local":
                record["metrics"]["personalized"] = self.evaluate_personalized(
                    [u.client_id for u in kept]
                )
        record["wall_seconds"] = time.perf_counter() - t0
        return record

    # ------------------------------------------------------------------ evaluation
    def global_effective(self) -> dict[str, LoRAFactors]:
        """``agg.effective_update(state)``: the global model's update relative to ``W0``."""
        return self.agg.effective_update(self.state)

    def apply_global(self) -> None:
        """Put the global model in place: ``W0 + effective update``, the global head."""
        self.model.set_base(AdapterModel.dense(self.global_effective()))
        self.model.set_head(self.head)

    def evaluate_global(self) -> dict[str, float]:
        """Metrics of the global model on the task's evaluation split."""
        self.apply_global()
        with self.model.adapters_disabled():
            out = self.task.evaluate(
                self.model.peft, batch_size=self.config.training.eval_batch_size
            )
        self._set_base_from_state()
        return out

    def evaluate_personalized(self, client_ids: list[str]) -> dict[str, float]:
        """Mean metrics of the participants' personalised models (readout + local parts)."""
        if not client_ids:
            return {}
        self._set_base_from_state()
        sums: dict[str, float] = {}
        for cid in client_ids:
            rank = self.ranks[int(cid)]
            start, _ = self._client_start(cid, rank, self._stored_kinds(cid))
            store = self._store(cid)
            self.model.set_head(store.head if store.head is not None else self.head)
            self.model.load_factors(rank, start)
            self.model.activate(rank, frozenset(), False)
            res = self.task.evaluate(
                self.model.peft,
                max_examples=self.config.training.personalized_eval_examples,
                batch_size=self.config.training.eval_batch_size,
            )
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + v
        self.model.set_head(self.head)
        return {k: v / len(client_ids) for k, v in sums.items()}

    def _stored_kinds(self, cid: str) -> frozenset[str]:
        held: set[str] = set()
        for named in self._store(cid).factors.values():
            held |= set(named)
        return frozenset(held)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Checkpoint:
        """The current round's checkpoint contents."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {}
        for cid, st in self.stores.items():
            for m, named in st.factors.items():
                for which, t in named.items():
                    tensors[f"c/{cid}/f/{m}/{which}"] = t
            if st.head is not None:
                for k, t in st.head.items():
                    tensors[f"c/{cid}/h/{k}"] = t
            meta[cid] = {"base_round": st.base_round, "seen_head": st.seen_head}
        return Checkpoint(
            round=self.round,
            state=self.state,
            options=jsonable(self.agg.options()),
            head=dict(self.head),
            client_tensors=tensors,
            client_meta=meta,
        )

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint."""
        self.agg.load_state(ckpt.state)
        self.state = ckpt.state
        self.head = {k: v.clone() for k, v in ckpt.head.items()}
        self.stores = {
            cid: ClientStore(base_round=int(v["base_round"]), seen_head=bool(v["seen_head"]))
            for cid, v in ckpt.client_meta.items()
        }
        for key, t in ckpt.client_tensors.items():
            _, cid, kind, rest = key.split("/", 3)
            st = self.stores.setdefault(cid, ClientStore())
            if kind == "f":
                m, _, which = rest.rpartition("/")
                st.factors.setdefault(m, {})[which] = t
            else:
                if st.head is None:
                    st.head = {}
                st.head[rest] = t
        self.round = ckpt.round

    # ------------------------------------------------------------------ export
    def export_adapter(self, path: os.PathLike[str] | str) -> None:
        """Write the global model as a PEFT adapter directory (see AdapterModel.export_adapter)."""
        self.model.export_adapter(
            path,
            lambda: self.task.build_model()[0],
            self.global_effective(),
            self.head,
            task_type=self.task.peft_task_type,
        )

    # ------------------------------------------------------------------ driver
    def run(
        self,
        *,
        start_round: int | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run rounds ``self.round + 1 .. training.rounds``; return their records."""
        tr = self.config.training
        first = (self.round if start_round is None else start_round - 1) + 1
        bars = self.progress
        rounds_task = clients_task = steps_task = None
        if bars is not None:
            rounds_task = bars.add_task("rounds", total=tr.rounds, completed=first - 1)
            clients_task = bars.add_task("clients", total=1)
            steps_task = bars.add_task("steps", total=1)
        for t in range(first, tr.rounds + 1):
            record = self.run_round(t, clients_task, steps_task)
            self.history.append(record)
            if self.run_dir is not None:
                self.run_dir.append_metrics(record)
                if t % tr.checkpoint_every == 0 or t == tr.rounds:
                    self.run_dir.save_checkpoint(self.checkpoint())
            if on_round is not None:
                on_round(record)
            if bars is not None and rounds_task is not None:
                bars.advance(rounds_task)
        if self.run_dir is not None:
            self.export_adapter(self.run_dir.adapter_path)
        return self.history
