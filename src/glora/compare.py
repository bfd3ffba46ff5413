"""Compare aggregation methods on one federation: run a method × seed grid and write a report.

Every run shares the base configuration; only ``method`` (name and options) and ``seed`` vary, so
for one seed every method sees the same data splits, client ranks and client sampling. Runs go to
``<out>/runs/<label>-seed<seed>/`` (standard run directories), the report to ``<out>/``:

* ``table.csv`` / ``table.md``: final and best primary metric, mean ± std over seeds, per method;
* ``cost.csv`` / ``cost.md``: bytes up/down per round and server seconds per round;
* ``per_seed.csv``: every run's final and best metric and its metric-per-round curve;
* ``paired.csv``: per method, the seed-paired difference of its final metric from the reference
  method's (GLoRA when it ran; the runs of one seed share splits, ranks and sampling, so the
  paired difference removes the seed's own variance), mean ± std, the seeds it was better on
  and the paired t-test p-value;
* ``<metric>_vs_round.png``: one line per method (mean over seeds), band = ± one std;
* ``train_loss_vs_round.png``: the same for the round's mean client training loss;
* ``status.json``: every run's status (done, unsupported with the reason, failed) and wall time;
  calls with the same base config add to it (two processes may run disjoint seeds or methods
  into one report directory; a last call over all of them skips the finished runs and writes
  the whole report with every run's wall time);
* ``records/<run>.json``: each finished run's config and round records without the per-module
  diagnostics (~25 kB for 100 rounds): what the report is built from, small enough to commit;
* ``report.md``: ties them together; where the evaluations record ``top_prediction_share``
  (classification), it counts the runs and evaluations that predict one class for at least 99 %
  of the examples, whose metric says which class they predict rather than what they learned.

The grid is resumable: a finished run is skipped, an interrupted one is resumed through the
simulator's resume (``resume=True``); its wall time adds the time already spent (``status.json``'s
or, when the process running it was killed before saving that, the sum of its recorded rounds'
``wall_seconds``). A finished run whose run directory is gone (a fresh clone of a repository
that commits the report but not the runs) is skipped too when ``records/`` holds it under the
same configuration, so a comparison can be extended with more methods or seeds later.
Methods that cannot run the setting (e.g. mixed ranks with a same-rank rule and no padding) are
listed with the reason, not dropped.

Python API: :func:`run_compare` (runs + report) and :func:`write_report` (report only).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glora import aggregators
from glora.config import (
    CENTRALIZED,
    ConfigError,
    RunConfig,
    apply_overrides,
    read_raw,
    validate_config,
)
from glora.data.glue import TOP_PREDICTION_SHARE
from glora.fileio import write_text_atomic
from glora.types import UnsupportedRanks

__all__ = [
    "MethodSpec",
    "RunOutcome",
    "Runner",
    "default_runner",
    "parse_methods",
    "plan_config",
    "run_compare",
    "write_report",
]

#: ``runner(config, resume)`` runs (or resumes) one simulation to completion.
Runner = Callable[[RunConfig, bool], Any]

_PRIMARY_FALLBACK = ("accuracy", "matthews", "mcc", "pearson", "f1", "rougeL", "rouge_l")


# ---------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """One method of the comparison: a label, the registry name and its options."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    padded: bool = False

    @property
    def slug(self) -> str:
        """The label as a directory name."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label).strip("_") or "method"


def _split_top(text: str) -> list[str]:
    """Split on commas outside ``[...]``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [x.strip() for x in out if x.strip()]


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_methods(text: str) -> list[MethodSpec]:
    """``"glora,fedit,glora[server_rank=32;energy=0.95]"`` → method specs.

    Options go in brackets, ``;``-separated, values parsed as YAML. The label is the spec text.
    """
    out = []
    for item in _split_top(text):
        m = re.fullmatch(r"([A-Za-z0-9_-]+)(?:\[(.*)\])?", item)
        if not m:
            raise ValueError(f"bad method spec {item!r}; expected name or name[key=value;...]")
        name, opts_text = m.group(1), m.group(2)
        options: dict[str, Any] = {}
        for kv in (opts_text or "").split(";"):
            if not kv.strip():
                continue
            key, sep, value = kv.partition("=")
            if not sep:
                raise ValueError(f"bad option {kv!r} in {item!r}; expected key=value")
            options[key.strip()] = _parse_value(value.strip())
        out.append(MethodSpec(item, name, options))
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate methods in {text!r}")
    return out


def _same_rank_only(name: str) -> bool:
    if name == CENTRALIZED:
        return False
    try:
        return not aggregators.get_class(name).mixed_ranks
    except ValueError:
        return False


# ---------------------------------------------------------------------------- configs
def plan_config(
    base: Mapping[str, Any],
    spec: MethodSpec,
    seed: int,
    runs_dir: str | Path,
) -> RunConfig:
    """The validated config of one run: ``base`` with ``method``, ``seed``, name and output set.

    The base config's method options are kept only for the same method name.

    Raises:
        ConfigError: the method cannot run this setting (the message says why).
    """
    raw = dict(base)
    base_method = dict(raw.get("method") or {})
    opts = {k: v for k, v in base_method.items() if k != "name"}
    method = {"name": spec.name, **(opts if base_method.get("name") == spec.name else {})}
    method.update(spec.options)
    if spec.padded:
        method["pad"] = True
    raw["method"] = method
    raw["seed"] = int(seed)
    raw["name"] = f"{spec.slug}-seed{seed}"
    raw["output"] = {**dict(raw.get("output") or {}), "dir": str(runs_dir)}
    return validate_config(raw)


def _with_pad(base: Mapping[str, Any], specs: Sequence[MethodSpec], seed: int) -> list[MethodSpec]:
    """Same-rank methods get ``pad: true`` (labelled) when the clients' ranks differ."""
    try:
        probe = validate_config({**dict(base), "method": {"name": "glora"}, "seed": seed})
        mixed = len(set(probe.federation.client_ranks(seed))) > 1
    except ConfigError:
        mixed = True
    out = []
    for s in specs:
        if mixed and _same_rank_only(s.name) and not s.options.get("pad"):
            out.append(MethodSpec(f"{s.label} (zero-pad)", s.name, dict(s.options), padded=True))
        else:
            out.append(s)
    return out


# ---------------------------------------------------------------------------- running
def default_runner(config: RunConfig, resume: bool) -> Any:
    """Run (or resume) one simulation with the in-process simulator, in ``config.run_dir``.

    Resume loads the latest complete checkpoint and drops the metrics of later rounds; a run
    directory without a checkpoint is started over.
    """
    from glora.sim.engine import Simulation
    from glora.sim.rundir import RunDir

    with RunDir(config.run_dir) as rd:
        sim = Simulation(config, run_dir=rd)
        if resume and rd.checkpoint_rounds():
            ckpt = rd.load_checkpoint()
            sim.restore(ckpt)
            rd.truncate_metrics(ckpt.round)
        elif rd.holds_run():
            rd.clear()
        if not rd.config_path.exists():
            rd.write_config(config.to_yaml_dict())
        return sim.run()


@dataclass
class RunOutcome:
    """What happened to one method × seed run."""

    label: str
    method: str
    seed: int
    status: str  # done | unsupported | failed | pending
    reason: str = ""
    run_dir: str = ""
    wall_seconds: float = 0.0
    padded: bool = False

    @property
    def key(self) -> str:
        """``label|seed``: the run's key in ``status.json``."""
        return f"{self.label}|{self.seed}"


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def _recorded_wall(recs: Sequence[Mapping[str, Any]]) -> float:
    """Sum of the rounds' ``wall_seconds`` in a run's records (``metrics.jsonl``; 0 without any).

    A lower bound of the time a cut run spent: it leaves out model loading and the round that
    was cut.
    """
    total = 0.0
    for r in recs:
        v = r.get("wall_seconds")
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            total += float(v)
    return total


def _finished(run_dir: Path, rounds: int) -> bool:
    return _reaches(_read_metrics(run_dir), rounds)


def _round(record: Mapping[str, Any]) -> int:
    return int(record.get("round", 0))


def _reaches(recs: Sequence[Mapping[str, Any]], rounds: int) -> bool:
    return bool(recs) and max(_round(r) for r in recs) >= rounds


#: a run's evaluation counts as one class when at least this share of the examples get the
#: most-predicted class (``top_prediction_share``)
ONE_CLASS_SHARE = 0.99


# ---------------------------------------------------------------------------- kept records
#: the report directory's subdirectory that keeps each finished run's records
RECORDS = "records"
#: config keys a kept run may differ on and still be reused, beyond ``glora.sim.RESUMABLE_KEYS``:
#: where the data directory is (a fresh clone may keep ``../shared`` elsewhere; the task and
#: its subsample are compared)
_KEPT_IGNORE = ("data.dir",)


def _kept_path(out: Path, run_name: str) -> Path:
    return out / RECORDS / f"{run_name}.json"


def _keep_records(out: Path, run_dir: Path) -> dict[str, Any] | None:
    """Write ``out/records/<run>.json``: the run's saved config and its round records without
    ``diagnostics`` (per-module spectra, the bulk of ``metrics.jsonl``); atomic. Returns the
    saved config it kept (``None`` for a directory without ``config.yaml``: nothing kept)."""
    import yaml

    if not (run_dir / "config.yaml").is_file():  # not a simulator run directory: nothing to reuse
        return None
    recs = [{k: v for k, v in r.items() if k != "diagnostics"} for r in _read_metrics(run_dir)]
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    path = _kept_path(out, run_dir.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"config": config, "records": recs}) + "\n")
    return config


def _read_kept(out: Path, run_name: str) -> dict[str, Any] | None:
    path = _kept_path(out, run_name)
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return kept if isinstance(kept, dict) and isinstance(kept.get("records"), list) else None


def _kept_changes(kept: Mapping[str, Any], config: RunConfig) -> list[str]:
    """The config keys on which the kept run differs from ``config`` (empty: reusable)."""
    from glora.sim import config_changes

    try:
        saved = validate_config(dict(kept.get("config") or {}))
    except ConfigError as exc:
        return [f"its saved config is not valid ({exc})"]
    return config_changes(saved, config, ignore=_KEPT_IGNORE)


def _differs_note(saved: Mapping[str, Any] | None, config: RunConfig, keys: tuple[str, ...]) -> str:
    """`` (it differs from this call on <key old → new>, ...)`` for the ``keys`` on which a run's
    saved config differs from ``config`` (empty when none does, or when it cannot be read)."""
    from glora.sim import resumable_changes

    if not saved:
        return ""
    try:
        changes = resumable_changes(validate_config(dict(saved)), config, keys)
    except ConfigError:
        return ""
    return f" (it differs from this call on {', '.join(changes)})" if changes else ""


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's ``config.yaml`` as a mapping (``None`` when absent or unreadable)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def _run_records(out: Path, run_dir: str) -> list[dict[str, Any]]:
    """A run's round records: from its run directory, else from the report's kept copy.

    An empty or unreadable ``metrics.jsonl`` (a run directory recreated after the run finished)
    counts as absent, so the kept copy is read rather than the run reported as recordless.
    """
    records = _read_metrics(out / run_dir)
    if records:
        return records
    kept = _read_kept(out, Path(run_dir).name)
    return list(kept["records"]) if kept else []


def _holds_run(run_dir: Path) -> bool:
    return any((run_dir / p).exists() for p in ("config.yaml", "metrics.jsonl", "checkpoints"))


def _stale_run(run_dir: Path, config: RunConfig) -> str | None:
    """Why the run already in ``run_dir`` is not a run of ``config`` (``None`` when it is).

    A finished run is reused and an unfinished one resumed only when its saved config equals the
    planned one up to the keys a resume may change (``glora.sim.RESUMABLE_KEYS``: more rounds,
    evaluation cadence, device); otherwise a changed lr or split would be reported silently.
    """
    if not (run_dir / "config.yaml").is_file():
        return None
    from glora.sim import resume_config
    from glora.sim.rundir import RunDirError

    try:
        resume_config(run_dir, config)
    except (RunDirError, ConfigError) as exc:
        return str(exc)
    return None


def _check_existing_runs(
    base: Mapping[str, Any],
    specs: Sequence[MethodSpec],
    seeds: Sequence[int],
    runs_dir: Path,
    resume: bool,
    out: Path,
) -> None:
    """Refuse, before any run starts, run directories (or, where a run directory is gone, the
    report's kept records) that would be overwritten or misread.

    Raises:
        FileExistsError: without ``resume``, a planned run directory already holds a run.
        ValueError: with ``resume``, a directory holds a run of another configuration.
    """
    stale: list[str] = []
    for seed in seeds:
        for spec in specs:
            try:
                cfg = plan_config(base, spec, seed, runs_dir)
            except (ConfigError, UnsupportedRanks):
                continue  # reported as unsupported by the run loop
            if not _holds_run(cfg.run_dir):
                kept = _read_kept(out, cfg.run_dir.name)
                if kept is None:
                    continue
                where = _kept_path(out, cfg.run_dir.name)
                if not resume:
                    raise FileExistsError(
                        f"{where} keeps a finished run; pass resume=True (--resume) to reuse "
                        "it, or choose another output directory"
                    )
                changed = _kept_changes(kept, cfg)
                if changed:
                    stale.append(
                        f"[{spec.label} seed {seed}] {where} keeps a run with "
                        f"{', '.join(changed)} changed"
                    )
                continue
            if not resume:
                raise FileExistsError(
                    f"{cfg.run_dir} already holds a run; pass resume=True (--resume) to reuse "
                    "finished runs and resume unfinished ones, or choose another output directory"
                )
            why = _stale_run(cfg.run_dir, cfg)
            if why is not None:
                stale.append(f"[{spec.label} seed {seed}] {why}")
    if stale:
        raise ValueError(
            f"{len(stale)} run director{'y holds a run' if len(stale) == 1 else 'ies hold runs'} "
            "of another configuration, which --resume would mix into this report:\n  "
            + "\n  ".join(stale)
            + "\nchoose another output (runs) directory, or delete those runs"
        )


def _read_status(out: Path) -> dict[str, Any]:
    """The parsed ``out/status.json`` (``{}`` when there is none)."""
    p = out / "status.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def _load_status(out: Path) -> dict[str, dict[str, Any]]:
    """``{"label|seed": run entry}`` of ``out/status.json``."""
    return {r["key"]: r for r in _read_status(out).get("runs", [])}


def _save_status(
    out: Path,
    outcomes: Sequence[RunOutcome],
    meta: Mapping[str, Any],
    observed: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """Write ``status.json``: this call's runs, plus the runs another call of the same base
    config recorded there (e.g. a second process that ran other seeds into this directory).

    ``observed`` are the keys (``label|seed``) of runs this call did not run itself: skipped as
    finished, or refused because another process held the run directory. Where the file lists
    such a run as done, its entry (with the wall time of the process that ran it) is kept.
    Returns the entries written, ``{"label|seed": entry}``.

    The file is re-read just before writing, under an exclusive lock on ``out`` (see
    :func:`_status_lock`), so two processes on disjoint runs of one comparison keep each other's
    entries: one process's read-merge-write cannot interleave with another's. A file of another
    base config is replaced whole: its runs are of another federation.
    """
    runs = [{"key": o.key, **asdict(o)} for o in outcomes]
    mine = {r["key"] for r in runs}
    methods, seeds = list(meta["methods"]), list(meta["seeds"])
    with _status_lock(out):
        old = _read_status(out)
        if old.get("base_config") == json.loads(json.dumps(meta["base_config"])):
            theirs = {r.get("key"): r for r in old.get("runs", [])}
            runs = [
                theirs[r["key"]]
                if r["key"] in observed and theirs.get(r["key"], {}).get("status") == "done"
                else r
                for r in runs
            ]
            runs += [r for r in old.get("runs", []) if r.get("key") not in mine]
            labels = {m["label"] for m in methods}
            methods += [m for m in old.get("methods", []) if m.get("label") not in labels]
            seeds = sorted(set(seeds) | set(old.get("seeds", [])))
        status = {**meta, "methods": methods, "seeds": seeds, "runs": runs}
        write_text_atomic(out / "status.json", json.dumps(status, indent=2) + "\n")
    return {r["key"]: r for r in runs}


@contextlib.contextmanager
def _status_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the report directory ``out`` itself (no lock file is left
    behind) for the block; another process's ``_save_status`` on ``out`` waits for it."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def run_compare(
    config: str | Path | Mapping[str, Any],
    methods: Sequence[MethodSpec] | str,
    seeds: Sequence[int],
    out: str | Path,
    *,
    resume: bool = False,
    pad: bool = False,
    centralized: bool = False,
    overrides: Sequence[str] = (),
    runner: Runner | None = None,
    metric: str | None = None,
    log: Callable[[str], None] | None = print,
    runs_dir: str | Path | None = None,
    reference: str | None = None,
) -> list[RunOutcome]:
    """Run every method × seed (skipping finished runs with ``resume``) and write the report.

    Args:
        config: the base config (a YAML path or a raw mapping); ``overrides`` are ``--set`` items.
        methods: specs or a ``parse_methods`` string.
        seeds: run seeds (the federation's splits and sampling follow the seed).
        out: report directory (runs under ``out/runs``).
        resume: skip finished runs and resume interrupted ones (otherwise a run directory that
            already holds a run is an error).
        pad: run same-rank methods with ``pad: true`` when the client ranks differ.
        centralized: add the centralized reference (``method.name: centralized``).
        runner: ``runner(config, resume)`` (default: the simulator).
        metric: the primary metric (default: from the records or the task).
        runs_dir: where the run directories go (default ``out/runs``; large: checkpoints).
        reference: the method label of the report's paired differences (default: glora).
    """
    base = read_raw(config) if isinstance(config, (str, Path)) else dict(config)
    base = apply_overrides(base, overrides)
    specs = parse_methods(methods) if isinstance(methods, str) else list(methods)
    if centralized and not any(s.name == CENTRALIZED for s in specs):
        specs.append(MethodSpec(CENTRALIZED, CENTRALIZED))
    if pad:
        specs = _with_pad(base, specs, seeds[0] if seeds else 0)
    _check_reference(reference, [s.label for s in specs])  # before hours of runs, not after
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing_runs(base, specs, seeds, runs_dir, resume, out)
    from glora.sim import ARITHMETIC_KEYS, RESULT_KEYS
    from glora.sim.rundir import RunDirLocked

    runner = runner or default_runner
    say = log or (lambda _m: None)
    previous = _load_status(out) if resume else {}
    outcomes: list[RunOutcome] = []
    observed: set[str] = set()  # runs this call found finished or held by another process
    meta = {"base_config": base, "methods": [asdict(s) for s in specs], "seeds": list(seeds)}
    for seed in seeds:
        for spec in specs:
            o = RunOutcome(spec.label, spec.name, int(seed), "pending", padded=spec.padded)
            outcomes.append(o)
            try:
                cfg = plan_config(base, spec, seed, runs_dir)
            except (ConfigError, UnsupportedRanks) as exc:
                o.status, o.reason = "unsupported", str(exc)
                say(f"[{spec.label} seed {seed}] unsupported: {exc}")
                continue
            run_dir = cfg.run_dir
            # relative to the report directory (which is where write_report resolves it), also
            # when the runs live elsewhere (e.g. runs/experiments/ beside docs/results/)
            o.run_dir = os.path.relpath(run_dir.resolve(), out.resolve())
            prev = previous.get(o.key, {})
            recs = _read_metrics(run_dir)
            if _reaches(recs, cfg.training.rounds):  # finished; resume=True (checked above)
                o.status, o.wall_seconds = "done", float(prev.get("wall_seconds", 0.0))
                observed.add(o.key)
                note = _differs_note(_keep_records(out, run_dir), cfg, RESULT_KEYS)
                say(f"[{spec.label} seed {seed}] finished earlier: skipped{note}")
                continue
            again = _holds_run(run_dir)
            kept = None if again or not resume else _read_kept(out, run_dir.name)
            if kept is not None and _reaches(kept["records"], cfg.training.rounds):
                # its config was checked above; the run directory itself is gone
                o.status, o.wall_seconds = "done", float(prev.get("wall_seconds", 0.0))
                observed.add(o.key)
                note = _differs_note(kept.get("config"), cfg, RESULT_KEYS)
                say(
                    f"[{spec.label} seed {seed}] finished earlier (kept in {RECORDS}/): "
                    f"skipped{note}"
                )
                continue
            # a resumed run adds to the time it had already spent: the time status.json holds
            # for it, or, when the process running it was killed before saving that (or it
            # spent more since), the wall time of the rounds its run directory recorded
            spent = (
                max(float(prev.get("wall_seconds", 0.0)), _recorded_wall(recs)) if again else 0.0
            )
            lost = ""
            if prev.get("status") == "done" and not again:
                # e.g. status.json copied into a report directory without records/: say why a
                # run status.json calls finished costs its whole time again
                lost = (
                    f" (status.json lists it as finished, but neither its run directory nor "
                    f"{_kept_path(out, run_dir.name)} holds its records)"
                )
            elif again:
                lost = _differs_note(_saved_config(run_dir), cfg, ARITHMETIC_KEYS)
            say(
                f"[{spec.label} seed {seed}] {'resuming' if again else 'running'} → {run_dir}{lost}"
            )
            t0 = time.perf_counter()
            try:
                runner(cfg, again)
            except (ConfigError, UnsupportedRanks) as exc:
                o.status, o.reason = "unsupported", str(exc)
            except RunDirLocked as exc:  # another process is running it: its entry will say
                o.status, o.reason = "failed", f"{type(exc).__name__}: {exc}"
                observed.add(o.key)
            except Exception as exc:  # one failed run must not lose the grid
                o.status, o.reason = "failed", f"{type(exc).__name__}: {exc}"
            else:
                ok = _finished(run_dir, cfg.training.rounds)
                o.status = "done" if ok else "failed"
                if ok:
                    _keep_records(out, run_dir)
                else:
                    o.reason = "the run ended before its last round"
            # a run started afresh (its directory gone, or kept records that fall short) counts
            # from zero
            o.wall_seconds = spent + time.perf_counter() - t0
            if o.status != "done":
                say(f"[{spec.label} seed {seed}] {o.status}: {o.reason}")
            _save_status(out, outcomes, meta, observed)
    written = _save_status(out, outcomes, meta, observed)
    # a run another process finished is reported as it ended there: _save_status wrote that
    # process's entry for it (for any other run, the entry written is this call's own outcome)
    for o in (o for o in outcomes if o.key in observed):
        entry = written[o.key]
        o.status, o.reason = entry["status"], entry.get("reason", "")
        o.wall_seconds = float(entry.get("wall_seconds", o.wall_seconds))
    write_report(out, outcomes, base=base, metric=metric, reference=reference)
    return outcomes


# ---------------------------------------------------------------------------- report
def _base_run_config(base: Mapping[str, Any]) -> RunConfig | None:
    """The comparison's base config as a run config (method set to GLoRA, which runs any
    federation; ``None`` when the base is not a valid config)."""
    try:
        return validate_config({**dict(base), "method": {"name": "glora"}})
    except ConfigError:
        return None


def _planned_rounds(base: Mapping[str, Any]) -> int | None:
    """The comparison's ``training.rounds`` (its config's default when the base leaves it out;
    ``None`` when the base is not a valid config)."""
    cfg = _base_run_config(base)
    return cfg.training.rounds if cfg is not None else None


def _primary_metric(records: Sequence[Mapping[str, Any]], base: Mapping[str, Any]) -> str | None:
    for r in records:
        if isinstance(r.get("primary_metric"), str):
            return r["primary_metric"]
    try:
        from glora.tasks import build_task

        cfg = _base_run_config(base)
        if cfg is not None:
            return build_task(cfg).primary_metric()
    except Exception:
        pass
    keys: list[str] = []
    for r in records:
        for k, v in (r.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    for k in _PRIMARY_FALLBACK:
        if k in keys:
            return k
    rest = [k for k in keys if "loss" not in k]
    return rest[0] if rest else (keys[0] if keys else None)


def _higher_is_better(metric: str) -> bool:
    return "loss" not in metric and "error" not in metric and "perplexity" not in metric


def _series(
    records: Sequence[Mapping[str, Any]], metric: str, *, top_level: bool = False
) -> dict[int, float]:
    """``{round: value}`` of an evaluated metric (or, ``top_level``, of a round-record key such
    as ``train_loss``), skipping rounds where it is missing or NaN."""
    out = {}
    for r in records:
        v = r.get(metric) if top_level else (r.get("metrics") or {}).get(metric)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[int(r["round"])] = float(v)
    return out


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _avg(records: Sequence[Mapping[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else math.nan


def _pm(m: float, s: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _num(x: float, fmt: str = ".4g") -> str:
    return "–" if math.isnan(x) else format(x, fmt)


def _check_reference(reference: str | None, labels: Sequence[str]) -> None:
    if reference is not None and reference not in labels:
        raise ValueError(
            f"reference {reference!r} is not one of the compared methods: {', '.join(labels)}"
        )


#: The columns of ``paired.csv`` (one row of :func:`paired_differences`).
PAIRED_FIELDS = ("method", "reference", "seeds", "diff_mean", "diff_std", "better", "p_value")


def paired_differences(
    finals: Mapping[str, Mapping[int, float]],
    reference: str,
    *,
    higher_is_better: bool = True,
) -> list[dict[str, Any]]:
    """Seed-paired differences of each method's final metric from ``reference``'s.

    Args:
        finals: ``{label: {seed: final metric}}`` of the finished runs.
        reference: the label every other method is compared with.
        higher_is_better: direction of the metric (decides which seeds count as "better").

    Returns:
        One row per other label: ``method``, ``reference``, ``seeds`` (seeds both finished),
        ``diff_mean`` / ``diff_std`` of ``final(method) − final(reference)`` over those seeds
        (sample std; NaN without seeds), ``better`` (seeds where the method beat the
        reference; ties count for neither) and ``p_value``, the two-sided paired t-test of the
        differences (``scipy.stats.ttest_rel``; NaN with fewer than 2 seeds or all differences
        equal to zero).
    """
    from scipy.stats import ttest_rel

    ref = finals.get(reference, {})
    rows = []
    for label, by_seed in finals.items():
        if label == reference:
            continue
        seeds = sorted(set(by_seed) & set(ref))
        diffs = [by_seed[s] - ref[s] for s in seeds]
        m, sd = _mean_std(diffs)
        better = sum((d > 0) if higher_is_better else (d < 0) for d in diffs)
        p_value = math.nan
        if len(diffs) >= 2 and any(d != 0 for d in diffs):
            p_value = float(ttest_rel([by_seed[s] for s in seeds], [ref[s] for s in seeds]).pvalue)
        rows.append(
            {
                "method": label,
                "reference": reference,
                "seeds": len(seeds),
                "diff_mean": m,
                "diff_std": sd,
                "better": better,
                "p_value": p_value,
            }
        )
    return rows


def _check_records_found(
    out: Path,
    outcomes: Sequence[RunOutcome],
    records: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
) -> None:
    """Refuse to rebuild a report from ``status.json`` when a finished run's records are gone.

    Neither its run directory's ``metrics.jsonl`` nor the report's ``records/<run>.json``
    exists, so a rebuilt table would show "–" where the report now has figures.
    """
    gone = [o for o in outcomes if o.status == "done" and not records[(o.label, o.seed)]]
    if not gone:
        return
    names = ", ".join(f"{o.label} seed {o.seed} ({o.run_dir})" for o in gone[:5])
    more = f" and {len(gone) - 5} more" if len(gone) > 5 else ""
    raise ValueError(
        f"cannot rebuild the report in {out}: the records of {len(gone)} finished run(s) are "
        f"gone (no metrics.jsonl in the run directory, no {RECORDS}/<run>.json): {names}{more}. "
        "The report was left as it is; restore those run directories, or rerun them (the "
        "same command with --resume)."
    )


def write_report(
    out: str | Path,
    outcomes: Sequence[RunOutcome] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    metric: str | None = None,
    reference: str | None = None,
) -> Path:
    """Write the report files of a comparison directory (from ``status.json`` when no outcomes).

    ``reference`` is the label the paired differences are taken against (default: ``glora``
    when it is one of the methods, else the first method). Rebuilding from ``status.json``
    raises ``ValueError``, writing nothing, when a finished run's records are gone.
    """
    out = Path(out)
    status = _read_status(out)
    from_status = outcomes is None
    if outcomes is None:
        outcomes = [
            RunOutcome(**{k: v for k, v in r.items() if k != "key"}) for r in status.get("runs", [])
        ]
    base = dict(base if base is not None else status.get("base_config", {}))
    labels = list(dict.fromkeys(o.label for o in outcomes))
    _check_reference(reference, labels)
    # a finished run reused from a run directory that was later taken further (more rounds) is
    # reported at the planned last round, not at its own
    rounds = _planned_rounds(base)
    records = {
        (o.label, o.seed): [
            r for r in _run_records(out, o.run_dir) if rounds is None or _round(r) <= rounds
        ]
        if o.status == "done"
        else []
        for o in outcomes
    }
    if from_status:
        _check_records_found(out, outcomes, records)
    all_recs = [r for recs in records.values() for r in recs]
    metric = metric or _primary_metric(all_recs, base) or "accuracy"
    better = max if _higher_is_better(metric) else min

    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[int, list[float]]] = {}
    loss_curves: dict[str, dict[int, list[float]]] = {}
    per_seed: list[dict[str, Any]] = []
    one_class: dict[str, tuple[int, int, int, int]] = {}  # finals one-class/with share, evals
    for label in labels:
        runs = [o for o in outcomes if o.label == label]
        done = [o for o in runs if o.status == "done"]
        finals, bests, up, down, srv, wall = [], [], [], [], [], []
        n_final = n_final_share = n_eval = n_eval_share = 0
        for o in done:
            recs = records[(o.label, o.seed)]
            s = _series(recs, metric)
            shares = _series(recs, TOP_PREDICTION_SHARE)
            if shares:
                n_final_share += 1
                n_final += shares[max(shares)] >= ONE_CLASS_SHARE
                n_eval_share += len(shares)
                n_eval += sum(v >= ONE_CLASS_SHARE for v in shares.values())
            if s:
                final, best = s[max(s)], better(s.values())
                finals.append(final)
                bests.append(best)
                per_seed.append(
                    {
                        "method": label,
                        "seed": o.seed,
                        "final": final,
                        "best": best,
                        "curve": json.dumps({str(k): v for k, v in sorted(s.items())}),
                        "final_top_share": shares[max(shares)] if shares else math.nan,
                    }
                )
                for rnd, v in s.items():
                    curves.setdefault(label, {}).setdefault(rnd, []).append(v)
            for rnd, v in _series(recs, "train_loss", top_level=True).items():
                loss_curves.setdefault(label, {}).setdefault(rnd, []).append(v)
            up.append(_avg(recs, "bytes_up"))
            down.append(_avg(recs, "bytes_down"))
            srv.append(_avg(recs, "server_seconds"))
            wall.append(o.wall_seconds)
        if n_final_share:
            one_class[label] = (n_final, n_final_share, n_eval, n_eval_share)
        reasons = sorted(
            {o.reason.splitlines()[0] for o in runs if o.status != "done" and o.reason}
        )
        states = sorted({o.status for o in runs})
        fm, fs = _mean_std(finals)
        bm, bs = _mean_std(bests)
        rows.append(
            {
                "method": label,
                "name": runs[0].method,
                "zero_padding": runs[0].padded,
                "status": "/".join(states),
                "seeds_done": len(done),
                "seeds": len(runs),
                "final_mean": fm,
                "final_std": fs,
                "best_mean": bm,
                "best_std": bs,
                "bytes_up_per_round": _mean_std([x for x in up if not math.isnan(x)])[0],
                "bytes_down_per_round": _mean_std([x for x in down if not math.isnan(x)])[0],
                "server_seconds_per_round": _mean_std([x for x in srv if not math.isnan(x)])[0],
                "wall_seconds": sum(wall),
                "one_class_finals": one_class[label][0] if label in one_class else "",
                "one_class_evals": one_class[label][2] if label in one_class else "",
                "evals_with_share": one_class[label][3] if label in one_class else "",
                "reason": "; ".join(reasons),
            }
        )

    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
        w.writeheader()
        w.writerows(rows)
    table_md = [
        f"| method | seeds | final {metric} (mean ± std) | best {metric} (mean ± std) | status |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["status"] if r["status"] == "done" else f"{r['status']}: {r['reason']}"
        label = r["method"] + (" ¹" if r["zero_padding"] else "")
        table_md.append(
            f"| {label} | {r['seeds_done']}/{r['seeds']} | {_pm(r['final_mean'], r['final_std'])} "
            f"| {_pm(r['best_mean'], r['best_std'])} | {st} |"
        )
    if any(r["zero_padding"] for r in rows):
        table_md += [
            "",
            "¹ same-rank method run with zero-padding (`method.pad: true`, our extension).",
        ]
    (out / "table.md").write_text("\n".join(table_md) + "\n", encoding="utf-8")

    with open(out / "per_seed.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(
            f, fieldnames=["method", "seed", "final", "best", "curve", "final_top_share"]
        )
        w.writeheader()
        w.writerows(per_seed)
    if reference is None:
        reference = "glora" if "glora" in labels else (labels[0] if labels else "")
    finals_by: dict[str, dict[int, float]] = {}
    for r in per_seed:
        finals_by.setdefault(r["method"], {})[r["seed"]] = r["final"]
    paired = paired_differences(finals_by, reference, higher_is_better=_higher_is_better(metric))
    with open(out / "paired.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(PAIRED_FIELDS))
        w.writeheader()
        w.writerows(paired)
    paired_md = [
        f"| method | seeds | final {metric} − {reference}'s (mean ± std) "
        f"| seeds better than {reference} | paired t-test p |",
        "|---|---|---|---|---|",
    ]
    for r in paired:
        p_text = "–" if math.isnan(r["p_value"]) else f"{r['p_value']:.2g}"
        paired_md.append(
            f"| {r['method']} | {r['seeds']} | {_pm(r['diff_mean'], r['diff_std'])} "
            f"| {r['better']}/{r['seeds']} | {p_text} |"
        )

    cost_fields = [
        "method",
        "bytes_up_per_round",
        "bytes_down_per_round",
        "server_seconds_per_round",
        "wall_seconds",
    ]
    with open(out / "cost.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cost_fields)
        w.writeheader()
        w.writerows([{k: r[k] for k in cost_fields} for r in rows])
    cost_md = [
        "| method | bytes up / round | bytes down / round | server s / round "
        "| wall s (all seeds) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cost_md.append(
            f"| {r['method']} | {_num(r['bytes_up_per_round'], '.4g')} "
            f"| {_num(r['bytes_down_per_round'], '.4g')} "
            f"| {_num(r['server_seconds_per_round'], '.3g')} | {r['wall_seconds']:.1f} |"
        )
    (out / "cost.md").write_text("\n".join(cost_md) + "\n", encoding="utf-8")

    plot = out / f"{re.sub(r'[^A-Za-z0-9_]+', '_', metric)}_vs_round.png"
    _plot(curves, metric, plot)
    loss_plot = out / "train_loss_vs_round.png"
    _plot(loss_curves, "train_loss", loss_plot)

    fed = base.get("federation") or {}
    data = base.get("data") or {}
    tr = base.get("training") or {}
    seeds = sorted({o.seed for o in outcomes})
    alpha = f" (α = {fed['alpha']})" if "alpha" in fed else ""
    direction = "higher" if _higher_is_better(metric) else "lower"
    lines = [
        "# Method comparison",
        "",
        f"Task `{data.get('task', '?')}`, model `{(base.get('model') or {}).get('name', '?')}`, "
        f"{fed.get('clients', '?')} clients, partition `{fed.get('partition', '?')}`{alpha}, "
        f"ranks `{fed.get('ranks', '?')}`, participation "
        f"{fed.get('participation', '?')}, {tr.get('rounds', '?')} rounds × "
        f"{tr.get('local_steps', '?')} local steps; seeds {seeds}. Only the method and the seed "
        "vary between runs (same splits, ranks and client sampling for one seed).",
        "",
        f"## Primary metric: `{metric}` ({direction} is better)",
        "",
        "Final = the last evaluated round; best = the best evaluated round; "
        "mean ± std (sample std) over the finished seeds.",
        "",
        *table_md,
        "",
        f"![{metric} vs round]({plot.name})",
        "",
        "Mean client training loss of each round (the clients' own losses during local "
        "training, averaged over the round's participants):",
        "",
        f"![train loss vs round]({loss_plot.name})",
        "",
        f"## Paired by seed: each method against `{reference}`",
        "",
        "One seed gives every method the same splits, ranks and client sampling, so the "
        "per-seed difference of final metrics removes the seed's own variance.",
        "",
        *(paired_md if paired else [f"(no other method finished a seed that `{reference}` did)"]),
        "",
        "## Communication and server cost (mean per round)",
        "",
        *cost_md,
        "",
    ]
    if one_class:
        pct = f"{ONE_CLASS_SHARE:.0%}"
        lines += [
            "## Single-class predictions",
            "",
            f"A run is on one class when at least {pct} of the evaluation examples get the "
            "same predicted class (`top_prediction_share`): its metric then says which class it "
            "predicts, not what it learned, and a difference between two such runs is the "
            "difference between the two classes' shares.",
            "",
            "| method | final evaluation on one class (seeds) | evaluations on one class |",
            "|---|---|---|",
            *(
                f"| {label} | {nf}/{nfs} | {ne}/{nes} |"
                for label, (nf, nfs, ne, nes) in one_class.items()
            ),
            "",
        ]
    not_run = [r for r in rows if r["seeds_done"] < r["seeds"]]
    if not_run:
        lines += ["## Methods that did not run (or not on every seed)", ""]
        for r in not_run:
            lines.append(
                f"* **{r['method']}** ({r['status']}): {r['reason'] or 'no reason recorded'}"
            )
        lines.append("")
    lines += [
        "## Files",
        "",
        "`table.csv`/`table.md` (metric table), `per_seed.csv` (every run's final, best and "
        "curve), `paired.csv` (seed-paired differences), `cost.csv`/`cost.md` (cost), "
        f"`{plot.name}` and `{loss_plot.name}` (curves), `status.json` (every run), "
        "`records/` (each finished run's config and round records), and the run directories "
        "(`runs/<method>-seed<seed>/` unless kept elsewhere).",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


_LINE_STYLES = ("-", "--", ":", "-.")


def _curve_styles(n: int, colors: Sequence[str]) -> list[tuple[str, str]]:
    """(colour, line style) for ``n`` curves: the colour cycle solid, then dashed, dotted and
    dash-dotted, so up to ``4 * len(colors)`` curves (matplotlib's default cycle has 10
    colours; a 12-rule report has 12 curves) never share both colour and style."""
    return [
        (colors[i % len(colors)], _LINE_STYLES[(i // len(colors)) % len(_LINE_STYLES)])
        for i in range(n)
    ]


def _plot(curves: Mapping[str, Mapping[int, Sequence[float]]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, by_round), (color, style) in zip(
        curves.items(), _curve_styles(len(curves), colors)
    ):
        xs = sorted(by_round)
        stats = [_mean_std(by_round[x]) for x in xs]
        mean = [m for m, _ in stats]
        std = [s for _, s in stats]
        ax.plot(xs, mean, marker="o", markersize=3, label=label, color=color, linestyle=style)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=color,
            alpha=0.2,
            linewidth=0,
        )
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs round (mean ± std over seeds)")
    if curves:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
