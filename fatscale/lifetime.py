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
