"""The recipe's ``data`` and ``aug`` sections (with ``data.resolution``): where the shards are, how
the loaders run and augment. Each key's check sits beside it (fatscale.schema); how many steps an
epoch has is the sample order's rule (fatscale.data.sample_order.steps_per_epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from fatscale.data.rand_augment_spec import WARP_INTERP_NAMES, RandAugmentSpec
from fatscale.schema import BELOW_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, SchemaError, Section, at_least, must, setting


def _rand_augment(config: str) -> str | None:
    if not config:  # "" is off, as null is
        return None
    try:
        RandAugmentSpec(config)
    except ValueError as e:
        return str(e)
    return None


DECODE_DEVICES = ("auto", "mixed", "cpu")
MIN_IMG_SIZE = 32  # FAT's smallest input (every conv pads k//2; stride-2 ones round odd sizes up)


@dataclass(frozen=True)
class ResolutionConfig(Section):
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
                raise SchemaError(f"{name}: must be a multiple of data.resolution.step ({self.step}), "
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
class DataConfig(Section):
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
            raise SchemaError(f"eval_sizes: {self.img_size} is data.img_size, evaluated already: list only the "
                              f"other sizes, got {list(self.eval_sizes)!r}")

    def train_size(self, epoch: int) -> int:
        """The train crop size of ``epoch`` (0-based): ``resolution``'s, else ``img_size``."""
        return self.img_size if self.resolution is None else self.resolution.train_size(epoch)

    @property
    def val_sizes(self) -> tuple[int, ...]:
        """The sizes to evaluate at: ``img_size`` first, then ``eval_sizes``."""
        return (self.img_size, *self.eval_sizes)


@dataclass(frozen=True)
class AugConfig(Section):
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
