"""May the checkpoint in an output directory be resumed by this recipe, on this many ranks?

A checkpoint's state is only meaningful for the run that made it: the model's shape, the train
split, the random operators of the DALI graph, the optimizer's kind. So every checkpoint records
the values of ``RESUME_KEYS`` it was made with, and a run that differs in any of them is refused
before it starts, by the launchers and by the trainer itself. Any other change (more epochs,
another learning rate) resumes; the trainer records it (new recipe artifact, MLflow tag).

The number of ranks may change: the run keeps its global batch (``global_batch`` in the
checkpoint: the recipe's ``train.batch_per_device x train.grad_accum x`` the world size of its
first start), and so its learning-rate schedule, its steps per epoch and the samples of every step
(fatscale.data.sample_order); each rank's micro-batch and accumulation adapt (``layout``). A world
size that does not divide the global batch is refused.

The checkpoint resumed is the newest one whose files all match its seal (fatscale.checkpoint):
a damaged newer one is named in a warning and passed over; when none is intact the run is
refused, never started afresh on its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from fatscale.checkpoint import layout as ckpt
from fatscale.config import Recipe, flatten, to_dict
from fatscale.data.manifest import Manifest
from fatscale.data.sample_order import BatchLayout, LayoutError

# The model's shape and function; the train split; every random operator of the DALI graph
# (their states are in the loader's checkpoint); the optimizer's partitioning and loss scaling;
# the seed the sample order is drawn from.
RESUME_KEYS = (
    "model.name", "model.num_classes", "model.bidirectional", "data.train_digest",
    "aug.scale", "aug.ratio", "aug.hflip", "aug.rand_augment", "aug.rand_augment_interp", "aug.color_jitter",
    "train.zero_stage", "train.precision", "seed",
)


log = logging.getLogger(__name__)


class ResumeMismatch(ValueError):
    """The output directory's checkpoint was made by an incompatible recipe (one-line message)."""


class NoIntactCheckpoint(ResumeMismatch):
    """The output directory holds checkpoints but none is intact (one-line message). A
    ResumeMismatch: the launchers and the trainer refuse it the same way."""


def identity(recipe: Recipe, manifest: Manifest) -> dict:
    """The values of ``RESUME_KEYS`` for a run of ``recipe``, as JSON has them."""
    flat = flatten(to_dict(recipe))
    flat.update({"model.num_classes": recipe.model.num_classes or manifest.num_classes,
                 "data.train_digest": manifest.split_digest("train")})
    return json.loads(json.dumps({key: flat[key] for key in RESUME_KEYS}))  # tuples as lists


def fresh_layout(recipe: Recipe, world_size: int) -> BatchLayout:
    t = recipe.train
    if t.global_batch is not None:
        return BatchLayout.for_world(t.global_batch, world_size, t.batch_per_device)
    return BatchLayout(t.batch_per_device * t.grad_accum * world_size, world_size, t.batch_per_device, t.grad_accum)


def layout(recipe: Recipe, world_size: int, progress: dict | None) -> BatchLayout:
    """How this run deals its global batch to ``world_size`` ranks: the recipe's for a fresh run
    (``progress`` None); for a resumed one, the checkpoint's global batch in micro-batches of at
    most ``train.batch_per_device``. Raises :class:`ResumeMismatch` when the world size cannot
    keep it, or ``train.global_batch`` asks for another."""
    if progress is None:
        return fresh_layout(recipe, world_size)
    saved = progress["resume_identity"]
    wanted = recipe.train.global_batch
    if wanted is not None and wanted != saved["global_batch"]:
        raise ResumeMismatch(f"{progress['checkpoint']} was made with a global batch of {saved['global_batch']}; this "
                             f"run has train.global_batch={wanted}: resume with the same value or without it")
    try:
        return BatchLayout.for_world(saved["global_batch"], world_size, recipe.train.batch_per_device)
    except LayoutError as e:
        raise ResumeMismatch(f"{progress['checkpoint']} was made by {saved['world_size']} rank(s) with a global batch of "
                             f"{saved['global_batch']}, which the run keeps: {e}") from None


def _show(key: str, value) -> str:
    return f"{key}={value[:12] if key == 'data.train_digest' else value!r}"


def check(progress: dict, current: dict, checkpoint: Path) -> None:
    """Raise :class:`ResumeMismatch` when ``checkpoint`` (whose ``progress.json`` is ``progress``)
    was made with other values of ``RESUME_KEYS`` than ``current``."""
    saved = progress.get("resume_identity")
    start_fresh = f"start fresh in another output_dir (--set output_dir=...) or after removing {checkpoint.parent}"
    if saved is None or "global_batch" not in saved:
        raise ResumeMismatch(f"{checkpoint} was made by an older fatscale (another sample order or no resume "
                             f"identity): {start_fresh}")
    differ = [key for key in RESUME_KEYS if saved.get(key) != current[key]]
    if differ:
        raise ResumeMismatch(
            f"{checkpoint} was made with {', '.join(_show(k, saved.get(k)) for k in differ)}; this run has "
            f"{', '.join(_show(k, current[k]) for k in differ)}: resume with the same values, or {start_fresh}")


def intact_checkpoint(checkpoint_dir: Path) -> str | None:
    """The tag of the newest sealed checkpoint whose files all verify, after a warning for each
    newer one that does not; None when there is no checkpoint (a fresh run). Raises
    :class:`NoIntactCheckpoint` when there are checkpoints but none verifies."""
    start_fresh = f"start fresh in another output_dir (--set output_dir=...) or after removing {checkpoint_dir}"
    damaged = []
    for tag in ckpt.sealed_tags(checkpoint_dir):
        verdict = ckpt.verify(checkpoint_dir, tag)
        if verdict.good:
            for bad in damaged:
                log.warning("checkpoint %s: %s; resuming from %s", checkpoint_dir / bad.tag, bad.damage,
                            checkpoint_dir / tag)
            if not verdict.checksummed:
                log.warning("checkpoint %s was sealed without checksums (by an older fatscale): resuming from it "
                            "unverified", checkpoint_dir / tag)
            return tag
        damaged.append(verdict)
    if damaged:
        older = f" (and {len(damaged) - 1} older ones are damaged)" if len(damaged) > 1 else ""
        raise NoIntactCheckpoint(f"no checkpoint in {checkpoint_dir} is intact: {damaged[0].damage}{older}; python -m "
                                 f"fatscale.checkpoint verify {checkpoint_dir.parent} lists them; {start_fresh}")
    pointer = checkpoint_dir / ckpt.LATEST
    if pointer.exists():  # a run saved here, and its checkpoints are gone
        raise NoIntactCheckpoint(f"{pointer} names {pointer.read_text().strip()}, but {checkpoint_dir} holds no "
                                 f"sealed checkpoint; {start_fresh}")
    return None


def check_output_dir(recipe: Recipe, manifest: Manifest, world_size: int) -> tuple[Path, dict] | None:
    """The checkpoint in ``recipe.output_dir`` that the run will resume (:func:`intact_checkpoint`)
    and its progress record (None for a fresh run), or :class:`ResumeMismatch`, also when
    ``world_size`` ranks cannot keep its global batch. For the launchers, before anything starts,
    and for the trainer (:func:`check_output_dir_on_rank_0`), before any state is built."""
    checkpoint_dir = Path(recipe.output_dir) / "checkpoints"
    tag = intact_checkpoint(checkpoint_dir)
    if tag is None:
        return None
    progress = ckpt.read_json(checkpoint_dir / tag / "progress.json")
    check(progress, identity(recipe, manifest), checkpoint_dir / tag)
    layout(recipe, world_size, {**progress, "checkpoint": checkpoint_dir / tag})
    return checkpoint_dir / tag, progress


def check_output_dir_on_rank_0(recipe: Recipe, manifest: Manifest, world_size: int,
                               rank: int) -> tuple[Path, dict] | None:
    """:func:`check_output_dir` for the trainer's ranks: rank 0 verifies the checkpoints (one read of
    them, not one per rank) and every rank gets its answer, or its refusal: all resume the same one."""
    import torch.distributed as dist

    answer: list = [None]
    if rank == 0:
        try:
            answer[0] = check_output_dir(recipe, manifest, world_size)
        except ResumeMismatch as e:
            answer[0] = e
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], ResumeMismatch):
        raise answer[0]
    return answer[0]


def recipe_changes(old_text: str, new_text: str) -> list[str]:
    """The recipe keys whose values differ between two resolved recipes."""
    old, new = flatten(yaml.safe_load(old_text)), flatten(yaml.safe_load(new_text))
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
