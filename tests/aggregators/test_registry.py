"""The aggregator registry: names, options and explicit errors."""

from __future__ import annotations

import pytest

from glora import aggregators
from glora.aggregators.base import Aggregator
from glora.aggregators.fedit import FedIT

EXPECTED = [
    "fedex", "fedit", "fedrot", "fedsa", "ffa", "flexlora",
    "flora", "florana", "glora", "hetlora", "lorafair", "rolora",
]  # fmt: skip


def test_available_names_exactly():
    assert aggregators.available() == EXPECTED


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown aggregator 'fedavg'; valid names: fedex, fedit"):
        aggregators.build("fedavg")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) rank .*valid options: .*server_rank"
    ):
        aggregators.build("glora", rank=4)


def test_bad_base_option_values():
    for opts in ({"pad": "yes"}, {"max_rank": 0}, {"max_abs": -1}, {"seed": 1.5}):
        with pytest.raises(ValueError):
            aggregators.build("fedit", **opts)


def test_register_custom_rule_and_duplicates():
    class Mine(FedIT):
        name = "mine-test"

    aggregators.register("mine-test", Mine)
    try:
        assert isinstance(aggregators.build("mine-test"), Mine)
        assert "mine-test" in aggregators.available()
        with pytest.raises(ValueError, match="already registered"):
            aggregators.register("mine-test", Mine)
        with pytest.raises(ValueError, match="already registered"):
            aggregators.register("glora", Mine)
        with pytest.raises(TypeError):
            aggregators.register("x", object)  # type: ignore[arg-type]
    finally:
        aggregators._REGISTERED.pop("mine-test", None)


def test_options_roundtrip_through_build():
    agg = aggregators.build("glora", server_rank="auto", energy=0.8)
    again = aggregators.build("glora", **agg.options())
    assert again.options() == agg.options()
    assert isinstance(agg, Aggregator)
    assert "server_rank='auto'" in repr(agg)
