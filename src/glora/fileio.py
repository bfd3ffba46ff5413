"""Small file-writing helpers shared by the run directory, ``glora compare`` and the scripts.

A reader (another process, or a resumed run) must never see a half-written status, config or
index file. :func:`write_text_atomic` writes the whole text to a temporary file beside the target
and renames it over the target (``os.replace``, atomic on POSIX and Windows within one
filesystem): the target holds either the old text or the new one, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomic"]


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
