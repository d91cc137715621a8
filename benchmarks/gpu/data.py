"""The checks' inputs: JPEG files (a user's folder, or synthetic ones), ImageFolder trees and shards
of them, and batches as the train loader hands them to the trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGENET_SIZE = (500, 375)  # ImageNet's most common JPEG size: decode costs what ImageNet's do


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = IMAGENET_SIZE, seed: int = 0) -> Path:
    """``count`` distinct JPEGs (quality 90): a coarse random pattern each, smoothly enlarged, with
    noise, so that every image has its own look and photo-like entropy (~100 kB at 500x375)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"n{i:08d}_{i}.JPEG"
        if path.exists():
            continue
        pattern = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(pattern, dtype=np.int16) + rng.normal(0, 12, (size[1], size[0], 3)).astype(np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def source_jpegs(args, count: int, size: tuple[int, int]) -> list[Path]:
    """The first ``count`` JPEGs of --images, or as many synthetic ones, made once in OUT/work/jpegs
    for every check that needs them."""
    return jpegs(args.images or write_jpegs(args.out / "work" / "jpegs", count, size=size), count)


def jpegs(folder: Path, count: int | None = None) -> list[Path]:
    """The first ``count`` JPEGs of a folder, by name."""
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not found:
        raise SystemExit(f"no JPEG in {folder}")
    return found[:count]


def image_tree(images: list[Path], root: Path, replicas: int = 1) -> Path:
    """train/ (each image ``replicas`` times) and val/ (once), image i alone in class c{i}: a label
    names its image. Symbolic links, no copies."""
    for i, jpeg in enumerate(images):
        for split, copies in (("train", replicas), ("val", 1)):
            folder = root / split / f"c{i:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for r in range(copies):
                link = folder / f"{jpeg.stem}_r{r:03d}{jpeg.suffix}"
                if not link.exists():
                    link.symlink_to(jpeg.resolve())
    return root


def shards_of(images: list[Path], out: Path, replicas: int = 1, samples_per_shard: int = 200) -> Path:
    """make_shards of image_tree(images) in ``out`` (once: an existing manifest is kept), in this
    process: files pass through unchanged, so one process is fast, and worker processes would
    import the calling check's modules again."""
    from fatscale.prep import make_shards

    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        make_shards(image_tree(images, out / "tree", replicas), shards, samples_per_shard=samples_per_shard,
                    workers=1, progress=False, log=None)
    return shards


def batches(count: int, batch: int, size: int, device, num_classes: int = 1000, seed: int = 0) -> list:
    """Fixed random (images, targets) on ``device``: channels_last images and Mixup-style soft
    targets (label smoothing 0.1), as the train loader of the 300-epoch recipes gives them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, num_classes, (batch,), generator=g)
        y = torch.full((batch, num_classes), 0.1 / num_classes)
        y[torch.arange(batch), labels] += 0.9
        out.append((x.to(device), y.to(device)))
    return out
