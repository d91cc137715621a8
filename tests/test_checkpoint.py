"""fatscale.checkpoint on real files: seals, verification, pruning, the verify command; and the
choice of the checkpoint to resume (fatscale.checkpoint.resume)."""

import hashlib
import logging
import subprocess
import sys

import pytest

from fatscale.checkpoint import layout as ckpt
from fatscale.checkpoint.resume import NoIntactCheckpoint, ResumeMismatch, intact_checkpoint

FILES = {"mp_rank_00_model_states.pt": bytes(range(256)) * 64, "rank-0.json": b'{"loader": 1}',
         "ema.safetensors": b"\x01" * 1000}


def make_checkpoint(checkpoint_dir, step: int, is_best: bool = False) -> str:
    """A checkpoint saved as the Checkpointer saves one: files in its ``.saving`` directory, sealed
    with their entries, moved to its tag."""
    tag = ckpt.tag_for(step)
    saving = checkpoint_dir / ckpt.saving_dir(tag)
    saving.mkdir(parents=True)
    for name, data in FILES.items():
        (saving / name).write_bytes(data)
    ckpt.mark_complete(checkpoint_dir, tag, {name: ckpt.file_record(saving / name) for name in FILES}, is_best)
    return tag


def flip_middle_byte(path) -> None:
    """Bit rot: one byte in the middle of the file changes, its size does not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_prune_keeps_the_newest_and_names_what_it_cannot_delete(tmp_path, caplog):
    tags = [make_checkpoint(tmp_path, step) for step in (1, 2, 3, 4)]
    stuck = tmp_path / tags[0] / "rank-0.json"
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


def test_the_seal_records_every_file_and_verify_names_the_damaged_one(tmp_path):
    tag = make_checkpoint(tmp_path, 8)
    folder = tmp_path / tag
    seal = ckpt.read_json(folder / ckpt.COMPLETE)
    assert seal == {"files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                              for name, data in FILES.items()}}
    assert ckpt.verify(tmp_path, tag) == ckpt.Verdict(tag)
    states = folder / "mp_rank_00_model_states.pt"

    flip_middle_byte(states)
    assert ckpt.verify(tmp_path, tag).damage == f"{states} is damaged (sha256 mismatch)"
    states.write_bytes(FILES[states.name][:-100])  # a copy cut short
    assert ckpt.verify(tmp_path, tag).damage == f"{states} is damaged (sealed with 16384 bytes, it has 16284)"
    states.unlink()
    assert ckpt.verify(tmp_path, tag).damage == f"{states} is missing"
    states.write_bytes(FILES[states.name])
    assert ckpt.verify(tmp_path, tag).good

    (folder / ckpt.COMPLETE).write_bytes(b'{"files": {"rank-0.json": {"bytes": 1}}}')  # the seal itself damaged
    assert ckpt.verify(tmp_path, tag).damage == f"{folder / ckpt.COMPLETE} is damaged (not a seal)"
    (folder / ckpt.COMPLETE).unlink()
    assert "is not sealed" in ckpt.verify(tmp_path, tag).damage


def test_resume_passes_over_damaged_checkpoints_naming_them(tmp_path, caplog):
    tags = [make_checkpoint(tmp_path, step) for step in (4, 8, 12)]
    damaged = tmp_path / tags[2] / "mp_rank_00_model_states.pt"
    flip_middle_byte(damaged)
    (tmp_path / tags[1] / "rank-0.json").unlink()
    with caplog.at_level(logging.WARNING, logger="fatscale.checkpoint.resume"):
        assert intact_checkpoint(tmp_path) == tags[0]
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {tmp_path / tags[2]}: {damaged} is damaged (sha256 mismatch); resuming from {tmp_path / tags[0]}",
        f"checkpoint {tmp_path / tags[1]}: {tmp_path / tags[1] / 'rank-0.json'} is missing; resuming from "
        f"{tmp_path / tags[0]}"]


def test_resume_refuses_when_no_checkpoint_is_intact_and_never_starts_fresh(tmp_path):
    assert intact_checkpoint(tmp_path) is None  # nothing saved yet: a fresh run
    tags = [make_checkpoint(tmp_path, step) for step in (4, 8)]
    for tag in tags:
        flip_middle_byte(tmp_path / tag / "ema.safetensors")
    with pytest.raises(NoIntactCheckpoint) as refused:
        intact_checkpoint(tmp_path)
    assert isinstance(refused.value, ResumeMismatch)  # the launchers and the trainer's CLI say it in one line
    assert str(refused.value) == (
        f"no checkpoint in {tmp_path} is intact: {tmp_path / tags[1] / 'ema.safetensors'} is damaged (sha256 mismatch) "
        f"(and 1 older ones are damaged); python -m fatscale.checkpoint verify {tmp_path.parent} lists them; start "
        f"fresh in another output_dir (--set output_dir=...) or after removing {tmp_path}")
    for tag in tags:
        ckpt._delete(tmp_path / tag)
    with pytest.raises(NoIntactCheckpoint, match=f"names {tags[1]}, but {tmp_path} holds no sealed checkpoint"):
        intact_checkpoint(tmp_path)  # the pointer says a run saved here


def test_an_older_fatscales_empty_seal_is_resumed_unverified(tmp_path, caplog):
    tag = make_checkpoint(tmp_path, 4)
    (tmp_path / tag / ckpt.COMPLETE).write_bytes(b"")  # sealed as before checksums
    flip_middle_byte(tmp_path / tag / "ema.safetensors")  # undetectable without them
    assert ckpt.verify(tmp_path, tag) == ckpt.Verdict(tag, checksummed=False)
    with caplog.at_level(logging.WARNING, logger="fatscale.checkpoint.resume"):
        assert intact_checkpoint(tmp_path) == tag
    assert "was sealed without checksums (by an older fatscale): resuming from it unverified" in caplog.text


def test_a_step_saved_again_replaces_its_checkpoint_and_a_sealed_save_in_progress_wins(tmp_path):
    tag = make_checkpoint(tmp_path, 4)
    first = ckpt.file_record(tmp_path / tag / ckpt.COMPLETE)
    saving = tmp_path / ckpt.saving_dir(tag)
    saving.mkdir()
    again = {"rank-0.json": ckpt.write_json_record(saving / "rank-0.json", {"loader": 2})}
    # Killed after the seal, before the move: the sealed save in progress is the newest checkpoint.
    ckpt.write_json_record(saving / ckpt.COMPLETE, {"files": again})
    assert ckpt.sealed_tags(tmp_path) == [saving.name, tag] and intact_checkpoint(tmp_path) == saving.name
    # The next save of the step starts afresh, and replaces the earlier one once sealed.
    ckpt.clear_saving_dir(tmp_path, tag)
    assert not saving.exists() and ckpt.file_record(tmp_path / tag / ckpt.COMPLETE) == first
    saving.mkdir()
    ckpt.mark_complete(tmp_path, tag, {"rank-0.json": ckpt.write_json_record(saving / "rank-0.json", {"loader": 2})},
                       is_best=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LATEST, tag]
    assert sorted(p.name for p in (tmp_path / tag).iterdir()) == [ckpt.COMPLETE, "rank-0.json"]  # nothing stale
    assert ckpt.verify(tmp_path, tag).good


def test_pruning_after_a_fall_back_keeps_the_new_save_and_drops_the_abandoned_steps(tmp_path):
    good = make_checkpoint(tmp_path, 8)
    damaged = make_checkpoint(tmp_path, 12, is_best=True)
    flip_middle_byte(tmp_path / damaged / "mp_rank_00_model_states.pt")
    assert intact_checkpoint(tmp_path) == good
    # The resumed run saves step 10: the damaged step 12 (and the best pointer naming it) go,
    # the new save stays even with keep_last 1, and the last intact one with keep_last 2.
    new = make_checkpoint(tmp_path, 10)
    assert ckpt.prune(tmp_path, keep_last=2) == [damaged]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [good, new] and not (tmp_path / ckpt.BEST).exists()
    assert ckpt.prune(tmp_path, keep_last=1) == [good]
    assert intact_checkpoint(tmp_path) == ckpt.latest_tag(tmp_path) == new


def run_verify(output_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fatscale.checkpoint", "verify", str(output_dir)],
                          capture_output=True, text=True, timeout=60)


def test_the_verify_command_says_which_checkpoints_are_good(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert run_verify(tmp_path).returncode == 1  # no checkpoint
    tags = [make_checkpoint(checkpoints, step) for step in (4, 8, 12)]
    (checkpoints / tags[0] / ckpt.COMPLETE).write_bytes(b"")
    (checkpoints / ckpt.saving_dir(ckpt.tag_for(16))).mkdir()
    result = run_verify(tmp_path)
    assert result.returncode == 0 and result.stdout.splitlines() == [
        f"{tags[0]}  unverifiable: sealed without checksums by an older fatscale",
        f"{tags[1]}  good", f"{tags[2]}  good",
        f"{ckpt.tag_for(16)}.saving  unsealed (a save in progress or cut short)"]
    (checkpoints / tags[2] / "rank-0.json").unlink()
    result = run_verify(tmp_path)
    assert result.returncode == 2  # the newest is damaged, a resume falls back
    assert result.stdout.splitlines()[2] == f"{tags[2]}  damaged: {checkpoints / tags[2] / 'rank-0.json'} is missing"
    flip_middle_byte(checkpoints / tags[1] / "ema.safetensors")
    (checkpoints / tags[0] / ckpt.COMPLETE).unlink()
    assert run_verify(tmp_path).returncode == 1  # nothing a resume could start from


def test_the_verify_command_imports_no_torch():
    code = "import sys, fatscale.checkpoint; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    help_text = subprocess.run([sys.executable, "-m", "fatscale.checkpoint", "verify", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    assert "OUTPUT_DIR" in help_text.upper()
