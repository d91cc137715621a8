"""Recipes: one YAML file per training run, validated before anything expensive starts.

    python -m fatscale.config RECIPE [--set train.epochs=2 ...]   # prints the resolved recipe

Sections (every key optional except where a default cannot exist: ``model.name``, ``data.shards``
and ``train.epochs``): ``model``, ``data``, ``aug``, ``train``, ``optim``, ``ema``,
``checkpoint``, ``tracking``, ``slurm``, and top-level ``output_dir``, ``seed``; ``data.resolution``
is a section within ``data`` (``--set data.resolution.start=128``). Each section is a dataclass
of fatscale.schema ``setting``s (default and check side by side) and sits beside the component it
configures where that component has a home of its own (``data``/``aug``: fatscale.data.config);
this module assembles them into the ``Recipe`` and reads files. Unknown keys, wrong types and
out-of-range values fail with one line naming the file and key; the checks that read the disk
(shards, weights, world sizes) are fatscale.preflight's.

Importing this module imports neither torch, timm nor DALI: a ``model.name`` that is not one of
fatscale's own variants (fatscale.variants) is looked up in timm, which only then is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from fatscale.data.config import AugConfig, DataConfig
from fatscale.preflight import check_data, check_init_from
from fatscale.schema import (BELOW_ONE, NON_NEGATIVE, POSITIVE, SchemaError, Section, at_least, build, must,
                             setting)
from fatscale.variants import VARIANTS


# A recipe's problems are the schema's: one class, so a section made by hand raises what a file does.
RecipeError = SchemaError


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


STAGES = 4  # of every FAT variant


@dataclass(frozen=True)
class ModelConfig(Section):
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


@dataclass(frozen=True)
class TrainConfig(Section):
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
class OptimConfig(Section):
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
class EmaConfig(Section):
    enabled: bool = True
    decay: float = setting(0.9998, must(lambda v: 0 < v < 1, "in (0, 1)"))
    warmup: bool = False  # timm ModelEmaV3's decay warmup


@dataclass(frozen=True)
class CheckpointConfig(Section):
    every_steps: int | None = setting(None, at_least(1))
    every_minutes: float | None = setting(30.0, POSITIVE)
    keep_last: int = setting(2, at_least(1))
    keep_best: bool = True


@dataclass(frozen=True)
class TrackingConfig(Section):
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
class SlurmConfig(Section):
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
class Recipe(Section):
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
        return build(Recipe, raw)  # every section checks itself as it is made
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
        check_init_from(recipe, str(path))
    return recipe


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
