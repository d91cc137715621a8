"""The built-in demo data set: small JPEG photos of shapes, a task a FAT learns in minutes on a CPU.

    python -m fatscale.demo DIR [--per-class 100] [--val-per-class 25] [--size 72]

Writes an ImageFolder tree ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``. Eight
classes: four shapes (disc, square, triangle, cross) in warm or cool colours, at a random place,
size and angle, on a noisy textured background, so neither a single pixel nor the mean colour
gives the class away. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "cross")
PALETTES = ("warm", "cool")
CLASSES = [f"{palette}_{shape}" for palette in PALETTES for shape in SHAPES]


def _colour(rng: np.random.Generator, palette: str) -> tuple[int, int, int]:
    hue = rng.uniform(-0.08, 0.12) % 1.0 if palette == "warm" else rng.uniform(0.45, 0.7)
    r, g, b = (int(255 * c) for c in _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))
    return r, g, b


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def draw(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    palette, shape = CLASSES[label].split("_")
    background = rng.integers(60, 196, size=3)
    noise = rng.normal(0, 25, size=(size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    canvas = ImageDraw.Draw(image)
    radius = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    fill = _colour(rng, palette)
    if shape == "disc":
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(a), radius * math.sin(a)
            canvas.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fill, width=max(2, int(radius / 3)))
    else:
        corners = 4 if shape == "square" else 3
        points = [(cx + radius * math.cos(angle + 2 * math.pi * k / corners),
                   cy + radius * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)]
        canvas.polygon(points, fill=fill)
    return image


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
