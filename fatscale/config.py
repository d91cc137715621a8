"""Recipes: one YAML file per training run, validated before anything expensive starts.

    python -m fatscale.config RECIPE [--set train.epochs=2 ...]   # prints the resolved recipe

Sections (every key optional except where a default cannot exist: ``model.name``, ``data.shards``
and ``train.epochs``): ``model``, ``data``, ``aug``, ``train``, ``optim``, ``ema``,
``checkpoint``, ``tracking``, ``slurm``, and top-level ``output_dir``, ``seed``; ``data.resolution``
is a section within ``data`` (``--set data.resolution.start=128``). The schema is the
dataclasses below: each key is a ``setting`` with its default and the check its value must pass,
side by side; a section's checks across keys are its ``_check_together``. Every section checks
itself when it is made, so a ``DataConfig`` or ``AugConfig`` in hand is a valid one. Unknown keys,
wrong types and out-of-range values fail with one line naming the file and key.

Importing this module imports neither torch, timm nor DALI: a ``model.name`` that is not one of
fatscale's own variants (fatscale.variants) is looked up in timm, which only then is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from fatscale.data.manifest import Manifest, ManifestError, load_manifest
from fatscale.data.rand_augment_spec import WARP_INTERP_NAMES, RandAugmentSpec
from fatscale.variants import VARIANTS


class RecipeError(ValueError):
    """A recipe or override that cannot be used (one-line message naming file and key)."""


# A check: what is wrong with a value (the message after "key: "), or None when it is fine.
Check = Callable[[Any], "str | None"]


def must(test: Callable[[Any], bool], what: str) -> Check:
    return lambda value: None if test(value) else f"must be {what}, got {value!r}"


def at_least(low: int) -> Check:
    return must(lambda v: v >= low, f"at least {low}")


POSITIVE = must(lambda v: v > 0, "positive")
NON_NEGATIVE = must(lambda v: v >= 0, "non-negative")
PROBABILITY = must(lambda v: 0 <= v <= 1, "a probability")
BELOW_ONE = must(lambda v: 0 <= v < 1, "in [0, 1)")


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, *, factory: Any = dataclasses.MISSING):
    """A recipe key: its default (none given: required) and the check its value must pass once its
    type is right. None, where the type allows it, means "not set" and is not checked."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"check": check} if check else {})


class _Section:
    """A recipe section: checks each key against its ``setting`` check when made, then the
    section's ``_check_together``. Messages name the key within the section; ``_build`` adds the
    section's path."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and value is not None:
                problem = check(value)
                if problem:
                    raise RecipeError(f"{f.name}: {problem}")
        self._check_together()

    def _check_together(self) -> None:
        """Checks across the section's keys (RecipeError)."""


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


def _model_name(name: str) -> str | None:
    if name in VARIANTS:
        return None
    import timm  # only for a name that is not fatscale's: seconds to import (fatscale's models register with it)

    return None if timm.is_model(name) else f"must be a timm model ({VARIANTS[0]} .. {VARIANTS[-1]}), got {name!r}"


def _rand_augment(config: str) -> str | None:
    if not config:  # "" is off, as null is
        return None
    try:
        RandAugmentSpec(config)
    except ValueError as e:
        return str(e)
    return None


DECODE_DEVICES = ("auto", "mixed", "cpu")
STAGES = 4  # of every FAT variant


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = setting(check=_model_name)
    num_classes: int | None = setting(None, POSITIVE)  # None: the number of classes in the shards' manifest
    drop_path: float | None = setting(None, BELOW_ONE)  # None: the variant's (fatscale.variants: .05/.1/.1/.15)
    bidirectional: bool = False
    # GroupNorm(1, C) that keeps channels_last (CUDA's group_norm makes its input NCHW); false:
    # timm's GroupNorm1. The same weights and function either way.
    norm_keeps_format: bool = True
    # Fine-tuning: start a fresh run from these weights (fatscale.weights: a run's output directory,
    # a checkpoint, an exported timm folder, a weights file, models:/NAME/VERSION); a resumed run
    # continues from its own checkpoint.
    init_from: str | None = None
    init_from_ema: bool = False  # the source's EMA weights (output and checkpoint directories)
    grad_checkpointing: tuple[int, ...] = setting(  # stages to recompute in backward
        (), must(lambda v: all(0 <= s < STAGES for s in v), f"stage indices 0..{STAGES - 1}"))
    compile: bool = False  # torch.compile through the DeepSpeed engine
    # torch.compile's backend: inductor generates kernels (minutes per graph on a small CPU);
    # aot_eager traces the same graphs without code generation (quick checks).
    compile_backend: str = setting("inductor", must(lambda v: v in ("inductor", "aot_eager", "eager"),
                                                    "inductor, aot_eager or eager"))


MIN_IMG_SIZE = 32  # FAT's smallest input (every conv pads k//2; stride-2 ones round odd sizes up)


@dataclass(frozen=True)
class ResolutionConfig(_Section):
    """Progressive resolution (the recipe's ``data.resolution``): the train crop size of each epoch.
    Epochs before ``ramp[0]`` train at ``start``, epochs from ``ramp[1]`` on at ``end``, the ones
    between at the linear ramp from one to the other rounded to the nearest multiple of ``step``
    (halves up); epochs count from 0, as ``TrainLoader.state.epoch`` does. ``ramp[0] == ramp[1]``
    is a switch from ``start`` to ``end`` at that epoch; ``end`` below ``start`` ramps down."""

    start: int = setting(check=at_least(MIN_IMG_SIZE))
    end: int = setting(check=at_least(MIN_IMG_SIZE))
    ramp: tuple[int, int] = setting(check=must(lambda v: 0 <= v[0] <= v[1], "[first, last] epochs, 0 <= first <= last"))
    step: int = setting(32, POSITIVE)

    def _check_together(self) -> None:
        for name in ("start", "end"):  # then every size of the ramp is a multiple of step in [start, end]
            if getattr(self, name) % self.step:
                raise RecipeError(f"{name}: must be a multiple of data.resolution.step ({self.step}), "
                                  f"got {getattr(self, name)}")

    def train_size(self, epoch: int) -> int:
        """The train crop size of ``epoch`` (0-based)."""
        first, last = self.ramp
        if epoch < first:
            return self.start
        if epoch >= last:
            return self.end
        size = Fraction(self.start) + Fraction((self.end - self.start) * (epoch - first), last - first)
        return math.floor(size / self.step + Fraction(1, 2)) * self.step


def _eval_sizes(sizes: tuple[int, ...]) -> str | None:
    if any(size < MIN_IMG_SIZE for size in sizes):
        return f"must be sizes of at least {MIN_IMG_SIZE}, got {list(sizes)!r}"
    if len(set(sizes)) < len(sizes):
        return f"must be distinct sizes, got {list(sizes)!r}"
    return None


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the shards are and how the loader runs (the recipe's ``data`` section)."""

    shards: str
    img_size: int = setting(224, at_least(MIN_IMG_SIZE))  # eval size; the train size too without resolution
    resolution: ResolutionConfig | None = None  # None: every epoch trains at img_size
    eval_sizes: tuple[int, ...] = setting((), _eval_sizes)  # more eval sizes, besides img_size (e.g. [256])
    crop_pct: float = setting(0.875, must(lambda v: 0 < v <= 1, "in (0, 1]"))
    num_threads: int = setting(4, at_least(1))
    decode_device: str = setting("auto", must(lambda v: v in DECODE_DEVICES, "auto, mixed or cpu"))
    # Python processes per rank that read train samples from the shards for DALI (fatscale.data.shard_samples)
    reader_workers: int = setting(1, at_least(1))
    prefetch: int = setting(2, at_least(1))
    channels_last: bool = True

    def _check_together(self) -> None:
        if self.img_size in self.eval_sizes:
            raise RecipeError(f"eval_sizes: {self.img_size} is data.img_size, evaluated already: list only the "
                              f"other sizes, got {list(self.eval_sizes)!r}")

    def train_size(self, epoch: int) -> int:
        """The train crop size of ``epoch`` (0-based): ``resolution``'s, else ``img_size``."""
        return self.img_size if self.resolution is None else self.resolution.train_size(epoch)

    @property
    def val_sizes(self) -> tuple[int, ...]:
        """The sizes to evaluate at: ``img_size`` first, then ``eval_sizes``."""
        return (self.img_size, *self.eval_sizes)


@dataclass(frozen=True)
class AugConfig(_Section):
    """Train-time augmentation (the recipe's ``aug`` section); FAT's official setup by default."""

    scale: tuple[float, float] = setting((0.08, 1.0), must(lambda v: 0 < v[0] <= v[1] <= 1, "0 < min <= max <= 1"))
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), must(lambda v: 0 < v[0] <= v[1], "0 < min <= max"))
    hflip: float = setting(0.5, PROBABILITY)
    rand_augment: str | None = setting("rand-m9-mstd0.5-inc1", _rand_augment)  # timm's rand-* strings
    rand_augment_interp: str = setting(  # its rotate/shear/translate: auto | nearest | linear
        "auto", must(lambda v: v == "auto" or v in WARP_INTERP_NAMES, "auto, nearest or linear"))
    color_jitter: float = setting(0.4, NON_NEGATIVE)  # as in timm: used only when rand_augment is off
    reprob: float = setting(0.25, PROBABILITY)
    mixup: float = setting(0.8, NON_NEGATIVE)
    cutmix: float = setting(1.0, NON_NEGATIVE)
    mixup_prob: float = setting(1.0, PROBABILITY)
    mixup_switch_prob: float = setting(0.5, PROBABILITY)
    label_smoothing: float = setting(0.1, BELOW_ONE)


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = setting(check=at_least(1))
    batch_per_device: int = setting(128, at_least(1))
    val_batch_per_device: int = setting(256, at_least(1))
    grad_accum: int = setting(1, at_least(1))
    # Samples per optimizer step, the same on any number of ranks (a Slurm node range sets it).
    # None: batch_per_device x grad_accum x the ranks of the first start. Set, each rank's
    # micro-batch (at most batch_per_device) and the accumulation follow from the number of ranks.
    global_batch: int | None = setting(None, at_least(1))
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2] = 0
    grad_clip: float = setting(5.0, NON_NEGATIVE)  # 0: off
    sync_bn: bool = True  # SyncBatchNorm when the world size is above 1
    log_every: int = setting(50, at_least(1))  # steps
    eval_every: int = setting(1, at_least(1))  # epochs
    deterministic: bool = False  # torch deterministic algorithms (bitwise-reproducible on CPU)
    max_steps: int | None = setting(None, at_least(1))  # stop after this many optimizer steps (smoke runs, tests)
    sample_log: bool = False  # each rank lists the samples of its steps in OUTPUT_DIR/samples/ (fatscale.data.ledger)
    # A rank that makes no progress this long ends the job, named (fatscale/train/watchdog.py);
    # long enough for a first torch.compile. None: off.
    stall_timeout_s: float | None = setting(900.0, at_least(10))

    def _check_together(self) -> None:
        if self.global_batch is not None and self.grad_accum != 1:
            raise RecipeError(f"grad_accum: {self.grad_accum} with train.global_batch {self.global_batch}: set one of "
                              "them (with a global batch, the accumulation follows from the number of ranks)")
        if self.precision == "fp16" and self.zero_stage > 0 and self.grad_clip > 0:
            # DeepSpeed's ZeRO optimizers clip the GradScaler-scaled gradients (their own loss scale
            # is 1 with fp32 parameters), so every update would shrink by the scale (65536).
            raise RecipeError(f"precision: fp16 with train.zero_stage {self.zero_stage} clips gradients before they "
                              f"are unscaled (train.grad_clip {self.grad_clip}): use bf16, zero_stage 0 or grad_clip 0")


@dataclass(frozen=True)
class OptimConfig(_Section):
    lr: float = setting(5e-4, POSITIVE)  # for a global batch of lr_base_batch; scaled linearly
    lr_base_batch: int = setting(512, at_least(1))
    weight_decay: float = setting(0.05, NON_NEGATIVE)  # none on norms, biases and other 1-D parameters
    betas: tuple[float, float] = setting((0.9, 0.999), must(lambda v: all(0 <= b < 1 for b in v), "in [0, 1)"))
    eps: float = setting(1e-8, POSITIVE)
    warmup_epochs: float = setting(20, NON_NEGATIVE)
    warmup_lr: float = setting(5e-7, NON_NEGATIVE)
    min_lr: float = setting(5e-6, NON_NEGATIVE)
    fused: bool = True  # torch's fused AdamW kernel on GPUs (one kernel for all parameters); CPUs: the plain one
    # Layer-wise LR decay (fine-tuning): a block d layers below the head trains at lr * layer_decay^d
    # (timm's param_groups_layer_decay over the model's group_matcher). None: off.
    layer_decay: float | None = setting(None, must(lambda v: 0 < v <= 1, "in (0, 1]"))


@dataclass(frozen=True)
class EmaConfig(_Section):
    enabled: bool = True
    decay: float = setting(0.9998, must(lambda v: 0 < v < 1, "in (0, 1)"))
    warmup: bool = False  # timm ModelEmaV3's decay warmup


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    every_steps: int | None = setting(None, at_least(1))
    every_minutes: float | None = setting(30.0, POSITIVE)
    keep_last: int = setting(2, at_least(1))
    keep_best: bool = True


@dataclass(frozen=True)
class TrackingConfig(_Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in output_dir
    experiment: str = "fatscale"
    run_name: str | None = None  # None: the recipe file's stem
    system_metrics: bool = True


def _node_range(nodes: int | str) -> tuple[int, int] | None:
    """``slurm.nodes`` as (fewest, most) nodes: N, or Slurm's range MIN-MAX; None when it is neither."""
    if isinstance(nodes, int):
        return (nodes, nodes) if nodes >= 1 else None
    match = re.fullmatch(r"(\d+)-(\d+)", nodes.strip())
    fewest, most = (int(match[1]), int(match[2])) if match else (0, 0)
    return (fewest, most) if 1 <= fewest <= most else None


@dataclass(frozen=True)
class SlurmConfig(_Section):
    # N, or MIN-MAX: Slurm starts the job on as many as it has (each start and requeue may differ)
    nodes: int | str = setting(1, must(lambda v: _node_range(v) is not None, "a node count or a range MIN-MAX (e.g. 2-4)"))
    gpus_per_node: int = setting(8, NON_NEGATIVE)
    tasks_per_node: int | None = setting(None, at_least(1))  # None: gpus_per_node (one task per GPU); CPU nodes: set it
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = setting("2-00:00:00", must(lambda v: slurm_minutes(v) is not None,
                                           "a Slurm time limit (minutes, HH:MM:SS, D-HH:MM:SS, ...)"))
    cpus_per_task: int = setting(10, at_least(1))
    mem: str | None = setting(None, must(lambda v: re.fullmatch(r"\d+[KMGT]?", v) is not None,
                                         "a Slurm memory size (e.g. 400G)"))
    constraint: str | None = None
    exclusive: bool = False
    gres: bool = False  # GPUs asked as --gres=gpu:N (clusters without select/cons_tres) instead of --gpus-per-node
    max_requeues: int = setting(20, NON_NEGATIVE)  # after preemptions and time limits
    max_failures: int = setting(3, NON_NEGATIVE)  # requeues after a stall or a crash, counted apart

    def _check_together(self) -> None:
        if self.gpus_per_node == 0 and self.tasks_per_node is None:
            raise RecipeError("tasks_per_node: required when slurm.gpus_per_node is 0 (CPU nodes: ranks per node)")

    @property
    def node_counts(self) -> range:
        """Every number of nodes the job may start on."""
        fewest, most = _node_range(self.nodes)
        return range(fewest, most + 1)


@dataclass(frozen=True)
class Recipe(_Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    aug: AugConfig = setting(factory=AugConfig)
    optim: OptimConfig = setting(factory=OptimConfig)
    ema: EmaConfig = setting(factory=EmaConfig)
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig)
    tracking: TrackingConfig = setting(factory=TrackingConfig)
    slurm: SlurmConfig = setting(factory=SlurmConfig)
    output_dir: str = "outputs/run"
    seed: int = 0

    def _check_together(self) -> None:
        if (self.aug.mixup > 0 or self.aug.cutmix > 0) and self.train.batch_per_device % 2:
            raise RecipeError(f"train.batch_per_device: Mixup/CutMix needs an even batch, got {self.train.batch_per_device}")
        resolution, epochs = self.data.resolution, self.train.epochs
        if resolution is not None and resolution.ramp[1] >= epochs:
            raise RecipeError(f"data.resolution.ramp: ends at epoch {resolution.ramp[1]}, not before train.epochs "
                              f"{epochs} (epochs 0..{epochs - 1}): data.resolution.end {resolution.end} is never reached")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT_NUMBER = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


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
        raise RecipeError(errors[0]) if len(errors) == 1 else RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
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
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
            return float(value)  # YAML 1.1 (PyYAML) reads 5e-4, without a dot, as a string
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
    try:
        return cls(**kwargs)
    except RecipeError as e:  # the section's own checks name the key within it
        raise RecipeError(f"{where}.{e}" if where else str(e)) from None


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
        return _build(Recipe, raw, "")  # every section checks itself as it is made
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] = (), check_shards: bool = True) -> Recipe:
    """Read, override and validate a recipe; with ``check_shards`` also its shard manifest and the
    weights it starts from (``model.init_from``), which must exist here."""
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
        source = recipe.model.init_from  # its contents are checked where it is loaded (fatscale.weights)
        if source and not (source.startswith("models:/") or Path(source).exists()):
            raise RecipeError(f"{path}: model.init_from: no such file or directory {source!r} (a run's output "
                              f"directory, a checkpoint, an exported timm folder, a weights file or models:/NAME/VERSION)")
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
    from fatscale.data.sample_order import BatchLayout, LayoutError

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
            raise RecipeError(f"{source}: train.global_batch: {e}") from None
    if train_samples < global_batch:
        raise RecipeError(f"{source}: {what} train samples per step, data.shards has {train_samples}: zero steps "
                          "per epoch")


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
