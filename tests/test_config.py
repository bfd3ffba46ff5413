"""Config validation: dotted paths, allowed values, method options, ranks, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from glora.config import ConfigError, apply_overrides, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _err(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return str(info.value)


def test_defaults_and_shipped_configs() -> None:
    cfg = validate_config({})
    assert cfg.method.name == "glora" and cfg.training.head == "fedavg"
    for name in ("quickstart.yaml", "sst2_glora.yaml"):
        load_config(ROOT / "configs" / name)


def test_unknown_key_lists_allowed_keys() -> None:
    msg = _err({"training": {"roundz": 3}})
    assert "training.roundz: unknown key" in msg and "rounds" in msg and "local_steps" in msg
    assert "(config)" not in _err({"bogus": 1}) and "bogus: unknown key" in _err({"bogus": 1})


def test_bad_literal_lists_allowed_values() -> None:
    msg = _err({"federation": {"partition": "zipf"}})
    assert "federation.partition" in msg
    assert all(v in msg for v in ("iid", "dirichlet", "quantity"))
    msg = _err({"training": {"head": "shared"}})
    assert "training.head" in msg and "fedavg" in msg and "frozen" in msg


def test_unknown_method_and_option() -> None:
    msg = _err({"method": {"name": "fedprox"}})
    assert "method.name" in msg and "glora" in msg and "centralized" in msg
    msg = _err({"method": {"name": "glora", "server_rnk": 4}})
    assert "method.server_rnk" in msg and "server_rank" in msg
    assert "method:" in _err({"method": {"name": "glora", "server_rank": "huge"}})


def test_same_rank_method_with_mixed_ranks() -> None:
    msg = _err({"method": {"name": "fedit"}, "federation": {"ranks": [2, 4]}})
    assert "federation.ranks" in msg and "equal ranks" in msg and "method.pad: true" in msg
    validate_config({"method": {"name": "fedit", "pad": True}, "federation": {"ranks": [2, 4]}})
    validate_config({"method": {"name": "fedit"}, "federation": {"ranks": 4}})


def test_ranks_forms() -> None:
    cfg = validate_config({"federation": {"clients": 5, "ranks": [2, 8]}})
    assert cfg.federation.client_ranks(0) == [2, 8, 2, 8, 2]
    cfg = validate_config({"federation": {"clients": 50, "ranks": "uniform:2,4,8,16"}})
    ranks = cfg.federation.client_ranks(0)
    assert set(ranks) <= {2, 4, 8, 16} and len(set(ranks)) > 1
    assert ranks == cfg.federation.client_ranks(0)
    assert "federation.ranks" in _err({"federation": {"ranks": "zipf:2"}})
    assert "federation.ranks" in _err({"federation": {"ranks": [0, 2]}})


def test_participation() -> None:
    assert "federation.participation" in _err({"federation": {"participation": 1.5}})
    assert "participation" in _err({"federation": {"clients": 3, "participation": 5}})
    cfg = validate_config({"federation": {"clients": 10, "participation": 3}})
    assert cfg.federation.participants_per_round() == 3


def test_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "training": {"rounds": 2}}))
    cfg = load_config(
        p, ["training.rounds=5", "method.name=flexlora", "federation.ranks=[4, 8]", "seed=3"]
    )
    assert cfg.training.rounds == 5 and cfg.method.name == "flexlora"
    assert cfg.federation.ranks == [4, 8] and cfg.seed == 3
    cfg = load_config(p, ["method.server_rank=6"])
    assert cfg.method.options == {"server_rank": 6}
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match=r"training\.rounds"):
        load_config(p, ["training.rounds=zero"])


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_centralized_effective_federation() -> None:
    cfg = validate_config(
        {
            "method": {"name": "centralized"},
            "federation": {"clients": 10, "participation": 0.5, "ranks": [2, 16]},
            "training": {"local_steps": 20},
        }
    )
    assert cfg.effective_federation() == (1, [16], 1.0, 100)
