"""fatscale.checkpoint on real files."""

import logging
import subprocess

import pytest

from fatscale import checkpoint as ckpt


def make_checkpoint(checkpoint_dir, step: int):
    tag = ckpt.tag_for(step)
    (checkpoint_dir / tag).mkdir(parents=True)
    (checkpoint_dir / tag / "weights").write_bytes(b"w")
    ckpt.mark_complete(checkpoint_dir, tag, is_best=False)
    return tag


def test_prune_keeps_the_newest_and_names_what_it_cannot_delete(tmp_path, caplog):
    tags = [make_checkpoint(tmp_path, step) for step in (1, 2, 3, 4)]
    stuck = tmp_path / tags[0] / "weights"
    # An immutable file cannot be deleted, not even by root (a failing disk or a read-only mount alike).
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        with caplog.at_level(logging.WARNING, logger="fatscale.checkpoint"):
            deleted = ckpt.prune(tmp_path, keep_last=2)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert deleted == [tags[1]]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [tags[0], tags[2], tags[3]]
    (warning,) = caplog.records
    assert str(tmp_path / tags[0]) in warning.getMessage() and "stays on disk" in warning.getMessage()
    assert ckpt.prune(tmp_path, keep_last=2) == [tags[0]]  # tried again, and gone once it can be
