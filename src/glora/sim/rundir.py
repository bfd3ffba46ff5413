"""The run directory: lock, protection against overwrites, metrics log and checkpoints.

Layout of ``output.dir/<name>/``::

    config.yaml                 the resolved configuration
    metrics.jsonl               one JSON object per round
    adapter/                    the final global adapter (a standard PEFT adapter directory)
    checkpoints/round_XXXX/     server.safetensors + server.json, head.safetensors,
                                clients.safetensors + clients.json (written to a temporary
                                directory, then renamed: a round_XXXX directory is complete)
    .lock                       fcntl lock held while a run uses the directory
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from glora.types import ServerState

__all__ = [
    "Checkpoint",
    "RunDir",
    "RunDirError",
    "tensor_bytes",
]

_CKPT_PREFIX = "round_"


class RunDirError(RuntimeError):
    """The run directory cannot be used (locked, already holds a run, no checkpoint...)."""


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


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
            raise RunDirError(
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
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        os.replace(tmp, self.config_path)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunDirError(f"{str(self.path)!r} holds no run (no config.yaml)")
        return yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's record to ``metrics.jsonl`` (flushed and fsynced)."""
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
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
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_rounds(self) -> list[int]:
        """Rounds of the complete checkpoints, ascending."""
        if not self.checkpoints_path.is_dir():
            return []
        out = []
        for p in self.checkpoints_path.iterdir():
            if p.is_dir() and p.name.startswith(_CKPT_PREFIX) and (p / "server.json").is_file():
                try:
                    out.append(int(p.name[len(_CKPT_PREFIX) :]))
                except ValueError:
                    continue
        return sorted(out)

    def save_checkpoint(self, ckpt: Checkpoint) -> Path:
        """Write a checkpoint atomically (temporary directory + rename)."""
        self.checkpoints_path.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_path / f"{_CKPT_PREFIX}{ckpt.round:04d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.checkpoints_path))
        try:
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
            # server.json last: its presence marks a complete checkpoint
            (tmp / "server.json").write_text(json.dumps(meta, default=str), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def load_checkpoint(self, round: int | None = None) -> Checkpoint:
        """Load the checkpoint of ``round`` (default: the latest complete one)."""
        rounds = self.checkpoint_rounds()
        if not rounds:
            raise RunDirError(
                f"{str(self.path)!r} has no complete checkpoint to resume from "
                "(set training.checkpoint_every to write them)"
            )
        r = rounds[-1] if round is None else round
        p = self.checkpoints_path / f"{_CKPT_PREFIX}{r:04d}"
        meta = json.loads((p / "server.json").read_text(encoding="utf-8"))
        flat = load_file(str(p / "server.safetensors"))
        state = ServerState.from_flat(
            meta["method"], int(meta["state_round"]), flat, meta["info"], meta["diagnostics"]
        )
        return Checkpoint(
            round=int(meta["round"]),
            state=state,
            options=meta.get("options", {}),
            head=load_file(str(p / "head.safetensors")),
            client_tensors=load_file(str(p / "clients.safetensors")),
            client_meta=json.loads((p / "clients.json").read_text(encoding="utf-8")),
        )


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of a dict of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
