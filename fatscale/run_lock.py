"""One live run per output directory, held by a lock that the kernel drops when its holder dies.

Rank 0 of a run holds an exclusive POSIX record lock (``fcntl.lockf``) on ``OUTPUT_DIR/.run.lock``
for the run's lifetime, and writes who it is into the file. A killed run leaves no stale lock:
the kernel releases it with the process. POSIX locks rather than ``flock`` because they also hold
over NFS, where cluster output directories live. Caveat of POSIX locks: closing *any* descriptor
of the file in the holding process drops the lock, so only ``RunLock`` opens it there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".run.lock"


class RunDirBusy(RuntimeError):
    """Another live run holds the output directory."""


def _busy_message(output_dir: Path, holder: str) -> str:
    return (f"output_dir {output_dir} is in use by a live run ({holder}): wait for it to end, stop it, "
            "or choose another output_dir")


def _describe(record: dict) -> str:
    parts = [f"pid {record.get('pid')} on {record.get('host')}"]
    if record.get("slurm_job"):
        parts.append(f"Slurm job {record['slurm_job']}")
    if record.get("started"):
        parts.append(f"started {record['started']}")
    return ", ".join(parts)


def _read_holder(path: Path) -> str:
    try:
        return _describe(json.loads(path.read_text()))
    except (OSError, ValueError):  # the holder is between locking and writing its name
        return "holder not yet named"


def _locked_by_other(error: OSError) -> bool:
    return error.errno in (errno.EACCES, errno.EAGAIN)


class RunLock:
    """``acquire()`` raises :class:`RunDirBusy` naming the live holder; the lock lasts until
    ``release()`` or the end of this process."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if not _locked_by_other(e):
                raise
            raise RunDirBusy(_busy_message(self.output_dir, _read_holder(self.path))) from None
        record = dict(pid=os.getpid(), host=socket.gethostname(), slurm_job=os.environ.get("SLURM_JOB_ID"),
                      started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_free(output_dir: str | os.PathLike) -> None:
    """For launchers (which never hold the lock themselves): raise :class:`RunDirBusy` when a
    live run holds ``output_dir``."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with a live holder's lock
    except OSError as e:
        if not _locked_by_other(e):
            raise
        raise RunDirBusy(_busy_message(Path(output_dir), _read_holder(path))) from None
    finally:
        os.close(fd)
