"""Whose fault a failure is, and the one-line messages that say so.

Bad input or arguments are :class:`MakeShardsError` (exit 2); a failure that is not the input's
(memory, the file system, a killed worker) is :class:`RunStopped` (exit 1), and a re-run resumes.
What a file's bytes make fail is no error at all: the file is skipped with the reason
(fatscale.prep.encode.SkipSample).
"""

from __future__ import annotations

from typing import Any

PROG = "make_shards"
RESUME = "run the same command again to resume"


class MakeShardsError(Exception):
    """Bad input or arguments; the message is one line naming the file/key/value at fault."""


class RunStopped(RuntimeError):
    """A failure that is not the input's fault (memory, the file system, a killed worker): the run
    stops with a one-line message naming the file, and nothing is recorded for that file, so a
    re-run resumes and retries it. ``shard``: the shard it stopped, where known (a Slurm task's
    failure names it)."""

    def __init__(self, message: str, shard: str | None = None):
        super().__init__(message)
        self.shard = shard


class Detached(Exception):
    """Ctrl-C while watching a Slurm job array: the array goes on; the message says how to
    re-attach."""


def quoted(x: Any) -> str:
    """A path or value for a one-line message (control characters and undecodable bytes escaped)."""
    s = str(x)
    return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


def type_name(e: BaseException) -> str:
    """An exception's type, with its module unless a builtin ("struct.error", not "error")."""
    t = type(e)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def caused_by_bytes(e: BaseException) -> bool:
    """Whether an exception raised while parsing or decoding bytes in memory is their fault: any
    Exception but running out of memory and OS errors (those carry an errno; Pillow's format
    errors, OSErrors as well, do not)."""
    return (isinstance(e, Exception) and not isinstance(e, MemoryError)
            and not (isinstance(e, OSError) and e.errno is not None))


def failure(e: BaseException) -> str:
    """What went wrong, for the one-line message of a failure that is not the input's."""
    return "out of memory" if isinstance(e, MemoryError) else f"{type_name(e)}: {one_line(e)}"
