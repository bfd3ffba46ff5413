from __future__ import annotations

from pathlib import Path

import pytest

from glora.fileio import staged_dir, write_text_atomic


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


def _tree(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in files}


def test_staged_dir_creates_and_replaces_a_directory(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "adapter"  # the parent is created
    with staged_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()
        (tmp / "a.txt").write_text("1", encoding="utf-8")
    assert _tree(target) == {"a.txt": "1"}
    with staged_dir(target) as tmp:
        (tmp / "b.txt").write_text("2", encoding="utf-8")
    assert _tree(target) == {"b.txt": "2"}  # replaced whole, not merged
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]  # no temp or old copy left


def test_staged_dir_failure_inside_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "x").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="save failed"), staged_dir(target) as tmp:
        (tmp / "x").write_text("half", encoding="utf-8")
        raise RuntimeError("save failed")
    assert _tree(target) == {"x": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_staged_dir_without_overwrite_refuses_and_keeps_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("old", encoding="utf-8")
    refused = pytest.raises(FileExistsError, match="already exists")
    with refused, staged_dir(target, overwrite=False, prefix=".tmp-") as tmp:
        assert tmp.name.startswith(".tmp-")
        (tmp / "x").write_text("new", encoding="utf-8")
    assert _tree(target) == {"x": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_dir_failed_rename_puts_the_old_directory_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("old", encoding="utf-8")
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def second_fails(src: str | Path, dst: str | Path) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old target moved aside; now the new directory's rename fails
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr("glora.fileio.os.replace", second_fails)
    with pytest.raises(OSError, match="disk went away"), staged_dir(target, durable=True) as tmp:
        (tmp / "x").write_text("new", encoding="utf-8")
    assert len(calls) == 3  # aside, failed rename, back
    assert _tree(target) == {"x": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
