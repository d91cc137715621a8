"""What a timm RandAugment string (``rand-m9-mstd0.5-inc1`` and the other ``rand-*``) asks for,
parsed as ``timm.data.auto_augment.rand_augment_transform`` parses it, without importing timm,
torch or DALI: the recipe check (fatscale.config) uses it, ``fatscale.data.rand_augment`` runs it
on DALI. tests/test_loader.py checks the parse against timm's own on every kind of section.

Sections after ``rand`` (any order; as in timm, the first ``t``, ``mstd`` and ``mmax`` count, the
last of the others): ``m`` magnitude (int, default 10), ``n`` layers (int, 2), ``p`` probability
per layer (0.5), ``mstd`` magnitude std (above 100: uniform in [0, m]), ``mmax`` magnitude bound
(int, 10), ``inc`` 0/1 (the "Increasing" op set), ``t<name>`` op set (``3a``; the weighted sets
``weights`` and ``3aw`` are refused, as is any op DALI has no equivalent for).
"""

from __future__ import annotations

import re

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes are in tenths of the op's full range
WARP_INTERP_NAMES = ("nearest", "linear")  # aug.rand_augment_interp, besides auto (rand_augment.WARP_INTERPS)

# timm's op sets (timm.data.auto_augment: _RAND_TRANSFORMS, _RAND_INCREASING_TRANSFORMS, _RAND_3A,
# and the names of the weighted sets _RAND_WEIGHTED_0 / _RAND_WEIGHTED_3A).
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
RAND_3A = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
WEIGHTED_SETS = ("weights", "3aw")

# The ops fatscale.data.rand_augment maps onto DALI (its _TIMM_TO_DALI has exactly these keys).
DALI_OPS = frozenset(RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS)

_SECTION = re.compile(r"t\w+|(mstd|mmax|inc|m|n|p)\d+(\.\d+)?")
_NUMBER = re.compile(r"(\d.*)")


class RandAugmentSpec:
    """What a timm ``rand-*`` string asks for, checked against what DALI can run (ValueError)."""

    def __init__(self, config: str):
        # timm skips sections it cannot parse; a typo must not silently change the recipe.
        sections = config.split("-")
        bad = [c for c in sections[1:] if not _SECTION.fullmatch(c)]
        if sections[0] != "rand" or bad:
            raise ValueError(f"invalid RandAugment string {config!r}: expected rand-<section>-..., bad sections {bad}")
        try:
            parsed = _parse(sections[1:])
        except ValueError as e:  # int("9.5") and the like, worded as timm's failure was
            raise ValueError(f"invalid RandAugment string {config!r}: {type(e).__name__} {e}") from None
        transforms, self.num_layers, self.prob, magnitude, magnitude_std, magnitude_max, increasing = parsed
        if transforms in WEIGHTED_SETS:
            raise ValueError(f"RandAugment {config!r}: weighted op choice ('w' option) is not supported")
        self.config = config
        if transforms == "3a":
            self.op_names = list(RAND_3A)
        else:
            self.op_names = list(RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS)
        unknown = [name for name in self.op_names if name not in DALI_OPS]
        if unknown:
            raise ValueError(f"RandAugment {config!r}: no DALI equivalent for timm ops {unknown}")
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.magnitude_max = float(magnitude_max or LEVEL_DENOM)
        if self.magnitude_max > LEVEL_DENOM:
            raise ValueError(f"RandAugment {config!r}: magnitude max above {LEVEL_DENOM} has no DALI range")


def _parse(sections: list[str]) -> tuple:
    """(op set name or None, layers, prob, magnitude, magnitude std, magnitude max or None,
    increasing) from sections that match ``_SECTION``, with timm's defaults and precedence."""
    transforms = None
    num_layers, prob, magnitude, increasing = 2, 0.5, LEVEL_DENOM, False
    magnitude_std, magnitude_max = None, None  # timm: hparams.setdefault, the first one counts
    for section in sections:
        if section.startswith("t"):
            transforms = section[1:] if transforms is None else transforms
            continue
        key, value = _NUMBER.split(section)[:2]
        if key == "mstd":
            std = float(value)
            magnitude_std = (float("inf") if std > 100 else std) if magnitude_std is None else magnitude_std
        elif key == "mmax":
            bound = int(value)
            magnitude_max = bound if magnitude_max is None else magnitude_max
        elif key == "inc":
            increasing = bool(int(value))
        elif key == "m":
            magnitude = int(value)
        elif key == "n":
            num_layers = int(value)
        else:  # p
            prob = float(value)
    return transforms, num_layers, prob, magnitude, magnitude_std or 0, magnitude_max, increasing
