"""Processes that end with their parent, so that killing a launcher (even with SIGKILL) ends its
training ranks instead of leaving them writing into the output directory.

torchrun starts each rank in a session of its own, so a signal to the launcher's process group
never reaches them; the kernel's parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``) does.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def end_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits. SIGTERM makes a rank
    save and stop (``fatscale.train``). No-op outside Linux."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (DALI's reader processes register their shared
    memory with it) with SIGUSR2 blocked, a mask it keeps: it ignores INT and TERM itself, but the
    USR2 Slurm sends every process of a job before its time limit would kill it (then Python
    warns, relaunches it and may leak shared memory). No-op when it already runs."""
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
