"""The glora ServerApp: the same run as ``glora run CONFIG.yaml``, with clients on SuperNodes.

Run config keys (scalars, ``--run-config "k=v ..."``):

* ``config`` (str, required): path of the YAML config that ``glora run`` reads;
* ``run-dir`` (str): the run directory (default: ``output.dir/name`` of the config);
* ``resume`` / ``overwrite`` (bool): as ``glora run --resume`` / ``--overwrite``;
* ``min-replies`` (int, default 1): fewer valid replies skip the round, state unchanged;
* ``round-timeout`` (float s, default 600): how long a round waits for replies;
* ``discovery-timeout`` (float s, default 120): how long round 1 waits for every SuperNode.

The server builds the model, data partitions, initial adapter and head exactly as the simulator
(:class:`glora.sim.engine.Simulation`), drives :class:`~glora.flower.strategy.GLoRAStrategy`,
evaluates the global model every ``training.eval_every`` rounds, and writes ``config.yaml``,
``metrics.jsonl``, ``checkpoints/`` and the final PEFT ``adapter/`` in ``glora run``'s layout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

__all__ = ["RUN_CONFIG_DEFAULTS", "build_server_app", "run_server"]

log = logging.getLogger("glora.flower")

RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "",
    "run-dir": "",
    "resume": False,
    "overwrite": False,
    "min-replies": 1,
    "round-timeout": 600.0,
    "discovery-timeout": 120.0,
}


def _setting(context: Context, key: str) -> Any:
    return context.run_config.get(key, RUN_CONFIG_DEFAULTS[key])


def run_server(grid: Grid, context: Context) -> Path:
    """The ServerApp's main: one whole run (see the module docstring); returns the run dir."""
    from glora.config import load_config
    from glora.flower.strategy import GLoRAStrategy
    from glora.linalg import derive_seed
    from glora.sim import RunDir, RunDirError, resume_config
    from glora.sim.engine import Simulation

    logging.basicConfig(level=logging.INFO)
    config_path = str(_setting(context, "config"))
    if not config_path:
        raise ValueError("run config key 'config' (path of the YAML config) is required")
    cfg = load_config(config_path)
    run_dir = str(_setting(context, "run-dir"))
    resume = bool(_setting(context, "resume"))
    overwrite = bool(_setting(context, "overwrite"))
    if run_dir:
        p = Path(run_dir)
        cfg = cfg.model_copy(
            update={"name": p.name, "output": cfg.output.model_copy(update={"dir": str(p.parent)})}
        )
    if resume:
        cfg = resume_config(cfg.run_dir, cfg)
    rd = RunDir(cfg.run_dir)
    with rd:
        if resume:
            if not rd.checkpoint_rounds():
                raise RunDirError(f"{str(rd.path)!r} has no complete checkpoint to resume from")
        elif rd.holds_run():
            if not overwrite:
                raise RunDirError(
                    f"{str(rd.path)!r} already holds a run; pass --overwrite to replace it"
                )
            rd.clear()
        rd.write_config(cfg.to_yaml_dict())
        sim = Simulation(cfg)
        tr = cfg.training

        def evaluate(rnd: int, strategy: GLoRAStrategy) -> dict[str, Any] | None:
            if not (rnd % tr.eval_every == 0 or rnd == tr.rounds):
                return None
            sim.state, sim.head = strategy.state, dict(strategy.head)
            return sim.evaluate_global()

        strategy = GLoRAStrategy(
            sim.agg,
            num_clients=sim.num_clients,
            ranks=sim.ranks,
            participation=sim.participation,
            seed=derive_seed(cfg.seed, "participants") % (2**32),
            initial_head=sim.head,
            min_replies=int(_setting(context, "min-replies")),
            run_dir=rd,
            checkpoint_every=tr.checkpoint_every,
            discovery_timeout=float(_setting(context, "discovery-timeout")),
            client_id=sim.client_id,
            head_policy=tr.head,
            method_label=cfg.method.name,
            evaluate=evaluate,
        )
        strategy.start(
            grid,
            num_rounds=tr.rounds,
            timeout=float(_setting(context, "round-timeout")),
            resume=resume,
        )
        sim.state, sim.head = strategy.state, dict(strategy.head)
        sim.export_adapter(rd.adapter_path)
        log.info("run finished: %s", rd.path)
        return rd.path


def build_server_app() -> ServerApp:
    """The ServerApp whose main is :func:`run_server`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context)

    return app
