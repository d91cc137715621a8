"""fatscale.atomic, the one way fatscale replaces a file: readers see the old file or the new one."""

import subprocess
import sys

import pytest

from fatscale.atomic import is_temporary, replacing, temporary_path, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    write_atomic(target, b"old")
    with pytest.raises(OSError):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    write_atomic(target, b"new", fsync=False)
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_a_killed_writer_leaves_the_old_file_and_a_recognisable_temporary(tmp_path):
    target = tmp_path / "latest"
    write_atomic(target, b"step-000000010")
    code = ("import os, signal, sys; from pathlib import Path; from fatscale.atomic import replacing\n"
            "with replacing(Path(sys.argv[1])) as tmp:\n"
            "    tmp.write_bytes(b'step-0000')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(target)])
    assert killed.returncode == -9
    assert target.read_bytes() == b"step-000000010"
    (left,) = [p for p in tmp_path.iterdir() if p != target]
    assert is_temporary(left.name) and left.name.startswith(".latest.") and left.name.endswith(".tmp")
    assert is_temporary(temporary_path(target).name)
    assert not is_temporary("latest") and not is_temporary(".bashrc") and not is_temporary("x.tmp")
