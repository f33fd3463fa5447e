"""atomic_files: a target is either untouched or the finished new version; no temporary is left behind."""

import os
import stat

import pytest

from transformers_tempo import atomic_files
from transformers_tempo.atomic_files import atomic_directory, atomic_file, atomic_path


def normal_mode(kind: str) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if kind == "dir" else 0o666) & ~mask


def test_atomic_file_replaces_the_target_with_normal_permissions(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with atomic_file(target) as f:
        f.write("new\n")
        assert target.read_text() == "old\n"  # readers still see the old version while writing
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == normal_mode("file")  # mkstemp's 0600 undone
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target) as f:
        f.write("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]


def test_atomic_path_keeps_the_suffix_and_creates_the_folder(tmp_path):
    target = tmp_path / "cache" / "demo.mp4"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".mp4" and tmp != target
        tmp.write_bytes(b"video")
    assert target.read_bytes() == b"video" and os.listdir(target.parent) == ["demo.mp4"]


def test_atomic_directory_refuses_a_non_empty_folder_unless_replace(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"), atomic_directory(target):
        pass
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert sorted(p.name for p in target.rglob("*")) == ["new.txt", "sub"]
    assert stat.S_IMODE(target.stat().st_mode) == normal_mode("dir")  # mkdtemp's 0700 undone
    assert stat.S_IMODE((target / "sub" / "new.txt").stat().st_mode) == normal_mode("file")
    assert os.listdir(tmp_path) == ["model"]


def test_a_folder_that_appears_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(FileExistsError), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
    assert os.listdir(target) == ["theirs.txt"] and os.listdir(tmp_path) == ["model"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".model.tmp-"):  # the rename of the new folder fails
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["old.txt"] and os.listdir(tmp_path) == ["model"]
