"""GLoRAStrategy with mock replies and a fake Grid (no Flower runtime)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from glora import aggregators
from glora.data.partition import sample_participants
from glora.flower.codec import decode_factor_parts, encode_factors, encode_tensors
from glora.flower.strategy import GLoRAStrategy, default_client_id
from glora.linalg import fresh_factors
from glora.sim.rundir import RunDir
from glora.types import ClientUpdate, LoRAFactors
from tests.flower.fakes import FakeClient, error_reply, make_grid, node_id, reply

SHAPES = {"enc.0.query": (6, 5), "enc.0.value": (6, 5)}
RANKS = [2, 4, 3]


def initial(r: int = 4) -> dict[str, LoRAFactors]:
    out = {}
    for i, (m, (d, k)) in enumerate(sorted(SHAPES.items())):
        A, B = fresh_factors(d, k, r, seed=i)
        out[m] = LoRAFactors(A=A, B=B)
    return out


HEAD = {"classifier.weight": torch.zeros(2, 6), "classifier.bias": torch.zeros(2)}


def strategy(method: str = "glora", ranks: list[int] | None = None, **kw: object) -> GLoRAStrategy:
    opts = {"server_rank": 8} if method == "glora" else {}
    agg = aggregators.build(method, seed=0, **opts)
    ranks = ranks or RANKS
    return GLoRAStrategy(
        agg,
        num_clients=len(ranks),
        ranks=ranks,
        initial=initial(max(ranks)),
        initial_head=HEAD,
        **kw,  # type: ignore[arg-type]
    )


def test_configure_train_per_node_rank_payloads() -> None:
    s = strategy()
    grid, _ = make_grid(s.aggregator, 3)
    s.discover(grid, wait_for=range(3), timeout=1)
    assert s.nodes == {p: node_id(p) for p in range(3)}
    msgs = list(s.configure_train(1, s.global_arrays(), ConfigRecord(), grid))
    assert len(msgs) == 3
    for msg in msgs:
        pid = int(msg.content["config"]["partition-id"])
        assert msg.metadata.dst_node_id == node_id(pid)
        assert msg.content["config"]["rank"] == RANKS[pid]
        assert msg.content["config"]["server-round"] == 1
        parts = decode_factor_parts(msg.content["factors"])
        expect = s.aggregator.readout(s.state, RANKS[pid])
        for m, named in parts.items():
            assert named["A"].shape == (RANKS[pid], SHAPES[m][1])
            assert torch.equal(named["A"], expect[m].A) and torch.equal(named["B"], expect[m].B)
        assert "base" not in msg.content  # glora never changes the base weights


def test_sampling_is_the_simulators() -> None:
    s = strategy(participation=0.5, seed=3, ranks=[2] * 6)
    grid, _ = make_grid(s.aggregator, 6)
    s.discover(grid, timeout=0)
    for rnd in (1, 2, 3):
        msgs = list(s.configure_train(rnd, s.global_arrays(), ConfigRecord(), grid))
        got = sorted(int(m.content["config"]["partition-id"]) for m in msgs)
        assert got == sample_participants(6, 0.5, rnd, 3)


def test_local_factors_sent_until_the_node_holds_them() -> None:
    s = strategy("fedsa", ranks=[2, 2])
    grid, _ = make_grid(s.aggregator, 2)
    s.discover(grid, timeout=0)
    first = list(s.configure_train(1, s.global_arrays(), ConfigRecord(), grid))
    for msg in first:  # download A + the local B the node lacks
        assert {n for p in decode_factor_parts(msg.content["factors"]).values() for n in p} == {
            "A",
            "B",
        }
    replies = grid.send_and_receive(first)
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    second = list(s.configure_train(2, s.global_arrays(), ConfigRecord(), grid))
    for msg in second:
        assert {n for p in decode_factor_parts(msg.content["factors"]).values() for n in p} == {"A"}


def test_base_delta_is_sent_when_non_empty() -> None:
    s = strategy("fedex", ranks=[2, 2])
    grid, _ = make_grid(s.aggregator, 2)
    s.discover(grid, timeout=0)
    replies = grid.send_and_receive(
        list(s.configure_train(1, s.global_arrays(), ConfigRecord(), grid))
    )
    s.aggregate_train(1, replies)
    assert s.state.base_delta
    msgs = list(s.configure_train(2, s.global_arrays(), ConfigRecord(), grid))
    base = decode_factor_parts(msgs[0].content["base"])
    for m, f in s.state.base_delta.items():
        assert torch.equal(base[m]["A"], f.A) and torch.equal(base[m]["B"], f.B)


def manual_run(
    method: str, ranks: list[int], rounds: int, participation: float = 1.0, seed: int = 0
):
    """The protocol of docs/design.md driven directly (the in-process reference)."""
    opts = {"server_rank": 8} if method == "glora" else {}
    agg = aggregators.build(method, seed=0, **opts)
    state = agg.init_state(initial(max(ranks)))
    clients = {p: FakeClient(p, agg, 10 + p) for p in range(len(ranks))}
    head = dict(HEAD)
    for rnd in range(1, rounds + 1):
        updates = []
        for p in sample_participants(len(ranks), participation, rnd, seed):
            start = agg.readout(state, ranks[p])
            plan = agg.client_plan(rnd)
            grid_msg = type("M", (), {})()
            grid_msg.metadata = type("MD", (), {"message_type": "train"})()
            grid_msg.content = RecordDict(
                {
                    "factors": encode_factors(start),
                    "head": encode_tensors(head),
                    "config": ConfigRecord({"server-round": rnd, "rank": ranks[p]}),
                }
            )
            r = clients[p](node_id(p), grid_msg)
            parts = decode_factor_parts(r.content["factors"])
            factors = {
                m: LoRAFactors(
                    A=parts[m]["A"] if "A" in plan.upload else start[m].A,
                    B=parts[m]["B"] if "B" in plan.upload else start[m].B,
                )
                for m in start
            }
            from glora.flower.codec import decode_tensors

            updates.append(
                ClientUpdate(
                    default_client_id(p), 10 + p, factors, decode_tensors(r.content["head"])
                )
            )
        state = agg.aggregate(updates)
        w = torch.tensor([u.weight for u in updates], dtype=torch.float64)
        w = w / w.sum()
        head = {k: sum(u.extra[k] * w[i].float() for i, u in enumerate(updates)) for k in head}
    return agg.effective_update(state), head


@pytest.mark.parametrize("method", ["glora", "fedit", "ffa", "fedsa", "fedex", "flora", "rolora"])
def test_start_matches_the_protocol_driven_directly(method: str, tmp_path: Path) -> None:
    ranks = [2, 4, 3] if method in ("glora", "flora") else [2, 2, 2]
    s = strategy(method, ranks=ranks, run_dir=tmp_path)
    grid, _ = make_grid(s.aggregator, 3)
    s.start(grid, num_rounds=2, timeout=5)
    ref, ref_head = manual_run(method, ranks, 2)
    got = s.global_adapter()
    for m in ref:
        assert torch.allclose(got[m].delta(), ref[m].delta(), atol=1e-6)
    for k in ref_head:
        assert torch.allclose(s.head[k], ref_head[k], atol=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert set(lines[0]) == {
        "round",
        "method",
        "participants",
        "dropped",
        "train_loss",
        "metrics",
        "bytes_up",
        "bytes_down",
        "server_seconds",
        "diagnostics",
        "wall_seconds",
    }
    assert lines[0]["participants"] == ["0", "1", "2"]
    assert lines[0]["dropped"] == {}
    assert lines[0]["bytes_up"] > 0 and lines[0]["bytes_down"] > 0


def _round1(s: GLoRAStrategy):
    grid, _ = make_grid(s.aggregator, 3)
    s.discover(grid, timeout=0)
    msgs = list(s.configure_train(1, s.global_arrays(), ConfigRecord(), grid))
    return grid, msgs, list(grid.send_and_receive(msgs))


def _with_factors(r, factors, **metrics):
    content = RecordDict(
        {
            "factors": factors,
            "head": r.content["head"],
            "metrics": MetricRecord({**dict(r.content["metrics"]), **metrics}),
        }
    )
    return reply(content, r.metadata.src_node_id)


def test_malformed_and_error_replies_are_dropped_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = strategy()
    _, _, replies = _round1(s)
    good = replies[0]
    f = decode_factor_parts(replies[1].content["factors"])
    m = sorted(f)[0]
    f[m]["A"] = torch.full_like(f[m]["A"], float("nan"))
    nan_reply = _with_factors(
        replies[1],
        encode_factors({k: LoRAFactors(A=v["A"], B=v["B"]) for k, v in f.items()}),
    )
    err = error_reply("ClientApp crashed", node_id(2))
    with caplog.at_level(logging.WARNING, logger="glora.flower"):
        arrays, metrics = s.aggregate_train(1, [good, nan_reply, err])
    assert arrays is not None and metrics is not None
    assert s.state.round == 1
    entry = s.last_log
    assert entry is not None and entry["participants"] == ["0", "1", "2"]
    reasons = entry["dropped"]
    assert set(reasons) == {"1", "2"}
    assert "NaN" in reasons["1"]
    assert "ClientApp crashed" in reasons["2"]
    assert "NaN" in caplog.text and "ClientApp crashed" in caplog.text


@pytest.mark.parametrize(
    "breakage, reason",
    [
        ("wrong_shape", "module is"),
        ("wrong_rank", "reports rank"),
        ("missing_metric", "metrics lack"),
        ("bad_key", "unexpected key"),
        ("unknown_partition", "was not sampled"),
        ("missing_factor", "missing"),
        ("bad_head", "head tensor"),
    ],
)
def test_each_malformation_is_rejected(breakage: str, reason: str) -> None:
    s = strategy()
    _, _, replies = _round1(s)
    r = replies[1]
    parts = decode_factor_parts(r.content["factors"])
    factors = {k: LoRAFactors(A=v["A"], B=v["B"]) for k, v in parts.items()}
    metrics = dict(r.content["metrics"])
    content = {"factors": encode_factors(factors), "head": r.content["head"]}
    if breakage == "wrong_shape":
        m = sorted(factors)[0]
        content["factors"] = encode_factors(
            {**factors, m: LoRAFactors(A=torch.randn(4, 9), B=torch.randn(6, 4))}
        )
    elif breakage == "wrong_rank":
        metrics["rank"] = 16
    elif breakage == "missing_metric":
        del metrics["num-examples"]
    elif breakage == "bad_key":
        rec = encode_factors(factors)
        rec["stray"] = rec[sorted(rec)[0]]
        content["factors"] = rec
    elif breakage == "unknown_partition":
        metrics["partition-id"] = 99
    elif breakage == "missing_factor":
        content["factors"] = encode_factors(factors, ["A"])
    elif breakage == "bad_head":
        content["head"] = encode_tensors(
            {"classifier.weight": torch.zeros(3, 3), "classifier.bias": torch.zeros(2)}
        )
    bad = reply(RecordDict({**content, "metrics": MetricRecord(metrics)}), r.metadata.src_node_id)
    s.aggregate_train(1, [replies[0], bad, replies[2]])
    entry = s.last_log
    assert entry is not None and "aggregation_error" not in entry
    assert list(entry["dropped"]) == ["1"] and reason in entry["dropped"]["1"]
    assert s.state.round == 1


def test_min_replies_skips_the_round_with_state_unchanged() -> None:
    s = strategy(min_replies=2)
    _, _, replies = _round1(s)
    before = {m: f.delta().clone() for m, f in s.aggregator.readout(s.state).items()}
    head_before = {k: v.clone() for k, v in s.head.items()}
    arrays, metrics = s.aggregate_train(1, [replies[0], error_reply("boom", node_id(1))])
    assert arrays is None and metrics is None
    assert s.state.round == 0
    for m, d in before.items():
        assert torch.equal(s.aggregator.readout(s.state)[m].delta(), d)
    for k, v in head_before.items():
        assert torch.equal(s.head[k], v)
    assert s.last_log is not None and "min_replies" in s.last_log["aggregation_error"]


def test_duplicate_reply_is_dropped() -> None:
    s = strategy()
    _, _, replies = _round1(s)
    s.aggregate_train(1, [replies[0], replies[0], replies[1]])
    assert s.last_log is not None
    assert s.state.round == 1
    assert "second reply" in s.last_log["dropped"]["0"]


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = strategy(run_dir=tmp_path / "a")
    grid, _ = make_grid(straight.aggregator, 3)
    straight.start(grid, num_rounds=4, timeout=5)

    first = strategy(run_dir=tmp_path / "b", checkpoint_every=2)
    grid_b, _ = make_grid(first.aggregator, 3)
    first.start(grid_b, num_rounds=3, timeout=5)  # checkpoints at 2 and 3
    rd = RunDir(tmp_path / "b")
    assert rd.checkpoint_rounds() == [2, 3]
    assert {p.name for p in rd.checkpoints_path.iterdir()} == {"round_0002", "round_0003"}
    loaded = rd.load_checkpoint()
    assert loaded.round == 3 and loaded.state.round == 3
    assert set(loaded.head) == set(HEAD)

    resumed = strategy(run_dir=tmp_path / "b", checkpoint_every=2)
    grid_c, _ = make_grid(resumed.aggregator, 3)
    resumed.start(grid_c, num_rounds=4, timeout=5, resume=True)
    assert resumed.completed_round == 4
    a, b = straight.global_adapter(), resumed.global_adapter()
    for m in a:
        assert torch.allclose(a[m].delta(), b[m].delta(), atol=1e-6)
    for k in straight.head:
        assert torch.allclose(straight.head[k], resumed.head[k], atol=1e-6)
    rounds = [
        json.loads(x)["round"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rounds == [1, 2, 3, 4]


def test_resume_after_a_crash_redoes_the_rounds_after_the_checkpoint(tmp_path: Path) -> None:
    s = strategy(run_dir=tmp_path, checkpoint_every=1)
    grid, _ = make_grid(s.aggregator, 3)
    s.start(grid, num_rounds=2, timeout=5)
    # simulate a crash after round 3's metrics line but before its checkpoint
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"round": 3}) + "\n")
    (tmp_path / "checkpoints" / ".tmp-half-written").mkdir()
    r = strategy(run_dir=tmp_path, checkpoint_every=1)
    grid2, _ = make_grid(r.aggregator, 3)
    r.start(grid2, num_rounds=3, timeout=5, resume=True)
    rounds = [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert r.state.round == 3


def test_missing_node_counts_as_dropped() -> None:
    s = strategy(discovery_timeout=0.0)
    grid, _ = make_grid(s.aggregator, 3)
    del grid.handlers[node_id(1)]
    s.start(grid, num_rounds=1, timeout=5)
    assert s.history[0]["participants"] == ["0", "1", "2"]
    assert s.history[0]["dropped"] == {"1": "no SuperNode serves this partition"}
    assert s.state.round == 1


def test_bad_arguments() -> None:
    agg = aggregators.build("fedit")
    with pytest.raises(ValueError, match="min_replies"):
        GLoRAStrategy(agg, num_clients=2, ranks=[2, 2], min_replies=0)
    with pytest.raises(ValueError, match="ranks"):
        GLoRAStrategy(agg, num_clients=2, ranks=[2])
