"""Write a file or a folder so that readers see either the old version or the finished new one.

Everything is written under a hidden temporary name beside the target (same folder, hence same file
system, so the final `os.replace` is one atomic rename) and renamed into place only when the writing
block finishes without an error; on an error (Ctrl-C included) the temporary file or folder is removed
and the target is left as it was.

    with atomic_file(path) as f:                 # an open file; flushed and fsynced before the rename
        f.write(text)
    with atomic_path(video) as tmp:              # a path, for writers that take a file name
        write_video(tmp)
    with atomic_directory(folder, replace=True) as tmp:
        model.save_pretrained(tmp)

Only the standard library is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_directory", "atomic_file", "atomic_path", "replace_directory"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_normal_permissions(path: Path) -> None:
    """`mkstemp`/`mkdtemp` make private (0600/0700) entries and some writers make 0600 files: give the
    result the permissions of a file or folder created normally (umask applied)."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside `target` (same suffix, so writers that pick a format by the
    extension still work) that becomes `target` when the block succeeds; an existing `target` is
    replaced. The parent folder is created if needed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _give_normal_permissions(tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """`open(target, mode)` that writes a temporary file beside `target`; when the block succeeds the
    file is flushed, fsynced (its content is on disk before its name is) and renamed to `target`."""
    if "b" in mode:
        encoding = None
    with atomic_path(target) as tmp:
        with open(tmp, mode, encoding=encoding) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def replace_directory(new: Path, target: Path) -> None:
    """Rename the finished folder `new` to `target`. A non-empty `target` is first renamed aside,
    put back if the second rename fails, and deleted after it succeeds."""
    if not target.exists() or _is_empty_folder(target):
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A fresh hidden folder beside `target` to fill; when the block succeeds it gets normal
    permissions and is renamed to `target`. A `target` that is a non-empty folder (checked before
    the block and again before the rename) raises `FileExistsError` unless `replace`; then it is
    swapped out only once the new folder is complete (see `replace_directory`)."""
    target = Path(target).absolute()
    _refuse_existing(target, replace)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _give_normal_permissions(tmp)
        _refuse_existing(target, replace)  # something may have appeared meanwhile
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_existing(target: Path, replace: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if not replace and target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target} is a folder that is not empty")
