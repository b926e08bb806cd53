"""Atomic writes for every file (and data directory) quantlab writes: a reader never sees a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from quantlab.errors import QuantlabError, QuantlabRuntimeError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any work) when `path` cannot be written: a directory, or a missing/read-only parent."""
    target = Path(path)
    if target.is_dir():
        raise QuantlabError(f"{target}: output path is a directory")
    _check_parent(target)
    if target.exists() and not os.access(target, os.W_OK):
        raise QuantlabError(f"{target}: output file is not writable")
    return target


def _check_parent(target: Path) -> None:
    """The directory an output goes in exists and is writable."""
    parent = target.parent if str(target.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise QuantlabError(f"{target}: {parent} is not a directory")
    if not parent.is_dir():
        raise QuantlabError(f"{target}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantlabError(f"{target}: output directory {parent} is not writable")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, on any error remove it."""
    target = check_writable(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise QuantlabRuntimeError(f"{target}: could not write ({exc.strerror or exc})") from exc
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temp directory beside `path` to write files in; on success it is renamed to `path` (which must be new or an
    empty directory), on any error removed. A reader never sees a half-written directory."""
    target = Path(path)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise QuantlabError(f"{target}: output directory exists and is not empty")
    _check_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise QuantlabRuntimeError(f"{target}: could not write ({exc.strerror or exc})") from exc
        raise
