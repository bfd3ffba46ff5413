"""The run directory: lock, protection against overwrites, metrics log and checkpoints.

Layout of ``output.dir/<name>/``::

    config.yaml                 the resolved configuration
    metrics.jsonl               one JSON object per round
    adapter/                    the final global adapter (a standard PEFT adapter directory)
    checkpoints/round_XXXX/     server.safetensors + server.json, head.safetensors,
                                clients.safetensors + clients.json, manifest.json (written to a
                                temporary directory ``.tmp-*``, fsynced, then renamed: a
                                round_XXXX directory is complete)
    .lock                       fcntl lock held while a run uses the directory

Checkpoint integrity: ``manifest.json`` (written last, before the rename) lists every other file
of the checkpoint with its byte size and SHA-256::

    {"format": 1, "round": 3, "files": {"server.safetensors": {"bytes": 123, "sha256": "..."}}}

:meth:`RunDir.load_checkpoint` verifies it before parsing anything, then parses every file into
memory; a checkpoint that fails (missing file, size or hash mismatch, unparsable manifest,
safetensors or JSON) raises :class:`RunDirError` naming the checkpoint and the file, and nothing
of it is returned (never half-loaded). Without an explicit round it falls back to the newest
checkpoint that loads, with a logged warning. Checkpoints written before manifests existed (no
``manifest.json``) stay loadable: they are unverified but still parse-checked (a truncated
safetensors file is rejected by its header/length check), and a warning says so. Leftover
``.tmp-*`` directories of an interrupted save are never read and are removed on resume.
The lock is an ``flock`` on ``.lock``: the kernel releases it when the holding process dies,
even by SIGKILL, so a crashed run never blocks its ``--resume``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from glora.fileio import fsync_path, staged_dir, write_text_atomic
from glora.types import ServerState

__all__ = [
    "CHECKPOINT_FILES",
    "MANIFEST",
    "Checkpoint",
    "RunDir",
    "RunDirError",
    "tensor_bytes",
]

_CKPT_PREFIX = "round_"
_TMP_PREFIX = ".tmp-"
#: The manifest of a checkpoint directory (written last).
MANIFEST = "manifest.json"
#: The files every checkpoint holds (besides the manifest).
CHECKPOINT_FILES = (
    "server.safetensors",
    "head.safetensors",
    "clients.safetensors",
    "clients.json",
    "server.json",
)
_MANIFEST_FORMAT = 1

log = logging.getLogger("glora.sim")


class RunDirError(RuntimeError):
    """The run directory cannot be used (locked, already holds a run, no checkpoint...)."""


class RunDirLocked(RunDirError):
    """The run directory is locked by another live glora run."""


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Checkpoint:
    """The contents of one checkpoint (server state, head and client-local stores)."""

    def __init__(
        self,
        round: int,
        state: ServerState,
        options: dict[str, Any],
        head: dict[str, Tensor],
        client_tensors: dict[str, Tensor],
        client_meta: dict[str, Any],
    ) -> None:
        self.round = round
        self.state = state
        self.options = options
        self.head = head
        self.client_tensors = client_tensors
        self.client_meta = client_meta


def jsonable(x: Any, *, max_list: int = 64, finite: bool = False) -> Any:
    """A JSON-able copy of ``x``: tensors → numbers or lists, long lists trimmed to ``max_list``.

    With ``finite`` a NaN or infinite number becomes None (strict JSON); otherwise it is kept.
    """
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Mapping):
        return {str(k): jsonable(v, max_list=max_list, finite=finite) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = list(x)
        out = [jsonable(v, max_list=max_list, finite=finite) for v in items[:max_list]]
        if len(items) > max_list:
            out.append(f"... {len(items) - max_list} more")
        return out
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if not isinstance(x, float):
        try:
            x = float(x)
        except (TypeError, ValueError):
            return str(x)
    return None if finite and not math.isfinite(x) else x


class RunDir:
    """A run directory (see the module docstring).

    Use as a context manager: entering takes the lock, leaving releases it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_file: IO[str] | None = None

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints_path(self) -> Path:
        return self.path / "checkpoints"

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Take the run lock (RunDirError if another run holds it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RunDirLocked(
                f"run directory {str(self.path)!r} is in use by another glora run (lock file "
                f"{str(self.path / '.lock')!r}); wait for it to finish or choose another name"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        """Release the lock."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> RunDir:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # ------------------------------------------------------------------ state
    def holds_run(self) -> bool:
        """True if the directory already holds (part of) a run."""
        return any(
            p.exists()
            for p in (self.config_path, self.metrics_path, self.adapter_path, self.checkpoints_path)
        )

    def clear(self) -> None:
        """Remove everything but the lock file (for ``--overwrite``)."""
        for p in self.path.iterdir():
            if p.name == ".lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def write_config(self, data: dict[str, Any]) -> None:
        """Write ``config.yaml`` atomically."""
        write_text_atomic(self.config_path, yaml.safe_dump(data, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunDirError(f"{str(self.path)!r} holds no run (no config.yaml)")
        return yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's record to ``metrics.jsonl`` (flushed and fsynced).

        Strict JSON: a NaN or infinite number (e.g. Pearson of a constant prediction) is
        written as ``null``.
        """
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(record, max_list=10_000, finite=True), allow_nan=False))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from an interrupted run
        return out

    def truncate_metrics(self, round: int) -> None:
        """Keep only the records of rounds ``<= round``."""
        keep = [r for r in self.read_metrics() if int(r.get("round", 0)) <= round]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_rounds(self) -> list[int]:
        """Rounds of the complete checkpoints, ascending (not verified: see load_checkpoint).

        A ``round_XXXX`` directory counts if it has a manifest or (older format) a
        ``server.json``; ``.tmp-*`` directories of interrupted saves never count.
        """
        if not self.checkpoints_path.is_dir():
            return []
        out = []
        for p in self.checkpoints_path.iterdir():
            if (
                p.is_dir()
                and p.name.startswith(_CKPT_PREFIX)
                and ((p / MANIFEST).is_file() or (p / "server.json").is_file())
            ):
                try:
                    out.append(int(p.name[len(_CKPT_PREFIX) :]))
                except ValueError:
                    continue
        return sorted(out)

    def checkpoint_path(self, round: int) -> Path:
        """The directory of round ``round``'s checkpoint."""
        return self.checkpoints_path / f"{_CKPT_PREFIX}{round:04d}"

    def save_checkpoint(self, ckpt: Checkpoint) -> Path:
        """Write a checkpoint atomically (temporary directory + manifest + fsync + rename)."""
        final = self.checkpoint_path(ckpt.round)
        # rewriting a round moves the old one aside first; leftovers carry _TMP_PREFIX
        with staged_dir(final, prefix=_TMP_PREFIX, durable=True) as tmp:
            state = ckpt.state
            _save_tensors(state.flat_tensors(), tmp / "server.safetensors")
            _save_tensors(ckpt.head, tmp / "head.safetensors")
            _save_tensors(ckpt.client_tensors, tmp / "clients.safetensors")
            (tmp / "clients.json").write_text(json.dumps(ckpt.client_meta), encoding="utf-8")
            meta = {
                "round": ckpt.round,
                "method": state.method,
                "state_round": state.round,
                "options": ckpt.options,
                "info": state.info,
                "diagnostics": state.diagnostics,
            }
            (tmp / "server.json").write_text(json.dumps(meta, default=str), encoding="utf-8")
            files = {}
            for name in CHECKPOINT_FILES:
                fsync_path(tmp / name)
                files[name] = {
                    "bytes": (tmp / name).stat().st_size,
                    "sha256": _file_digest(tmp / name),
                }
            # the manifest last: it seals the files written above
            manifest = {"format": _MANIFEST_FORMAT, "round": ckpt.round, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            fsync_path(tmp / MANIFEST)
        return final

    def remove_temp(self) -> list[Path]:
        """Remove the ``.tmp-*`` leftovers of interrupted checkpoint saves; the removed paths.

        Call it only while holding the lock (no other save can be in progress).
        """
        if not self.checkpoints_path.is_dir():
            return []
        gone = [p for p in self.checkpoints_path.iterdir() if p.name.startswith(_TMP_PREFIX)]
        for p in gone:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return gone

    def verify_checkpoint(self, round: int) -> bool:
        """Check round ``round``'s checkpoint files against its manifest.

        Returns True if verified, False for a checkpoint without a manifest (written by an
        older glora: loadable, parse-checked only).

        Raises:
            RunDirError: naming the checkpoint and the file that is missing, has the wrong size
                or hash, or a manifest that cannot be read.
        """
        p = self.checkpoint_path(round)
        where = f"checkpoint {str(p)!r}"
        mpath = p / MANIFEST
        if not mpath.exists():
            for name in CHECKPOINT_FILES:
                if not (p / name).is_file():
                    raise RunDirError(f"{where} is incomplete: {name} is missing")
            return False
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            files = manifest["files"]
            if not isinstance(files, dict) or int(manifest["round"]) != round:
                raise ValueError("bad files or round")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{where} is corrupt: {MANIFEST} is unreadable ({exc})") from None
        for name in CHECKPOINT_FILES:
            if name not in files:
                raise RunDirError(f"{where} is corrupt: {MANIFEST} does not list {name}")
        for name, want in files.items():
            f = p / name
            if not f.is_file():
                raise RunDirError(f"{where} is incomplete: {name} is missing")
            size = f.stat().st_size
            if size != int(want["bytes"]):
                raise RunDirError(
                    f"{where} is corrupt: {name} has {size} bytes, the manifest says "
                    f"{int(want['bytes'])} (truncated or overwritten)"
                )
            if _file_digest(f) != want["sha256"]:
                raise RunDirError(f"{where} is corrupt: {name} does not match its SHA-256")
        return True

    def _load_one(self, round: int) -> Checkpoint:
        """Verify and parse one checkpoint entirely into memory (RunDirError if it fails)."""
        p = self.checkpoint_path(round)
        where = f"checkpoint {str(p)!r}"
        if not self.verify_checkpoint(round):
            log.warning("%s has no %s (older glora): loading it unverified", where, MANIFEST)

        def _json(name: str) -> Any:
            try:
                return json.loads((p / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise RunDirError(f"{where} is corrupt: {name} is not valid JSON ({exc})") from None

        def _tensors(name: str) -> dict[str, Tensor]:
            try:
                return load_file(str(p / name))
            except Exception as exc:  # safetensors raises its own error types
                raise RunDirError(
                    f"{where} is corrupt: {name} is not a valid safetensors file ({exc})"
                ) from None

        meta = _json("server.json")
        flat = _tensors("server.safetensors")
        head = _tensors("head.safetensors")
        client_tensors = _tensors("clients.safetensors")
        client_meta = _json("clients.json")
        try:
            state = ServerState.from_flat(
                meta["method"], int(meta["state_round"]), flat, meta["info"], meta["diagnostics"]
            )
            ckpt_round = int(meta["round"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(
                f"{where} is corrupt: server.json/server.safetensors: {exc}"
            ) from None
        if ckpt_round != round:
            raise RunDirError(f"{where} is corrupt: server.json says round {ckpt_round}")
        return Checkpoint(
            round=ckpt_round,
            state=state,
            options=meta.get("options", {}),
            head=head,
            client_tensors=client_tensors,
            client_meta=client_meta,
        )

    def load_checkpoint(self, round: int | None = None) -> Checkpoint:
        """Load the checkpoint of ``round`` (default: the newest one that verifies).

        Every file is verified against the manifest and parsed before anything is returned.
        Without ``round``, a checkpoint that fails is skipped with a logged warning and the
        next older one is tried; leftover ``.tmp-*`` directories are removed (call it with
        the lock held).

        Raises:
            RunDirError: no checkpoint, ``round``'s checkpoint fails, or none verifies.
        """
        rounds = self.checkpoint_rounds()
        if not rounds:
            raise RunDirError(
                f"{str(self.path)!r} has no complete checkpoint to resume from "
                "(set training.checkpoint_every to write them)"
            )
        if round is not None:
            if round not in rounds:
                raise RunDirError(f"{str(self.path)!r} has no checkpoint of round {round}")
            return self._load_one(round)
        for p in self.remove_temp():
            log.info("removed %s (left by an interrupted checkpoint save)", p)
        failures: list[str] = []
        for r in reversed(rounds):
            try:
                ckpt = self._load_one(r)
            except RunDirError as exc:
                failures.append(str(exc))
                log.warning("%s; trying an older checkpoint", exc)
                continue
            if failures:
                log.warning(
                    "resuming from the checkpoint of round %d instead of round %d (newer "
                    "checkpoints failed verification)",
                    r,
                    rounds[-1],
                )
            return ckpt
        raise RunDirError(
            f"{str(self.path)!r} has no valid checkpoint to resume from:\n  "
            + "\n  ".join(failures)
        )


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of a dict of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
