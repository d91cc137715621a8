"""The process group and the few decisions every rank must take together."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from fatscale.run_lock import RunDirBusy, RunLock


def init_distributed() -> tuple[int, int, int, torch.device]:
    """rank, world size, local rank and device from the launcher's environment variables."""
    import deepspeed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"environment variable {key} is not set: start through torchrun or launch/*.py")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # DeepSpeed prints what it builds: for the log, not the console
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    for line in printed.getvalue().splitlines():
        logging.getLogger("deepspeed").info("%s", line)
    return rank, world, local_rank, device


def node_layout(local_rank: int) -> tuple[int | None, list[str]]:
    """This rank's node index if it is its node's local rank 0 (else None), and the host of every
    node, in the order of the nodes' first ranks; from the ranks themselves, whatever the launcher."""
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (local_rank, socket.gethostname()))
    leaders = [rank for rank, (local, _) in enumerate(ranks) if local == 0]
    index = leaders.index(dist.get_rank()) if local_rank == 0 else None
    return index, [ranks[rank][1] for rank in leaders]


def agree(device: torch.device, *flags: bool | torch.Tensor) -> list[bool]:
    """Each flag, true on any rank: every rank takes the same branch into collective work."""
    votes = torch.stack([torch.as_tensor(f, device=device).reshape(()).int() for f in flags])
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]


def hold_output_dir(output_dir: Path, rank: int) -> RunLock | None:
    """Rank 0 locks ``output_dir`` for this run (fatscale.run_lock); every rank raises
    :class:`RunDirBusy` when another live run holds it."""
    lock = RunLock(output_dir) if rank == 0 else None
    refusal = [None]
    if lock is not None:
        try:
            lock.acquire()
        except RunDirBusy as e:
            refusal[0] = str(e)
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunDirBusy(refusal[0])
    return lock
