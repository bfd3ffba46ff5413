"""Small file-writing helpers shared by the run directory, the adapter writers, ``glora compare``
and the scripts.

A reader (another process, or a resumed run) must never see a half-written status, config,
index file, adapter or checkpoint. :func:`write_text_atomic` writes the whole text to a
temporary file beside the target and renames it over the target (``os.replace``, atomic on POSIX
and Windows within one filesystem): the target holds either the old text or the new one, never
a mix. :func:`staged_dir` does the same for a directory of files: they are written into a fresh
temporary directory beside the target, which is renamed into place only when all were written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fsync_path", "staged_dir", "write_text_atomic"]


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace the contents of ``path`` with ``text`` in one rename.

    The text goes to ``<name>.tmp`` in the same directory first. If writing fails (a full disk,
    text the encoding cannot hold), the temporary file is removed, the exception propagates and
    ``path`` keeps its previous contents.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding=encoding)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: str | Path) -> None:
    """fsync a file or directory (best effort for directories on file systems that refuse it)."""
    path = Path(path)
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. a directory that cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - fsync of a directory unsupported
        pass
    finally:
        os.close(fd)


@contextmanager
def staged_dir(
    target: str | Path,
    *,
    overwrite: bool = True,
    prefix: str | None = None,
    durable: bool = False,
) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``target`` when the block ends.

    Yields a new empty directory in ``target``'s parent (created if missing), named
    ``<prefix><random>`` (default prefix ``.<target name>.tmp-``). If the block raises, the
    temporary directory is removed and ``target`` is left as it was. Otherwise an existing
    ``target`` is first moved into another temporary directory (so a second writer cannot
    collide with a fixed ``.old`` name), the new directory is renamed to ``target`` and the old
    copy is deleted; if that rename fails, the old copy is moved back. A crash between the two
    renames leaves the old copy under ``prefix``, never a half-written ``target``.

    Args:
        target: the directory to create or replace.
        overwrite: replace an existing ``target``; False raises ``FileExistsError`` (after the
            block ran) and keeps ``target``.
        prefix: name prefix of the temporary directories (callers that sweep leftovers after
            a crash pass the prefix they sweep).
        durable: fsync the new directory before its rename and the parent after it, so the
            rename survives a power loss (files written inside should be fsynced by the caller).
    """
    target = Path(target)
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = prefix if prefix is not None else f".{target.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    old: Path | None = None
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{str(target)!r} already exists")
            old = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / target.name, target)  # put the old copy back
                raise
        else:
            os.replace(tmp, target)
        if durable:
            fsync_path(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
