"""Recipes: one YAML file per training run, validated before anything expensive starts.

    python -m fatscale.config RECIPE [--set train.epochs=2 ...]   # prints the resolved recipe

Sections (every key optional except where a default cannot exist: ``model.name``, ``data.shards``
and ``train.epochs``): ``model``, ``data``, ``aug``, ``train``, ``optim``, ``ema``,
``checkpoint``, ``tracking``, ``slurm``, and top-level ``output_dir``, ``seed``. The schema is the
dataclasses below (``data`` and ``aug`` are the loader's own ``DataConfig``/``AugConfig``).
Unknown keys, wrong types and out-of-range values fail with one line naming the file and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import fatscale  # noqa: F401  (registers the FAT models with timm)
import timm

from fatscale.data.loader import DECODE_DEVICES, AugConfig, DataConfig, train_steps_per_epoch
from fatscale.data.manifest import Manifest, ManifestError, load_manifest
from fatscale.data.rand_augment import WARP_INTERPS, RandAugmentSpec


class RecipeError(ValueError):
    """A recipe or override that cannot be used (one-line message naming file and key)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_classes: int | None = None  # None: the number of classes in the shards' manifest
    drop_path: float | None = None  # None: the variant's default (.05/.1/.1/.15 for B0..B3)
    bidirectional: bool = False
    grad_checkpointing: tuple[int, ...] = ()  # stages to recompute in backward
    compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_per_device: int = 128
    val_batch_per_device: int = 256
    grad_accum: int = 1
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2] = 0
    grad_clip: float = 5.0  # 0: off
    sync_bn: bool = True  # SyncBatchNorm when the world size is above 1
    log_every: int = 50  # steps
    eval_every: int = 1  # epochs
    deterministic: bool = False  # torch deterministic algorithms (bitwise-reproducible on CPU)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs, tests)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4  # for a global batch of lr_base_batch; scaled linearly
    lr_base_batch: int = 512
    weight_decay: float = 0.05  # none on norms, biases and other 1-D parameters
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 20
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9998
    warmup: bool = False  # timm ModelEmaV3's decay warmup


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = None
    every_minutes: float | None = 30.0
    keep_last: int = 2
    keep_best: bool = True


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in output_dir
    experiment: str = "fatscale"
    run_name: str | None = None  # None: the recipe file's stem
    system_metrics: bool = True


@dataclass(frozen=True)
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # None: gpus_per_node (one task per GPU); CPU nodes: set it
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "2-00:00:00"
    cpus_per_task: int = 10
    mem: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    max_requeues: int = 20


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    output_dir: str = "outputs/run"
    seed: int = 0


# Ranges checked after types: (key, test, what it must be).
_RANGES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("model.name", lambda v: timm.is_model(v), "a timm model (fat_b0 .. fat_b3)"),
    ("model.num_classes", lambda v: v is None or v > 0, "positive"),
    ("model.drop_path", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("model.grad_checkpointing", lambda v: all(0 <= s <= 3 for s in v), "stage indices 0..3"),
    ("data.img_size", lambda v: v >= 32, "at least 32"),
    ("data.crop_pct", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("data.num_threads", lambda v: v >= 1, "at least 1"),
    ("data.decode_device", lambda v: v in DECODE_DEVICES, "auto, mixed or cpu"),
    ("data.shuffle_buffer", lambda v: v >= 1, "at least 1"),
    ("data.prefetch", lambda v: v >= 1, "at least 1"),
    ("aug.scale", lambda v: 0 < v[0] <= v[1] <= 1, "0 < min <= max <= 1"),
    ("aug.ratio", lambda v: 0 < v[0] <= v[1], "0 < min <= max"),
    ("aug.hflip", lambda v: 0 <= v <= 1, "a probability"),
    ("aug.rand_augment_interp", lambda v: v == "auto" or v in WARP_INTERPS, "auto, nearest or linear"),
    ("aug.color_jitter", lambda v: v >= 0, "non-negative"),
    ("aug.reprob", lambda v: 0 <= v <= 1, "a probability"),
    ("aug.mixup", lambda v: v >= 0, "non-negative"),
    ("aug.cutmix", lambda v: v >= 0, "non-negative"),
    ("aug.mixup_prob", lambda v: 0 <= v <= 1, "a probability"),
    ("aug.mixup_switch_prob", lambda v: 0 <= v <= 1, "a probability"),
    ("aug.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.epochs", lambda v: v >= 1, "at least 1"),
    ("train.batch_per_device", lambda v: v >= 1, "at least 1"),
    ("train.val_batch_per_device", lambda v: v >= 1, "at least 1"),
    ("train.grad_accum", lambda v: v >= 1, "at least 1"),
    ("train.grad_clip", lambda v: v >= 0, "non-negative"),
    ("train.log_every", lambda v: v >= 1, "at least 1"),
    ("train.eval_every", lambda v: v >= 1, "at least 1"),
    ("train.max_steps", lambda v: v is None or v >= 1, "at least 1"),
    ("optim.lr", lambda v: v > 0, "positive"),
    ("optim.lr_base_batch", lambda v: v >= 1, "at least 1"),
    ("optim.weight_decay", lambda v: v >= 0, "non-negative"),
    ("optim.betas", lambda v: all(0 <= b < 1 for b in v), "in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "positive"),
    ("optim.warmup_epochs", lambda v: v >= 0, "non-negative"),
    ("optim.warmup_lr", lambda v: v >= 0, "non-negative"),
    ("optim.min_lr", lambda v: v >= 0, "non-negative"),
    ("ema.decay", lambda v: 0 < v < 1, "in (0, 1)"),
    ("checkpoint.every_steps", lambda v: v is None or v >= 1, "at least 1"),
    ("checkpoint.every_minutes", lambda v: v is None or v > 0, "positive"),
    ("checkpoint.keep_last", lambda v: v >= 1, "at least 1"),
    ("slurm.nodes", lambda v: v >= 1, "at least 1"),
    ("slurm.gpus_per_node", lambda v: v >= 0, "non-negative"),
    ("slurm.tasks_per_node", lambda v: v is None or v >= 1, "at least 1"),
    ("slurm.cpus_per_task", lambda v: v >= 1, "at least 1"),
    ("slurm.time", lambda v: slurm_minutes(v) is not None, "a Slurm time limit (minutes, HH:MM:SS, D-HH:MM:SS, ...)"),
    ("slurm.mem", lambda v: v is None or re.fullmatch(r"\d+[KMGT]?", v) is not None, "a Slurm memory size (e.g. 400G)"),
    ("slurm.max_requeues", lambda v: v >= 0, "non-negative"),
]


def slurm_minutes(limit: str) -> int | None:
    """A Slurm time limit ("M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S") in whole minutes
    (rounded up), or None when it is not one."""
    match = re.fullmatch(r"(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?)|(?:(\d+)(?::(\d+)(?::(\d+))?)?)", limit.strip())
    if match is None:
        return None
    days, d_hours, d_minutes, d_seconds, first, second, third = match.groups()
    if days is not None:
        seconds = ((int(days) * 24 + int(d_hours)) * 60 + int(d_minutes or 0)) * 60 + int(d_seconds or 0)
    elif third is not None:  # H:M:S
        seconds = (int(first) * 60 + int(second)) * 60 + int(third)
    else:  # M or M:S
        seconds = int(first) * 60 + int(second or 0)
    return -(-seconds // 60) or None  # 0 means "no limit" to Slurm: a recipe names one


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (dataclass, Optional, Literal, tuple, scalar), or RecipeError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except RecipeError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(isinstance(a, bool) for a in typing.get_args(tp)):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise RecipeError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"recipe schema: unsupported type {tp} at {where}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise RecipeError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _convert({}, hints[name], key)
            else:
                raise RecipeError(f"{key}: required")
    return cls(**kwargs)


def _get(recipe: Recipe, key: str) -> Any:
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def resolve(raw: dict, source: str, overrides: list[str] = ()) -> Recipe:
    """Recipe from a mapping plus ``key=value`` overrides (YAML values), fully validated."""
    raw = dict(raw)
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"{source}: --set {text}: {part} is not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[path[-1]] = value
    try:
        recipe = _build(Recipe, raw, "")
        for key, ok, what in _RANGES:
            value = _get(recipe, key)
            if not ok(value):
                raise RecipeError(f"{key}: must be {what}, got {value!r}")
        if recipe.aug.rand_augment:
            try:
                RandAugmentSpec(recipe.aug.rand_augment)
            except ValueError as e:
                raise RecipeError(f"aug.rand_augment: {e}") from None
        if recipe.slurm.gpus_per_node == 0 and recipe.slurm.tasks_per_node is None:
            raise RecipeError("slurm.tasks_per_node: required when slurm.gpus_per_node is 0 (CPU nodes: ranks per node)")
        if (recipe.aug.mixup > 0 or recipe.aug.cutmix > 0) and recipe.train.batch_per_device % 2:
            raise RecipeError(f"train.batch_per_device: Mixup/CutMix needs an even batch, got {recipe.train.batch_per_device}")
        t = recipe.train
        if t.precision == "fp16" and t.zero_stage > 0 and t.grad_clip > 0:
            # DeepSpeed's ZeRO optimizers clip the GradScaler-scaled gradients (their own loss scale
            # is 1 with fp32 parameters), so every update would shrink by the scale (65536).
            raise RecipeError(f"train.precision: fp16 with train.zero_stage {t.zero_stage} clips gradients before they "
                              f"are unscaled (train.grad_clip {t.grad_clip}): use bf16, zero_stage 0 or grad_clip 0")
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = (), check_shards: bool = True) -> Recipe:
    """Read, override and validate a recipe; with ``check_shards`` also its shard manifest."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    recipe = resolve(raw, str(path), overrides)
    if recipe.tracking.run_name is None:
        recipe = dataclasses.replace(recipe, tracking=dataclasses.replace(recipe.tracking, run_name=path.stem))
    if check_shards:
        check_data(recipe, str(path))
    return recipe


def check_data(recipe: Recipe, source: str) -> None:
    """The shard directory exists and holds a valid manifest with train and val splits."""
    shards = Path(recipe.data.shards)
    if not shards.is_dir():
        raise RecipeError(f"{source}: data.shards: no such directory {str(shards)!r}")
    try:
        manifest = load_manifest(shards)
    except ManifestError as e:
        raise RecipeError(f"{source}: data.shards: {e}") from None
    for split in ("train", "val"):
        if split not in manifest.splits:
            raise RecipeError(f"{source}: data.shards: {shards} has no {split} split")
    num_classes = recipe.model.num_classes
    if num_classes is not None and num_classes < manifest.num_classes:
        raise RecipeError(f"{source}: model.num_classes: {num_classes} is fewer than the {manifest.num_classes} "
                          f"classes of data.shards {shards} (labels up to {manifest.num_classes - 1})")


def check_world(recipe: Recipe, manifest: Manifest, world_size: int, source: str) -> None:
    """The recipe trains at least one step per epoch on ``world_size`` ranks (for launchers, which
    know the world size; the trainer checks it again)."""
    t = recipe.train
    train_samples = manifest.splits["train"].num_samples
    if train_steps_per_epoch(train_samples, world_size, t.batch_per_device) // t.grad_accum == 0:
        raise RecipeError(
            f"{source}: train.batch_per_device: {t.batch_per_device} x train.grad_accum {t.grad_accum} on each of "
            f"{world_size} ranks needs at least {t.batch_per_device * t.grad_accum * world_size} train samples per "
            f"epoch, data.shards has {train_samples} ({train_samples // world_size} per rank): zero steps per epoch")


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3} (for MLflow params)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dump(recipe: Recipe) -> str:
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return yaml.safe_dump(plain(to_dict(recipe)), sort_keys=False)


def add_recipe_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """RECIPE and ``--set key=value`` (repeatable), as every command that takes a recipe has them."""
    parser.add_argument("recipe", nargs=None if required else "?")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key with a YAML value, e.g. --set train.epochs=2")


def load_recipe_or_exit(path: str | Path, overrides: list[str], check_shards: bool = True) -> Recipe:
    """load_recipe for commands: a bad recipe ends the program with its one-line error."""
    try:
        return load_recipe(path, overrides, check_shards)
    except RecipeError as e:
        sys.exit(f"error: {e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a recipe, resolved and validated.")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    sys.stdout.write(dump(load_recipe_or_exit(args.recipe, args.overrides)))


if __name__ == "__main__":
    main()
