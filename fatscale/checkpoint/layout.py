"""Checkpoints on disk: their layout, their atomic writes, their seals, and the readers of their files.

Layout under ``<output_dir>/checkpoints`` (what each file holds and when one is saved:
fatscale.checkpoint.checkpointer)::

    latest                     the tag of the last complete checkpoint (replaced atomically)
    step-000000120/            DeepSpeed's files (module, optimizer, ZeRO partitions)
        ema.safetensors        EMA weights (fp32)
        rank-0.json ...        per rank: loader position, RNG states, fp16 loss scaler
        progress.json          the TrainState, the resume identity and the recipe
        COMPLETE               the seal, written last: every file's size and SHA-256
    step-000000130.saving/     a save in progress, moved to step-000000130/ once sealed
    best                       the tag of the best raw-model top-1 so far

A save writes into a fresh ``.saving`` directory; rank 0 seals it once every rank's part is on
disk (each rank hashed its files right after writing them), renames it to its tag (an earlier save of
the same step, e.g. a periodic save followed by the epoch end's, is renamed away first and then
deleted) and then moves ``latest``. A process killed at any moment, also in the middle of a save,
leaves the checkpoints sealed before it intact; one killed between the two renames leaves the
sealed ``.saving`` directory, which resume takes for its step.

The seal is what resume trusts: it takes the newest sealed checkpoint whose every file has the
recorded size and digest (fatscale.checkpoint.resume), so bit rot, a flaky file system or a copy cut short
make it fall back to an older checkpoint instead of loading wrong numbers. A seal written before
checksums (an empty ``COMPLETE``) is trusted unverified, as it was then. Loading never unpickles
code: DeepSpeed's files go through ``torch.load(weights_only=True)``, the rest is JSON and
safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fatscale.atomic import fsync_path, replacing, write_atomic, write_json_atomic

if TYPE_CHECKING:  # torch is imported by the functions that need it: the launchers' checks read tags only
    import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
SAVING = ".saving"
# SHA-256 hashes at 1.8 GB/s on the build machine's CPU (SHA-NI), BLAKE2b at 0.93, MD5 at 0.76.
HASH = "sha256"
_CHECKPOINT = re.compile(rf"step-(\d{{9}})({re.escape(SAVING)})?")  # a tag, or its save in progress

log = logging.getLogger(__name__)


def _record(size: int, digest: hashlib._Hash) -> dict:
    """A file's entry in a seal."""
    return {"bytes": size, HASH: digest.hexdigest()}


def file_record(path: Path) -> dict:
    """A file's entry, read back: right after the file is written (from the page cache, faster than
    hashing while writing through Python on the build machine), and when verifying."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, HASH)
        return _record(f.tell(), digest)


def bytes_record(data: bytes) -> dict:
    return _record(len(data), hashlib.new(HASH, data))


def write_json_record(path: Path, obj: Any) -> dict:
    """Writes ``obj`` as JSON (fatscale.atomic); returns the file's entry for the seal."""
    return bytes_record(write_json_atomic(path, obj, sort_keys=True))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Writes ``tensors`` as safetensors; returns the file's entry for the seal, hashed from the page
    cache right after the write (safetensors streams to a file faster than it makes bytes)."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    return file_record(path)


def tag_for(step: int) -> str:
    return f"step-{step:09d}"


def saving_dir(tag: str) -> str:
    """Where the save of ``tag`` is written until it is sealed."""
    return tag + SAVING


def checkpoint_folders(checkpoint_dir: Path) -> list[str]:
    """Every checkpoint directory's name, sealed or a save in progress, oldest first."""
    return sorted(p.name for p in checkpoint_dir.glob("step-*") if _CHECKPOINT.fullmatch(p.name))


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag ``latest`` names (the last checkpoint saved), or None."""
    pointer = checkpoint_dir / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (checkpoint_dir / tag / COMPLETE).exists():
        raise RuntimeError(f"{pointer} names {tag!r}, which is not a complete checkpoint")
    return tag


def sealed_tags(checkpoint_dir: Path) -> list[str]:
    """The sealed checkpoints, newest first; within a step a sealed ``.saving`` directory first (its
    save was cut short while it replaced an earlier save of the same step)."""
    found = []
    for path in checkpoint_dir.glob("step-*"):
        match = _CHECKPOINT.fullmatch(path.name)
        if match and (path / COMPLETE).exists():
            found.append((int(match[1]), bool(match[2]), path.name))
    return [tag for *_, tag in sorted(found, reverse=True)]


def _delete(path: Path) -> bool:
    """Deletes a directory tree; one that cannot be deleted is named in a warning and stays."""
    try:
        shutil.rmtree(path)
    except OSError as e:
        log.warning("cannot delete old checkpoint %s (%s: %s); it stays on disk", path, e.filename, e.strerror)
        return False
    return True


def clear_saving_dir(checkpoint_dir: Path, tag: str) -> None:
    """Rank 0, before a save: removes what a killed save of ``tag`` left in its ``.saving``
    directory (stale files would otherwise stay beside the new ones)."""
    path = checkpoint_dir / saving_dir(tag)
    if path.exists():
        _delete(path)


def _move_into_place(saved: Path, target: Path) -> None:
    """Renames the sealed ``saved`` to ``target``; an earlier ``target`` is renamed away first, then
    deleted (a directory cannot be renamed over a full one)."""
    replaced = None
    if target.exists():
        replaced = Path(tempfile.mkdtemp(prefix=f"{target.name}.replaced-", dir=target.parent))
        target.rename(replaced / target.name)
    saved.rename(target)
    fsync_path(target.parent)
    if replaced is not None:
        _delete(replaced)


def mark_complete(checkpoint_dir: Path, tag: str, files: dict[str, dict], is_best: bool) -> None:
    """Rank 0, once every rank's part of the save is in ``saving_dir(tag)``: seal it with ``files``
    (path in the checkpoint -> its entry), move it to ``tag``, then move the pointers."""
    saved = checkpoint_dir / saving_dir(tag)
    write_json_atomic(saved / COMPLETE, {"files": files}, sort_keys=True)
    _move_into_place(saved, checkpoint_dir / tag)
    if is_best:
        write_atomic(checkpoint_dir / BEST, tag.encode())
    write_atomic(checkpoint_dir / LATEST, tag.encode())


def prune(checkpoint_dir: Path, keep_last: int) -> list[str]:
    """Rank 0, right after a save moved ``latest``: delete all but the newest ``keep_last`` sealed
    checkpoints up to ``latest`` (and the best). What else lies under ``step-*`` is a killed save's
    leftover, or a checkpoint newer than ``latest`` that a resume fell back past (damaged; the run
    retrains its steps). Returns the deleted tags; one that cannot be deleted is named in a warning
    (it stays on disk) and tried again at the next prune."""
    latest = (checkpoint_dir / LATEST).read_text().strip()
    best_pointer = checkpoint_dir / BEST
    best = best_pointer.read_text().strip() if best_pointer.exists() else None
    if best is not None and best > latest:  # tags compare as their steps do
        best_pointer.unlink()  # it names a checkpoint of the abandoned steps
        best = None
    tags = sorted(p.name for p in checkpoint_dir.glob("step-*") if p.is_dir())
    complete = [t for t in tags if (m := _CHECKPOINT.fullmatch(t)) and not m[2] and t <= latest
                and (checkpoint_dir / t / COMPLETE).exists()]
    keep = set(complete[-keep_last:]) | {latest, best}
    return [tag for tag in tags if tag not in keep and _delete(checkpoint_dir / tag)]


@dataclass(frozen=True)
class Verdict:
    """What verifying checkpoint ``tag`` found: ``damage`` names the file and what is wrong with it
    (None: usable); ``checksummed`` is False for a seal without checksums (an older fatscale's)."""

    tag: str
    damage: str | None = None
    checksummed: bool = True

    @property
    def good(self) -> bool:
        return self.damage is None


def _read_seal(path: Path) -> dict[str, dict] | None:
    """The seal's files (None: an empty seal, written before checksums); ValueError if it is not
    a seal."""
    text = path.read_bytes()
    if not text:
        return None
    try:
        files = json.loads(text)["files"]
        if all(isinstance(e["bytes"], int) and isinstance(e[HASH], str) for e in files.values()):
            return files
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    raise ValueError(f"{path} is damaged (not a seal)")


def verify(checkpoint_dir: Path, tag: str) -> Verdict:
    """Whether every file of checkpoint ``tag`` has the size and digest its seal records. Sizes are
    checked first: a missing or cut file shows before anything is read."""
    folder = checkpoint_dir / tag
    try:
        files = _read_seal(folder / COMPLETE)
    except FileNotFoundError:
        return Verdict(tag, f"{folder} is not sealed (a save in progress or cut short)")
    except (OSError, ValueError) as e:
        return Verdict(tag, str(e))
    if files is None:
        return Verdict(tag, checksummed=False)
    try:
        for name, entry in files.items():
            size = (folder / name).stat().st_size
            if size != entry["bytes"]:
                return Verdict(tag, f"{folder / name} is damaged (sealed with {entry['bytes']} bytes, it has {size})")
        for name, entry in files.items():
            if file_record(folder / name) != entry:
                return Verdict(tag, f"{folder / name} is damaged ({HASH} mismatch)")
    except FileNotFoundError as e:
        return Verdict(tag, f"{e.filename} is missing")
    except OSError as e:
        return Verdict(tag, f"{e.filename} cannot be read ({e.strerror})")
    return Verdict(tag)


def load_ema(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint_dir / tag / "ema.safetensors"))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def module_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The consolidated model weights of a checkpoint (ZeRO 0-2 keep whole parameters in the
    module states file), loaded without unpickling code."""
    import torch

    files = sorted((checkpoint_dir / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise RuntimeError(f"{checkpoint_dir / tag}: no DeepSpeed model states file")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
