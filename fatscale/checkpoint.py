"""Checkpoints on disk: their layout, their atomic writes, and the readers of their files.

Layout under ``<output_dir>/checkpoints`` (what each file holds and when one is saved:
fatscale.train.checkpointer)::

    latest                     the tag of the last complete checkpoint (replaced atomically)
    step-000000120/            DeepSpeed's files (module, optimizer, ZeRO partitions)
        ema.safetensors        EMA weights (fp32)
        rank-0.json ...        per rank: loader position, RNG states, fp16 loss scaler
        progress.json          the TrainState, the resume identity and the recipe
        COMPLETE               written last
    best                       the tag of the best raw-model top-1 so far

A checkpoint counts once ``COMPLETE`` exists and ``latest`` names it; a process killed at any
moment leaves ``latest`` naming a complete one. Loading never unpickles code: DeepSpeed's files
go through ``torch.load(weights_only=True)``, the rest is JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fatscale.atomic import replacing, write_atomic

if TYPE_CHECKING:  # torch is imported by the functions that need it: the launchers' checks read tags only
    import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def tag_for(step: int) -> str:
    return f"step-{step:09d}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The last complete checkpoint's tag, or None."""
    pointer = checkpoint_dir / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (checkpoint_dir / tag / COMPLETE).exists():
        raise RuntimeError(f"{pointer} names {tag!r}, which is not a complete checkpoint")
    return tag


def mark_complete(checkpoint_dir: Path, tag: str, is_best: bool) -> None:
    """Rank 0, after every rank has written its part: seal the checkpoint, then move pointers."""
    write_atomic(checkpoint_dir / tag / COMPLETE, b"")
    if is_best:
        write_atomic(checkpoint_dir / BEST, tag.encode())
    write_atomic(checkpoint_dir / LATEST, tag.encode())


def prune(checkpoint_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and the best), and any
    incomplete leftovers of killed saves. Returns the deleted tags; one that cannot be deleted is
    named in a warning (it stays on disk) and tried again at the next prune."""
    protected = {p.read_text().strip() for p in (checkpoint_dir / LATEST, checkpoint_dir / BEST) if p.exists()}
    tags = sorted(p.name for p in checkpoint_dir.glob("step-*") if p.is_dir())
    complete = [t for t in tags if (checkpoint_dir / t / COMPLETE).exists()]
    keep = set(complete[-keep_last:]) | protected
    # Called by rank 0 right after a save completed: an incomplete directory is what a killed
    # save left behind.
    deleted = []
    for tag in tags:
        if tag in keep:
            continue
        try:
            shutil.rmtree(checkpoint_dir / tag)
        except OSError as e:
            log.warning("cannot delete old checkpoint %s (%s: %s); it stays on disk", checkpoint_dir / tag,
                        e.filename, e.strerror)
        else:
            deleted.append(tag)
    return deleted


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
