"""Replacing a file atomically, the one way fatscale does it: write ``.NAME.PID.tmp`` beside the
target, fsync it, rename it over the target, fsync the directory. A reader sees the old file or
the new one, never part of one; a crash leaves at most the temporary file, which
``is_temporary`` recognises so that clean-up can remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp$")


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of a replacement (a crash may have left it)."""
    return bool(_TEMPORARY.match(name))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yields the temporary path to write; when the block ends without an exception it becomes
    ``path``, else it is removed. ``fsync=False`` still survives a crash of the process (the rename
    is atomic) but not a power loss: for files that are cheap to redo."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # only there when something failed


def write_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with replacing(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, fsync: bool = True, sort_keys: bool = False) -> bytes:
    """Write ``obj`` as JSON (indent 1, UTF-8, a final newline) to ``path``, atomically; returns the
    bytes written (a checkpoint's seal hashes them)."""
    data = (json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n").encode("utf-8")
    write_atomic(path, data, fsync)
    return data
