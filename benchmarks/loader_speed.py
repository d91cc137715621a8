"""Images/s of the DALI train pipeline against the usual PyTorch loader, same data, same run.

    python benchmarks/loader_speed.py [--images DIR] [--workers 2] [--batch 64] [--epochs 3]
        [--img-size 224] [--device cpu|cuda]

Data: shards made (make_shards) from the real ImageNet JPEGs in ../shared/data/imagenet-sample.
Both loaders apply FAT's train augmentation: random-resized crop (0.08-1, bicubic), flip,
RandAugment rand-m9-mstd0.5-inc1, normalisation, random erasing (0.25, per-pixel noise); Mixup
is left out of both (it is the same timm code on the same device either way).
  baseline: webdataset + PIL + timm's create_transform, torch DataLoader with --workers workers;
  baseline, nearest warps: the same with RandAugment's rotate/shear/translate resampled by the
    nearest neighbour, as fatscale's CPU operators do (aug.rand_augment_interp: auto), so the
    ratio against it shows what does not come from that choice;
  fatscale: TrainLoader (DALI, --workers threads; decode on the GPU with --device cuda).
The consuming process runs one torch thread, as each DataLoader worker does: it runs fatscale's
random erasing, and idle torch threads spinning there would take cores from DALI's threads.
The first epoch of each warms up (DALI builds its graph, workers start) and is not timed.
timm's PosterizeIncreasing reaches 0 kept bits near magnitude 10, which Pillow >= 11 rejects; the
baseline keeps at least 1 bit there, as DALI does.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import fatscale  # noqa: F401  (before timm)
import webdataset as wds
from fatscale.data.loader import AugConfig, DataConfig, TrainLoader
from fatscale.data.manifest import load_manifest
from fatscale.prep import make_shards
import timm.data.auto_augment as timm_auto_augment
from timm.data import create_transform

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def make_sample_shards(images: Path, out: Path) -> Path:
    """ImageFolder tree of symlinks (<wnid>/<file>) -> shards of 100 samples."""
    tree = out / "tree" / "train"
    for jpeg in sorted(images.glob("*.JPEG")):
        folder = tree / jpeg.name.split("_", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / jpeg.name).symlink_to(jpeg)
    make_shards(out / "tree", out / "shards", samples_per_shard=100, progress=False, log=lambda *a: None)
    return out / "shards"


def time_epochs(batches, epochs: int, device: str) -> float:
    """Images/s over epochs 2..epochs (the first one warms up)."""
    count, start = 0, None
    for epoch in range(epochs):
        if epoch == 1:
            start = time.perf_counter()
        for images, _labels in batches():
            if epoch >= 1:
                count += images.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def _posterize_at_least_one_bit(img, bits_to_keep, **kwargs):
    return timm_auto_augment.posterize(img, max(bits_to_keep, 1), **kwargs)


def baseline(shards: Path, args: argparse.Namespace, warp_resample: int | None = None):
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        timm_auto_augment.NAME_TO_OP[name] = _posterize_at_least_one_bit
    transform = create_transform(
        args.img_size, is_training=True, auto_augment=RAND_AUGMENT, interpolation="bicubic",
        re_prob=0.25, re_mode="pixel", re_count=1,
    )
    if warp_resample is not None:
        rand_augment = next(t for t in transform.transforms if isinstance(t, timm_auto_augment.RandAugment))
        for op in rand_augment.ops:
            op.kwargs["resample"] = warp_resample
    urls = [str(p) for p in sorted(shards.glob("train-*.tar"))]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker, empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers,
                                         persistent_workers=True, drop_last=True)
    return lambda: ((x.to(args.device), y.to(args.device)) for x, y in loader)


def dali(shards: Path, args: argparse.Namespace):
    cfg = DataConfig(shards=str(shards), img_size=args.img_size, num_threads=args.workers)
    aug = AugConfig(rand_augment=RAND_AUGMENT, reprob=0.25, mixup=0.0, cutmix=0.0)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    loader = TrainLoader(load_manifest(shards), cfg, aug, batch_size=args.batch, device=device)
    return lambda: iter(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=SAMPLE_DIR)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"loader_speed: error: no image directory {args.images}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_sample_shards(args.images, Path(tmp))
        print(f"{load_manifest(shards).splits['train'].num_samples} images, batch {args.batch}, "
              f"{args.workers} workers/threads, {args.img_size}px, device {args.device}, timed epochs {args.epochs - 1}")
        base = time_epochs(baseline(shards, args), args.epochs, args.device)
        print(f"baseline (webdataset + PIL + timm, DataLoader) {base:8.1f} img/s", flush=True)
        nearest = time_epochs(baseline(shards, args, Image.NEAREST), args.epochs, args.device)
        print(f"baseline, nearest RandAugment warps            {nearest:8.1f} img/s", flush=True)
        fast = time_epochs(dali(shards, args), args.epochs, args.device)
        print(f"fatscale (DALI TrainLoader)                    {fast:8.1f} img/s   "
              f"x{fast / base:.2f} (x{fast / nearest:.2f} against nearest warps)")


if __name__ == "__main__":
    main()
