"""timm's RandAugment (``rand-m9-mstd0.5-inc1`` and the other ``rand-*`` strings) on DALI.

``fatscale.data.rand_augment_spec`` parses the string as timm does
(``timm.data.auto_augment.rand_augment_transform``): number of layers, the op set, per-op
probability, magnitude and magnitude std. DALI's ``auto_aug`` operations run it, on the GPU when the images are there. Mapping, per image and layer, as timm does per call:

  * op: uniform over timm's set (``inc1`` picks the "Increasing" variants, whose strength grows
    with the magnitude: DALI's monotonic ranges), applied with the op's probability (0.5): a coin
    per image and layer, then the choice among the ops;
  * magnitude: ``clip(N(m, mstd), 0, 10)`` in timm's level units, sampled per op application,
    quantised to 1/10 level (101 DALI magnitude bins; bin = level * 10);
  * ranges in timm units mapped onto DALI's ops: rotate 30 deg, shear 0.3, translate 0.45 of the
    image side, enhance factors 1 +- 0.9 * level / 10 (random sign) for ``*Increasing`` and
    0.1 + 1.8 * level / 10 otherwise, posterize 4 -> 0 kept bits (DALI keeps at least 1),
    solarize threshold 256 -> 0, solarize-add 0 -> 110.
Remaining differences: DALI's geometric ops fill with one grey level, 128 (timm: the ImageNet
mean colour, 124/116/104) and interpolate bilinearly or with the nearest neighbour (timm: the
train interpolation, bicubic; see ``warp_interp``); equalize follows OpenCV's formula (PIL's
differs slightly).
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as a
from nvidia.dali.auto_aug.core import select, signed_bin
from nvidia.dali.data_node import DataNode

from fatscale.data.rand_augment_spec import DALI_OPS, WARP_INTERP_NAMES, RandAugmentSpec

__all__ = ["NUM_BINS", "WARP_INTERPS", "RandAugmentSpec", "rand_augment", "warp_interp"]

NUM_BINS = 101  # magnitude resolution: 1/10 of a timm level
_INTERP_TYPES = {"nearest": types.INTERP_NN, "linear": types.INTERP_LINEAR}
WARP_INTERPS = {name: _INTERP_TYPES[name] for name in WARP_INTERP_NAMES}

_TIMM_TO_DALI = {
    "AutoContrast": a.auto_contrast,
    "Equalize": a.equalize,
    "Invert": a.invert,
    "Rotate": a.rotate.augmentation((0, 30), True),
    "Posterize": a.posterize.augmentation((0, 4), False, a.poster_mask_uint8),
    "PosterizeIncreasing": a.posterize.augmentation((4, 0), False, a.poster_mask_uint8),
    "Solarize": a.solarize.augmentation((0, 256), False, None),
    "SolarizeIncreasing": a.solarize.augmentation((256, 0), False, None),
    "SolarizeAdd": a.solarize_add,
    "Color": a.color.augmentation((0.1, 1.9), False, None),
    "ColorIncreasing": a.color,
    "Contrast": a.contrast.augmentation((0.1, 1.9), False, None),
    "ContrastIncreasing": a.contrast,
    "Brightness": a.brightness.augmentation((0.1, 1.9), False, None),
    "BrightnessIncreasing": a.brightness,
    "Sharpness": a.sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted),
    "SharpnessIncreasing": a.sharpness,
    "ShearX": a.shear_x,
    "ShearY": a.shear_y,
    "TranslateXRel": a.translate_x.augmentation((0, 0.45), True),
    "TranslateYRel": a.translate_y.augmentation((0, 0.45), True),
}


if set(_TIMM_TO_DALI) != DALI_OPS:  # the spec accepts what this table runs, no more, no less
    raise ImportError(f"rand_augment_spec.DALI_OPS and _TIMM_TO_DALI differ: {sorted(DALI_OPS ^ set(_TIMM_TO_DALI))}")


def warp_interp(setting: str, device: str) -> types.DALIInterpType:
    """The interpolation of the geometric ops (rotate, shear, translate) for ``aug.rand_augment_interp``
    on images on ``device``. ``auto``: bilinear on the GPU, nearest-neighbour on CPU operators, where
    DALI's bilinear warp costs ~10x its nearest one (BENCHMARKS.md). Nearest is also what the
    reference RandAugment (TensorFlow, tensorflow/tpu ``autoaugment.py``) warps with."""
    if setting == "auto":
        return types.INTERP_NN if device == "cpu" else types.INTERP_LINEAR
    return WARP_INTERPS[setting]


def rand_augment(images: DataNode, spec: RandAugmentSpec, shape: DataNode | tuple[int, int],
                 interp: str) -> DataNode:
    """Apply ``spec`` to a batch of uint8 HWC images (needs ``enable_conditionals=True``);
    ``interp``: an ``aug.rand_augment_interp`` setting (``warp_interp``)."""
    interp_type = warp_interp(interp, images.device)
    ops = [_TIMM_TO_DALI[name] for name in spec.op_names]
    for _ in range(spec.num_layers):
        # As timm: a uniform op choice, applied with the op's probability. Samples that skip the
        # op leave at this one split instead of walking select's tree of ops.
        op_idx = fn.random.choice(len(ops))
        apply = fn.random.coin_flip(probability=spec.prob, dtype=types.BOOL)
        if spec.magnitude_std == 0:
            magnitude_bin = round(min(spec.magnitude, spec.magnitude_max) * 10)
        else:
            if spec.magnitude_std == float("inf"):
                level = fn.random.uniform(range=[0.0, spec.magnitude])
            else:
                level = fn.random.normal(mean=spec.magnitude, stddev=spec.magnitude_std)
            # DALI's float -> int cast rounds to nearest.
            magnitude_bin = fn.cast(dmath.clamp(level, 0.0, spec.magnitude_max) * 10.0, dtype=types.INT32)
        if apply:
            images = select(
                ops,
                op_idx,
                data=images,
                magnitude_bin=signed_bin(magnitude_bin),
                num_magnitude_bins=NUM_BINS,
                shape=shape,
                fill_value=128,
                interp_type=interp_type,
            )
    return images
