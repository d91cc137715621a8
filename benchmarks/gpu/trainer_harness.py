"""fatscale's Trainer, built from recipes/fat_b0_300ep.yaml as a run builds it (bf16 autocast,
fused AdamW, gradient clipping, EMA, DeepSpeed, the recipe's Mixup loss), fed fixed synthetic
batches: the figures are the trainer's own step, per-step loop and evaluation, without the loader.

The Trainer needs shards to start (it builds its loaders and reads the classes): a few tiny JPEGs
are sharded once for that; the model has ImageNet's 1000 classes. The recipe's compile is off at
start: a check compiles through the engine itself (``compile_engine``), after its eager figures, exactly
as the Trainer does (the EMA copy is made before, and stays eager).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.gpu import data
from benchmarks.gpu.common import REPO, single_rank_env

RECIPE = REPO / "recipes" / "fat_b0_300ep.yaml"
_runs = itertools.count()


def sizes(tiny: bool) -> tuple[int, int, int]:
    """(image size, batch per device, another size): the recipe's 224 px and 128, and 160 px (a
    resolution schedule's start); or the dry run's."""
    return (32, 4, 48) if tiny else (224, 128, 160)


class SyntheticLoader:
    """What the Trainer uses of its TrainLoader and ValLoader: iteration, length, the size, the
    position, the quarantine."""

    def __init__(self, batches: list):
        self.batches = batches
        self.img_size = batches[0][0].shape[-1]
        self.state = SimpleNamespace(epoch=0, step=0)
        self.quarantine: list = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.state.step += 1
            yield batch


def build(model: str, device: str, tiny: bool, work: Path, overrides: tuple[str, ...] = ()):
    """A Trainer for ``model`` on one device; ``overrides`` are recipe --set values."""
    from fatscale.config import dump, load_recipe
    from fatscale.train.logs import setup_logging
    from fatscale.train.trainer import Trainer

    size, batch, _ = sizes(tiny)
    # The Trainer's own loaders must have a batch to start: batch + a few tiny JPEGs, sharded once.
    shards = data.shards_of(data.jpegs(data.write_jpegs(work / "jpegs", batch + 4, size=(40, 40))), work,
                            samples_per_shard=64)
    single_rank_env(device)
    setup_logging(0)
    sets = [f"model.name={model}", "model.num_classes=1000", "model.compile=false", f"data.shards={shards}",
            f"data.img_size={size}", "data.num_threads=2", f"train.batch_per_device={batch}",
            f"train.val_batch_per_device={batch}", f"train.log_every={10**6}", "checkpoint.every_minutes=null",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.system_metrics=false",
            f"output_dir={work / f'run-{os.getpid()}-{next(_runs)}'}"]  # fresh: nothing to resume
    if tiny:  # inductor takes minutes per graph on a small CPU, and bf16 without bf16 units is slow
        sets += ["model.compile_backend=eager", "train.precision=fp32"]
    recipe = load_recipe(RECIPE, sets + list(overrides))
    return Trainer(recipe, dump(recipe))


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def train_steps(trainer, batches: list) -> float:
    """Seconds for the trainer's loop (Trainer.train_epoch: step, per-step agreement, LR schedule,
    EMA) over ``batches``, the queue drained before and after."""
    trainer.train_loader = SyntheticLoader(batches)
    synchronize(trainer.device)
    start = time.perf_counter()
    trainer.train_epoch()
    synchronize(trainer.device)
    return time.perf_counter() - start


def evaluate(trainer, batches: list) -> float:
    """Seconds for the trainer's evaluation function on ``batches`` (labels: the targets' argmax)."""
    from fatscale.train.evaluation import evaluate as run

    loader = SyntheticLoader([(x, y.argmax(1)) for x, y in batches])
    synchronize(trainer.device)
    start = time.perf_counter()
    run(trainer.engine.module, loader, trainer.device, trainer.recipe.train.precision)
    return time.perf_counter() - start


def compile_engine(trainer) -> None:
    """What the Trainer does with model.compile: torch.compile through the DeepSpeed engine."""
    trainer.engine.compile(backend=trainer.recipe.model.compile_backend)


def release(trainer) -> None:
    """Close the run (its lock) and free what the engine holds; the caller drops its reference, and
    the GPU memory goes back before the next run."""
    import gc

    import torch

    trainer.close()
    trainer.engine.destroy()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
