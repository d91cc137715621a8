"""What a run knows about itself besides the weights: ``TrainState``, and each rank's RNG states."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainState:
    """Where the run is. Saved in every checkpoint's ``progress.json`` (rank 0) and restored on
    resume; ``elapsed_s`` counts the wall time of every session so far, ``device_s`` the same times
    the ranks of each session (device-hours, also across a change of world size)."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps completed
    best_top1: float = -1.0  # the best raw-model val top-1 so far (-1: none yet)
    mlflow_run_id: str | None = None
    elapsed_s: float = 0.0
    device_s: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:  # elapsed_s: absent from checkpoints made before it was counted
                setattr(self, f.name, state[f.name])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state_dict() -> dict:
    """This rank's host RNG states as JSON (Mixup draws from NumPy, random erasing from Python and
    torch, drop path from torch), and this rank's own GPU's: each rank restores only its device."""
    internal, version, gauss = random.getstate()[1], random.getstate()[0], random.getstate()[2]
    np_state = np.random.get_state()
    return dict(
        python=[list(internal), version, gauss],
        numpy=[np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        torch=torch.get_rng_state().tolist(),
        cuda=[torch.cuda.get_rng_state().tolist()] if torch.cuda.is_available() else [],
    )


def load_rng_state_dict(state: dict) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"][0], dtype=torch.uint8))  # the current device's
