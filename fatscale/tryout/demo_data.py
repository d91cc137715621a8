"""The built-in demo data set: small JPEG photos of textures, a task a FAT learns in minutes on a CPU.

    python -m fatscale.tryout.demo_data DIR [--per-class 100] [--val-per-class 25] [--size 72]

Writes an ImageFolder tree ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``. Eight
classes of texture: horizontal, vertical and diagonal stripes, checks, dots, concentric rings,
irregular blobs, and plain (a soft gradient), each in two random colours at a random scale, phase
and (within the class) angle, under sensor noise. Neither a pixel nor the mean colour gives the
class away, but every crop of an image shows its texture, so a small net learns the set in a few
hundred steps. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["horizontal", "vertical", "diagonal", "checks", "dots", "rings", "blobs", "plain"]
SUPERSAMPLE = 3  # drawn at 3x and downscaled: smooth edges, like a photo's
TILT = math.radians(12)  # how far stripes and checks lean off their class's direction


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours, apart in brightness so that the texture stays visible in grey too."""
    hue = rng.uniform(0, 1)
    dark = colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 1.0), rng.uniform(0.1, 0.45))
    light = colorsys.hsv_to_rgb((hue + rng.uniform(0.2, 0.8)) % 1, rng.uniform(0.2, 1.0), rng.uniform(0.7, 1.0))
    pair = [np.array(dark) * 255, np.array(light) * 255]
    rng.shuffle(pair)
    return pair[0], pair[1]


def _mask(label: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """How much of the second colour goes where (n x n, 0..1) for a texture of class ``label``."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) / n  # image coordinates in [0, 1)
    name = CLASSES[label]
    direction = {"horizontal": math.pi / 2, "vertical": 0.0, "diagonal": rng.choice([0.25, 0.75]) * math.pi,
                 "checks": 0.0}.get(name, rng.uniform(0, math.pi))
    angle = direction + rng.uniform(-TILT, TILT)
    u = x * math.cos(angle) + y * math.sin(angle)  # across the stripes
    v = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(0.1, 0.2)  # of the image side
    phase_u, phase_v = rng.uniform(0, 1, size=2)
    if name in ("horizontal", "vertical", "diagonal"):
        return np.sin(2 * math.pi * (u / period + phase_u)) > 0
    if name == "checks":
        return np.sin(2 * math.pi * (u / period + phase_u)) * np.sin(2 * math.pi * (v / period + phase_v)) > 0
    if name == "dots":
        radius = rng.uniform(0.22, 0.32)
        return ((u / period + phase_u) % 1 - 0.5) ** 2 + ((v / period + phase_v) % 1 - 0.5) ** 2 < radius ** 2
    if name == "rings":
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        return np.sin(2 * math.pi * (np.hypot(x - cx, y - cy) / period + phase_u)) > 0
    if name == "blobs":  # smooth random noise cut at its median: irregular patches, no period
        coarse = rng.normal(size=(6, 6)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse).resize((n, n), Image.BICUBIC))
        return field > np.median(field)
    return np.clip(u * rng.uniform(0, 1), 0, 1)  # plain: a soft gradient, no edges at all


def draw(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    n = size * SUPERSAMPLE
    first, second = _colours(rng)
    mix = _mask(label, n, rng)[..., None]
    pixels = (first + mix * (second - first)).astype(np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.LANCZOS)
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, rng.uniform(4, 16), size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_demo_images(root: str | Path, per_class: int = 100, val_per_class: int = 25, size: int = 72,
                     seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(label, size, rng).save(folder / f"{name}_{i:05d}.JPEG", quality=90)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=25)
    parser.add_argument("--size", type=int, default=72)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_demo_images(args.out, args.per_class, args.val_per_class, args.size, args.seed)


if __name__ == "__main__":
    main()
