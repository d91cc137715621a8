"""Pre-flight checks: what a recipe needs besides being well-formed, checked before anything
expensive starts (a launcher, a submission, each rank's start): the shards exist with train and val
splits, the weights it starts from exist, and its global batch trains at least one step per epoch
on the ranks at hand. Each failure is one ``SchemaError`` (= fatscale.config.RecipeError) line naming the file and key."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fatscale.data.manifest import Manifest, ManifestError, load_manifest
from fatscale.schema import SchemaError

if TYPE_CHECKING:
    from fatscale.config import Recipe


def check_data(recipe: Recipe, source: str) -> None:
    """The shard directory exists and holds a valid manifest with train and val splits."""
    shards = Path(recipe.data.shards)
    if not shards.is_dir():
        raise SchemaError(f"{source}: data.shards: no such directory {str(shards)!r}")
    try:
        manifest = load_manifest(shards)
    except ManifestError as e:
        raise SchemaError(f"{source}: data.shards: {e}") from None
    for split in ("train", "val"):
        if split not in manifest.splits:
            raise SchemaError(f"{source}: data.shards: {shards} has no {split} split")
    num_classes = recipe.model.num_classes
    if num_classes is not None and num_classes < manifest.num_classes:
        raise SchemaError(f"{source}: model.num_classes: {num_classes} is fewer than the {manifest.num_classes} "
                          f"classes of data.shards {shards} (labels up to {manifest.num_classes - 1})")


def check_init_from(recipe: Recipe, source: str) -> None:
    """The weights a fine-tuning run starts from exist here (their contents are checked where they
    are loaded, fatscale.weights)."""
    init_from = recipe.model.init_from
    if init_from and not (init_from.startswith("models:/") or Path(init_from).exists()):
        raise SchemaError(f"{source}: model.init_from: no such file or directory {init_from!r} (a run's output "
                          f"directory, a checkpoint, an exported timm folder, a weights file or models:/NAME/VERSION)")


def check_world(recipe: Recipe, manifest: Manifest, world_size: int, source: str) -> None:
    """The recipe trains at least one step per epoch on ``world_size`` ranks (for launchers, which
    know the world size; the trainer checks it again)."""
    from fatscale.data.sample_order import BatchLayout, LayoutError, steps_per_epoch  # numpy: not for --help

    t = recipe.train
    train_samples = manifest.splits["train"].num_samples
    if t.global_batch is None:
        global_batch = t.batch_per_device * t.grad_accum * world_size
        what = (f"train.batch_per_device: {t.batch_per_device} x train.grad_accum {t.grad_accum} on each of "
                f"{world_size} ranks is a global batch of {global_batch}")
    else:
        global_batch, what = t.global_batch, f"train.global_batch: {t.global_batch}"
        try:
            BatchLayout.for_world(global_batch, world_size, t.batch_per_device)
        except LayoutError as e:
            raise SchemaError(f"{source}: train.global_batch: {e}") from None
    if steps_per_epoch(train_samples, global_batch) == 0:
        raise SchemaError(f"{source}: {what} train samples per step, data.shards has {train_samples}: zero steps "
                          "per epoch")
