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


log = logging.getLogger(__name__)


def configure_backends(deterministic: bool) -> None:
    """Before CUDA starts. Deterministic: torch's deterministic algorithms, with the fixed cuBLAS
    workspace they require on GPUs (cuBLAS reads it when it starts; without it the first matmul
    raises), and no cuDNN autotuning. Otherwise cuDNN picks the fastest kernels for each input
    shape (a few per run: one per train size, eval size and last partial batch). TF32 matmuls and
    convolutions on Ampere and later either way (bf16/fp16 runs are not affected)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def cuda_device_index(local_rank: int, local_world: int, visible: int) -> int:
    """This rank's GPU among those its process sees: the one GPU of a task bound to one (Slurm's
    --gpus-per-task, one GPU per task), else its local rank's of a node's GPUs, one per rank."""
    if visible == 1:
        return 0
    if visible == local_world:
        return local_rank
    raise RuntimeError(
        f"rank {local_rank} of {local_world} on this node sees {visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give each rank one GPU, "
        f"or every rank all of the node's GPUs with one rank per GPU")


def init_distributed() -> tuple[int, int, int, torch.device]:
    """rank, world size, local rank and device from the launcher's environment variables."""
    import deepspeed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"environment variable {key} is not set: start through torchrun or launch/*.py")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        device = torch.device("cuda", cuda_device_index(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", visible)),
                                                         visible))
        torch.cuda.set_device(device)
        p = torch.cuda.get_device_properties(device)
        where = (f"{socket.gethostname()} {device} (PCI {p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0)"
                 f" of {visible} visible, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    else:
        device = torch.device("cpu")
        where = f"{socket.gethostname()} cpu"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # DeepSpeed prints what it builds: for the log, not the console
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    for line in printed.getvalue().splitlines():
        logging.getLogger("deepspeed").info("%s", line)
    places = [None] * world  # rank 0 logs every rank's device: a wrong binding shows in one place
    dist.all_gather_object(places, where)
    if rank == 0:
        for r, place in enumerate(places):
            log.info("rank %d: %s", r, place)
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


class StepVote:
    """:func:`agree` for every optimizer step, without stalling it: a step's vote (an all-reduce)
    starts asynchronously and is read when the next step's work is queued, so the host waits at
    most for the previous step to finish on the GPU, never for the current one. Its decisions are
    acted on one step late; :meth:`result` waits for the pending vote (before a save)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending = None  # (step, wait for the result, tensor holding it)
        # A pinned host copy of the result on GPUs, read once the copy's event has passed.
        self.host = torch.empty(0, dtype=torch.int32)

    def cast(self, step: int, *flags: bool | torch.Tensor) -> tuple[int, list[bool]] | None:
        """Starts step ``step``'s vote on ``flags``; returns the previous vote's (step, flags), if any."""
        previous = self.result()
        votes = torch.stack([torch.as_tensor(f, device=self.device).reshape(()).int() for f in flags])
        work = dist.all_reduce(votes, op=dist.ReduceOp.MAX, async_op=True)
        if votes.is_cuda:
            work.wait()  # the copy below waits for the all-reduce on the GPU; the host does not
            if self.host.numel() != votes.numel():
                self.host = torch.empty(votes.shape, dtype=votes.dtype, pin_memory=True)
            self.host.copy_(votes, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self.pending = (step, copied.synchronize, self.host)
        else:
            self.pending = (step, work.wait, votes)
        return previous

    def result(self) -> tuple[int, list[bool]] | None:
        """The pending vote's (step, flags), waiting for it; None when there is none."""
        if self.pending is None:
            return None
        step, wait, votes = self.pending
        self.pending = None
        wait()
        return step, [bool(v) for v in votes.tolist()]


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
