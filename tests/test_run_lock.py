"""One live run per output directory (fatscale.run_lock), and processes that end with their parent
(fatscale.lifetime): real processes, real kernel locks and signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import hold_run_lock
from fatscale.run_lock import RunDirBusy, RunLock, check_free

def test_a_live_holder_refuses_others_and_its_death_frees_the_directory(tmp_path):
    holder = hold_run_lock(tmp_path / "out")
    try:
        with pytest.raises(RunDirBusy) as refused:
            check_free(tmp_path / "out")
        message = str(refused.value)
        assert message.startswith(f"output_dir {tmp_path / 'out'} is in use by a live run (pid {holder.pid} on ")
        assert "\n" not in message
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            RunLock(tmp_path / "out").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        holder.wait()
    check_free(tmp_path / "out")
    lock = RunLock(tmp_path / "out")
    lock.acquire()  # the stale file names the dead holder, and does not matter
    try:
        other = subprocess.run([sys.executable, "-c", "import sys; from fatscale.run_lock import check_free; check_free(sys.argv[1])",
                                str(tmp_path / "out")], capture_output=True, text=True)
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    finally:
        lock.release()
    check_free(tmp_path / "out")


def test_a_directory_never_used_is_free(tmp_path):
    check_free(tmp_path / "nothing-here")


CHILD = ("import os, signal, sys, time; from fatscale.lifetime import end_with_parent; "
         "signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], 'w').write('SIGTERM'), sys.exit(0))); "
         "end_with_parent(); open(sys.argv[1] + '.ready', 'w').close(); time.sleep(600)")
PARENT = "import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); print(child.pid, flush=True); child.wait()"


def test_a_child_ends_with_its_parent_even_when_the_parent_is_killed(tmp_path):
    marker = tmp_path / "signalled"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = psutil.Process(int(parent.stdout.readline()))
    deadline = time.monotonic() + 120
    while not Path(f"{marker}.ready").exists():  # the child has asked for the signal
        assert time.monotonic() < deadline, "the child never got ready"
        time.sleep(0.05)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    child.wait(10)  # raises if the child lives on
    assert marker.read_text() == "SIGTERM"
