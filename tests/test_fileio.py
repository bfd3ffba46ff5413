from __future__ import annotations

from pathlib import Path

import pytest

from glora.fileio import write_text_atomic


def test_writes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    write_text_atomic(target, "first\n")
    assert target.read_text(encoding="utf-8") == "first\n"
    write_text_atomic(str(target), "second ✓\n")  # str paths too; utf-8 by default
    assert target.read_text(encoding="utf-8") == "second ✓\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_failed_write_keeps_the_old_text_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "new \ud800\n")  # a lone surrogate: utf-8 cannot encode it
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_failed_replace_keeps_the_old_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("a: 1\n", encoding="utf-8")

    def refuse(src: object, dst: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr("glora.fileio.os.replace", refuse)
    with pytest.raises(OSError, match="disk went away"):
        write_text_atomic(target, "a: 2\n")
    assert target.read_text(encoding="utf-8") == "a: 1\n"
    assert not (tmp_path / "config.yaml.tmp").exists()
