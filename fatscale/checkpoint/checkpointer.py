"""The Checkpointer decides when to save and what a checkpoint holds, saves it, and resumes from it.

A checkpoint (layout and atomicity: fatscale.checkpoint) holds everything a run needs to continue
exactly where it stopped:

- DeepSpeed's engine state: module, optimizer, ZeRO partitions (the LR schedule is a function of
  the step, so it needs none); loaded through ``SafeCheckpointEngine``, which unpickles no code;
- per rank (``rank-N.json``): the train loader's position (DALI's pipeline checkpoint), this
  rank's RNG states (fatscale.checkpoint.state) and the fp16 loss scaler, which DeepSpeed does not keep;
- on rank 0: the EMA weights (safetensors) and ``progress.json``: the TrainState, the recipe's
  resume identity (fatscale.checkpoint.resume) and the resolved recipe text.

Each rank hashes every file it writes right after writing it (DeepSpeed's in ``SafeCheckpointEngine``);
rank 0 gathers the digests and seals the checkpoint with them (fatscale.checkpoint), which is what
resume verifies before loading anything (fatscale.checkpoint.resume).

A checkpoint made by another number of ranks (a resume on more or fewer GPUs, fatscale.checkpoint.resume)
loads too: its ZeRO partitions (stage 1 and 2; without ZeRO rank 0 saves the optimizer whole) are
converted into DeepSpeed's universal checkpoint first, by rank 0 into ``OUTPUT_DIR/resharding/``
(removed once loaded), and the engine, built with ``load_universal``, loads that for its own
partitioning. Rank 0's loader position is every rank's (it is the step, the same on all), with the
quarantine of every old rank; the host RNGs of a new world are seeded from the seed, rank and step.

It is saved every ``checkpoint.every_steps`` steps and/or ``every_minutes`` minutes (rank 0's
clock), at every epoch end, at the end and when the run is stopped; the newest ``keep_last`` are
kept, plus the best raw top-1 (``keep_best``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from fatscale.checkpoint import layout as ckpt
from fatscale.checkpoint.state import TrainState, load_rng_state_dict, rng_state_dict, seed_everything
from fatscale.config import CheckpointConfig

if TYPE_CHECKING:  # the loader is DALI's: not imported for a type
    from fatscale.data.loader import TrainLoader

# Plain data classes in DeepSpeed's ZeRO optimizer states. The weights-only unpickler rebuilds
# them by setting attributes; it calls no code named in the file. Allowed for the whole process:
# torch's safe_globals contexts do not nest (an inner one's exit drops an outer one's classes).
torch.serialization.add_safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler])


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, hashing every file it saves (``written``: path -> the seal's entry)
    and loading with ``weights_only=True`` (no code from the file runs)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.written: dict[str, dict] = {}

    def save(self, state_dict, path: str):
        super().save(state_dict, path)
        self.written[path] = ckpt.file_record(Path(path))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)


class Checkpointer:
    """Given once what it saves: the DeepSpeed ``engine``, the run's ``state`` (restored in place),
    the train ``loader``, the ``ema`` module (ModelEmaV3.module) and the fp16 ``grad_scaler`` when
    there are any, and ``identity`` (the recipe's resume identity and text, stored with every save)."""

    def __init__(self, config: CheckpointConfig, checkpoint_dir: Path, rank: int, *, engine, state: TrainState,
                 loader: TrainLoader, identity: dict, ema: torch.nn.Module | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None):
        self.config = config
        self.dir = checkpoint_dir
        self.rank = rank
        self.engine = engine
        self.checkpoint_engine = SafeCheckpointEngine(engine._config)
        engine.checkpoint_engine = self.checkpoint_engine
        self.state = state
        self.loader = loader
        self.identity = identity
        self.ema = ema
        self.grad_scaler = grad_scaler
        self.last_save = time.monotonic()
        self.last_tag: str | None = None  # saved or resumed from by this run

    def due_by_steps(self, step: int) -> bool:
        """Every ``every_steps`` steps: every rank knows it."""
        return bool(self.config.every_steps and step % self.config.every_steps == 0)

    def due_by_clock(self, now: float) -> bool:
        """By rank 0's clock (the ranks then agree on it)."""
        minutes = self.config.every_minutes
        return self.rank == 0 and minutes is not None and now - self.last_save > 60 * minutes

    def save(self, is_best: bool = False) -> Path:
        """Every rank: its part, into the save's own directory, each file hashed once written;
        then rank 0 seals it with every rank's digests and moves it to its tag. Returns the
        checkpoint's directory."""
        tag = ckpt.tag_for(self.state.global_step)
        saving = self.dir / ckpt.saving_dir(tag)
        if self.rank == 0:
            ckpt.clear_saving_dir(self.dir, tag)
        dist.barrier()  # no rank writes into it before it is cleared
        self.checkpoint_engine.written.clear()
        self.engine.save_checkpoint(str(self.dir), tag=saving.name, save_latest=False)
        files = {str(Path(path).relative_to(saving)): entry
                 for path, entry in self.checkpoint_engine.written.items()}
        rank_state = dict(loader=self.loader.state_dict(), rng=rng_state_dict(),
                          grad_scaler=self.grad_scaler.state_dict() if self.grad_scaler is not None else None)
        files[f"rank-{self.rank}.json"] = ckpt.write_json_record(saving / f"rank-{self.rank}.json", rank_state)
        if self.rank == 0:
            files["progress.json"] = ckpt.write_json_record(saving / "progress.json",
                                                            {**self.state.state_dict(), **self.identity})
            if self.ema is not None:
                files["ema.safetensors"] = ckpt.save_safetensors_atomic(self.ema.state_dict(),
                                                                        saving / "ema.safetensors")
        every_rank = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(files, every_rank, dst=0)  # once rank 0 has them, every rank's part is on disk
        if self.rank == 0:
            ckpt.mark_complete(self.dir, tag, {k: v for part in every_rank for k, v in part.items()},
                               is_best and self.config.keep_best)
            ckpt.prune(self.dir, self.config.keep_last)
        dist.barrier()
        self.last_save, self.last_tag = time.monotonic(), tag
        return self.dir / tag

    def load(self, tag: str, seed: int, saved_world: int) -> None:
        """Restores the engine, EMA, loss scaler, RNG states, the state and the train loader's
        position from checkpoint ``tag``, made by ``saved_world`` ranks (module docstring)."""
        world = dist.get_world_size()
        if world != saved_world and self.engine.zero_optimization_stage() > 0:
            self._load_resharded(tag)
        else:
            self.engine.load_checkpoint(str(self.dir), tag=tag)
        self.state.load_state_dict(ckpt.read_json(self.dir / tag / "progress.json"))
        ranks = [ckpt.read_json(self.dir / tag / f"rank-{r}.json") for r in range(saved_world)] \
            if world != saved_world else None
        rank_state = ranks[0] if ranks else ckpt.read_json(self.dir / tag / f"rank-{self.rank}.json")
        if ranks:
            seed_everything(seed + 1 + self.rank + 1_000_003 * self.state.global_step)  # this world's own streams
            rank_state["loader"]["quarantine"] = list({json.dumps(q, sort_keys=True): q for r in ranks
                                                       for q in r["loader"]["quarantine"]}.values())
        else:
            load_rng_state_dict(rank_state["rng"])
        if rank_state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(rank_state["grad_scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.load_ema(self.dir, tag))
        self.loader.load_state_dict(rank_state["loader"])
        self.last_save, self.last_tag = time.monotonic(), tag

    def _load_resharded(self, tag: str) -> None:
        """The ZeRO checkpoint ``tag`` of another world size, through DeepSpeed's universal format."""
        universal = self.dir.parent / "resharding" / tag
        if self.rank == 0:
            to_universal(self.dir / tag, universal)
        dist.barrier()
        with weights_only_loads():
            self.engine.load_checkpoint(str(universal.parent), tag=tag)
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(universal.parent)

    def latest(self) -> Path | None:
        """The checkpoint this run last saved or resumed from (a newer one on disk may be damaged)."""
        return self.dir / self.last_tag if self.last_tag else None


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` in this block unpickles weights only, whatever its caller asks:
    DeepSpeed's universal-checkpoint code passes ``weights_only=False``, and no code named in a
    checkpoint file may run. (Torch's own switch, read at each load.)"""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of ZeRO checkpoint ``checkpoint`` in ``out`` (replaced): every
    parameter's optimizer state whole, for any partitioning. In this process (one worker): its
    loads must stay weights-only."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # fatscale's checkpoints do not name TP/PP layouts
    with weights_only_loads():
        ds_to_universal.main(args)
