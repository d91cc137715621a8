"""fatscale's DALI loaders on the GPU (decode_device auto: `mixed`, nvJPEG), on shards of JPEGs.

    python -m benchmarks.gpu.check_dali --out DIR [--images DIR] [--device cuda|cpu] [--tiny]

The JPEGs (--images, e.g. a few hundred of ImageNet's; default: synthetic ImageNet-sized ones)
are sharded with each image its own class, so that a label names its image. Results:
  dali_labels       every val image (mixed decode) and every train crop (the whole image, no other
                    augmentation) is nearest, as a 16x16 thumbnail, to its own label's image decoded
                    by Pillow: labels stay with their images
  dali_restore      a train loader with a resolution schedule (160 px, then 224 px), saved mid-epoch
                    before the size change and restored in a new loader, gives the uninterrupted
                    loader's batches bitwise, across the change (RandAugment on)
  dali_rebuild      seconds of the pipeline's rebuild at the size change (the first batch after it)
  dali_memory       GPU memory held by one train and two val pipelines (224 and 256 px) after an
                    epoch each, after nvidia.dali.backend.ReleaseUnusedMemory(), and once they are gone
  dali_quarantine   planted corrupt JPEGs (one no decoder reads; one only Pillow reads) are
                    quarantined by the train loader and its epoch completes
  dali_loader_speed images/s of the 300-epoch recipe's train loader (RandAugment, random erasing,
                    Mixup/CutMix, its 8 threads, batch 128, 224 px) over two epochs after a warm-up
                    one; the summary sets it against FAT-B0's training images/s (goal: 2x)
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.gpu import data
from benchmarks.gpu.common import REPO, attempt, check_main
from benchmarks.gpu.results import Results

if TYPE_CHECKING:
    import torch

THUMB = 16


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(images=8, epoch_images=32, batch=4, small=32, size=48, val_sizes=(48, 64), threads=1, jpeg=(64, 48))
    return dict(images=128, epoch_images=2560, batch=128, small=160, size=224, val_sizes=(224, 256), threads=8,
                jpeg=data.IMAGENET_SIZE)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW (any memory format) -> 0..255 on the CPU."""
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return ((images.float() * std + mean) * 255).cpu()


def thumbnails(pixels: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.adaptive_avg_pool2d(pixels, THUMB).flatten(1)


def pil_thumbnail(path: Path) -> torch.Tensor:
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32)).permute(2, 0, 1).flatten()


def check_labels(results: Results, manifest, cfg, jpegs: list[Path], device, s: dict) -> None:
    import torch

    from fatscale.data.config import AugConfig
    from fatscale.data.loader import TrainLoader, ValLoader

    references = torch.stack([pil_thumbnail(p) for p in jpegs])
    val = ValLoader(manifest, cfg, batch_size=s["batch"], device=device)
    whole = AugConfig(scale=(1.0, 1.0), ratio=(0.1, 10.0), hflip=0.0, rand_augment=None, color_jitter=0.0, reprob=0.0,
                      mixup=0.0, cutmix=0.0, label_smoothing=0.0)  # crops of the whole image: what the label names
    train = TrainLoader(manifest, cfg, whole, batch_size=s["batch"], device=device, seed=1)
    matched = total = 0
    for loader in (val, train):
        for images, labels in loader:
            picked = torch.cdist(thumbnails(to_pixels(images)), references).argmin(1)
            matched += (picked == labels.cpu()).sum().item()
            total += len(labels)
    results("dali_labels", matched == total, f"{matched}/{total} val images and train crops ({train.decode} decode) "
            f"nearest to their own label's image", matched=matched, total=total)


def check_restore(results: Results, manifest, cfg, device, s: dict) -> None:
    """Save mid-epoch 0 (small size), restore in a new loader, compare through epoch 1 (full size)."""
    import torch

    from fatscale.data.config import AugConfig, ResolutionConfig
    from fatscale.data.loader import TrainLoader

    ramp = replace(cfg, resolution=ResolutionConfig(start=s["small"], end=s["size"], ramp=(1, 1), step=s["size"] - s["small"]))
    aug = AugConfig(reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)  # the loader's own draws only

    def loader():
        return TrainLoader(manifest, ramp, aug, batch_size=s["batch"], device=device, seed=3)

    first = loader()
    half = len(first) // 2
    it = iter(first)
    for _ in range(half):
        next(it)
    state = first.state_dict()
    reference = [(x.clone(), y.clone()) for x, y in it]
    # Epoch 1: its first batch waits for the pipeline's rebuild at the new size, the others flow.
    times, start = [], time.perf_counter()
    for x, y in first:
        reference.append((x.clone(), y.clone()))
        times.append(time.perf_counter() - start)
    resumed = loader()
    resumed.load_state_dict(state)
    again = [(x.clone(), y.clone()) for _ in range(2) for x, y in resumed]  # the rest of epoch 0, then epoch 1
    same = len(again) == len(reference) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                for a, b in zip(again, reference))
    sizes_seen = sorted({x.shape[-1] for x, _ in reference})
    results("dali_restore", same and sizes_seen == [s["small"], s["size"]],
            f"restored at batch {half} of epoch 0 ({s['small']} px): {len(again)} batches through epoch 1 "
            f"({s['size']} px) {'bitwise equal' if same else 'DIFFER'}; sizes {sizes_seen}")
    flowing = (times[-1] - times[0]) / max(len(times) - 1, 1)
    results("dali_rebuild", "PASS", f"first batch after the size change {times[0]:.2f} s (the rebuild), then "
            f"{flowing:.3f} s a batch", rebuild_s=times[0] - flowing, batch_s=flowing)


def used_mib(device) -> tuple[float, float]:
    """(device memory in use, torch's reserved part) in MiB."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20, torch.cuda.memory_reserved(device) / 2**20


def check_memory(results: Results, manifest, cfg, device, s: dict) -> None:
    import torch

    from fatscale.data.config import AugConfig
    from fatscale.data.loader import TrainLoader, ValLoader

    if device.type != "cuda":
        results("dali_memory", "SKIP", "GPU memory: no GPU")
        return
    from nvidia.dali.backend import ReleaseUnusedMemory

    torch.cuda.synchronize()
    base, _ = used_mib(device)
    loaders = [TrainLoader(manifest, cfg, AugConfig(), batch_size=s["batch"], device=device, seed=2)]
    loaders += [ValLoader(manifest, cfg, batch_size=s["batch"], device=device, img_size=size) for size in s["val_sizes"]]
    for loader in loaders:
        for _ in loader:
            pass
    torch.cuda.synchronize()
    held, torch_held = used_mib(device)
    ReleaseUnusedMemory()
    released, _ = used_mib(device)
    del loaders
    ReleaseUnusedMemory()
    gone, torch_gone = used_mib(device)
    results("dali_memory", "PASS", f"1 train + 2 val pipelines: {held - base:.0f} MiB over the start "
            f"({torch_held:.0f} MiB of it torch's cache); after ReleaseUnusedMemory() {released - base:.0f} MiB; "
            f"pipelines gone and released {gone - base:.0f} MiB", held_mib=held - base, released_mib=released - base,
            gone_mib=gone - base, torch_mib=torch_held)


def plant_corrupt(shards: Path) -> dict[str, str]:
    """Damage two train JPEGs inside their tar, in place (make_shards would mend or skip them before):
    ``garbage``, random bytes after the JFIF header (no decoder reads it), and ``junk``, the JFIF
    segment declared 3 bytes short (Pillow reads it, DALI's decoder does not). Returns key -> how."""
    import numpy as np

    from fatscale.data.shard_format import Index

    index = sorted(shards.glob("train-*.idx"))[0]
    members = [m for sample in Index.parse(index.read_text()).samples for m in sample if m.ext == "jpg"]
    planted = {}
    with open(index.with_suffix(".tar"), "r+b") as tar:
        for member, how in zip(members, ("garbage", "junk")):
            tar.seek(member.offset)
            raw = bytearray(tar.read(member.size))
            if raw[2:6] != b"\xff\xe0\x00\x10":
                continue  # not JFIF: nothing planted there
            if how == "garbage":
                raw[20:] = np.random.default_rng(0).integers(0, 256, len(raw) - 20, dtype=np.uint8).tobytes()
            else:
                raw[4:6] = (13).to_bytes(2, "big")
            tar.seek(member.offset)
            tar.write(raw)
            planted[member.key] = how
    return planted


def check_quarantine(results: Results, cfg, work: Path, device, s: dict) -> None:
    import shutil

    from fatscale.data.config import AugConfig
    from fatscale.data.loader import TrainLoader
    from fatscale.data.manifest import load_manifest

    folder = work / "quarantine"
    shutil.rmtree(folder, ignore_errors=True)  # planted in place: sharded afresh each time
    shards = data.shards_of(data.jpegs(data.write_jpegs(work / "clean", 2 * s["batch"], size=s["jpeg"], seed=7)), folder)
    planted = plant_corrupt(shards)
    loader = TrainLoader(load_manifest(shards), replace(cfg, shards=str(shards)), AugConfig(mixup=0.0, cutmix=0.0),
                         batch_size=s["batch"], device=device, seed=4)
    batches = sum(1 for _ in loader)
    found = {q.key: q.reason for q in loader.quarantine}
    caught = {how: key in found for key, how in planted.items()}
    results("dali_quarantine", caught.get("garbage", False) and batches == len(loader),
            f"{batches}/{len(loader)} batches ({loader.decode} decode); planted "
            + ", ".join(f"{how}: {'quarantined' if ok else 'decoded'}" for how, ok in caught.items())
            + "; reasons: " + ("; ".join(v[:100] for v in found.values()) or "none"), planted=caught)


def check_speed(results: Results, shards: Path, device, s: dict, tiny: bool) -> None:
    import torch

    from fatscale.config import load_recipe
    from fatscale.data.loader import TrainLoader
    from fatscale.data.manifest import load_manifest

    recipe = load_recipe(REPO / "recipes" / "fat_b0_300ep.yaml", [f"data.shards={shards}", f"data.img_size={s['size']}"]
                         + (["data.num_threads=1"] if tiny else []))
    manifest = load_manifest(shards)
    loader = TrainLoader(manifest, recipe.data, recipe.aug, batch_size=s["batch"], num_classes=1000, device=device, seed=5)
    for _ in loader:  # the pipeline's start and the first epoch's
        pass
    start = time.perf_counter()
    count = 0
    for _ in range(2):
        for images, _ in loader:
            count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = count / (time.perf_counter() - start)
    results("dali_loader_speed", "PASS", f"{rate:.0f} img/s: the 300-epoch recipe's train loader ({loader.decode} decode, "
            f"{recipe.data.num_threads} threads, batch {s['batch']}, {s['size']} px, {count} images)", images_per_s=rate)


def run(args: argparse.Namespace, results: Results) -> None:
    import torch

    from fatscale.data.config import DataConfig
    from fatscale.data.manifest import load_manifest

    s = sizes(args.tiny)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    jpegs = data.source_jpegs(args, s["images"], s["jpeg"])
    replicas = math.ceil(s["epoch_images"] / len(jpegs))
    shards = data.shards_of(jpegs, args.work, replicas=replicas)
    manifest = load_manifest(shards)
    cfg = DataConfig(shards=str(shards), img_size=s["size"], num_threads=s["threads"])
    with attempt(results, "dali_labels"):
        check_labels(results, manifest, cfg, jpegs, device, s)
    with attempt(results, "dali_restore"):
        check_restore(results, manifest, cfg, device, s)
    with attempt(results, "dali_memory"):
        check_memory(results, manifest, cfg, device, s)
    with attempt(results, "dali_quarantine"):
        check_quarantine(results, cfg, args.work, device, s)
    with attempt(results, "dali_loader_speed"):
        check_speed(results, shards, device, s, args.tiny)


if __name__ == "__main__":
    check_main("dali", __doc__, run)
