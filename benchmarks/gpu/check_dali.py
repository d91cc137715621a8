"""DALI on the GPU: `mixed` decoding of shards made from real JPEGs, labels that stay with their
images, and ``decode_device: auto`` choosing `mixed` on a GPU.

    python benchmarks/gpu/check_dali.py --images DIR [--device cuda|cpu] [--num 64] [--img-size 224]
        [--batch 16]

The first --num JPEGs of DIR, each made its own class (as tests/test_loader.py gives every class
one image of its own colour, so that a label names its sample), go through make_shards (train and
val splits, several shards). Results:
  decode_auto     TrainLoader and ValLoader built with decode_device auto decode on `mixed` (GPU)
  val_decode      ValLoader (auto = mixed) against ValLoader with decode_device cpu, the same
                  shards: the same labels in the same order, the pixels within JPEG-decoder
                  rounding of the CPU's (|difference| mean < 4 levels, 99th percentile < 40)
  val_labels      each mixed-decoded val image is closest to the CPU-decoded image of its own label
  device_without_index  a loader given device="cuda" (no index) still decodes on the GPU
  train_labels    two epochs of TrainLoader (mixed; random-resized crops of the full area at any
                  aspect ratio, so the whole image; no flip, RandAugment, erasing or Mixup): every
                  crop is closest (16x16 thumbnails) to its own label's image decoded with Pillow;
                  no sample twice in an epoch
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, result  # noqa: E402

sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import fatscale  # noqa: E402,F401
from fatscale.data.loader import AugConfig, DataConfig, TrainLoader, ValLoader  # noqa: E402
from fatscale.data.manifest import load_manifest  # noqa: E402
from fatscale.prep import make_shards  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

THUMB = 16


def make_tree(images: list[Path], root: Path) -> Path:
    """train/ and val/ with class i holding image i only (symlinks)."""
    for split in ("train", "val"):
        for i, jpeg in enumerate(images):
            folder = root / split / f"c{i:04d}"
            folder.mkdir(parents=True)
            (folder / jpeg.name).symlink_to(jpeg.resolve())
    return root


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW (any memory format) -> 0..255 float on the CPU."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return ((images.float() * std + mean) * 255).cpu()


def thumbnails(pixels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.adaptive_avg_pool2d(pixels, THUMB).flatten(1)


def pil_thumbnail(path: Path, ratio: tuple[float, float]) -> torch.Tensor:
    """The whole image, or (beyond the crop's aspect-ratio range) its largest centred window
    within the range: what a random-resized crop of the full area falls back to (with the
    check's range of 0.1-10, always the whole image)."""
    with Image.open(path) as im:
        w, h = im.size
        aspect = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
        left, top = (w - cw) // 2, (h - ch) // 2
        small = im.convert("RGB").crop((left, top, left + cw, top + ch)).resize((THUMB, THUMB), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32)).permute(2, 0, 1).flatten()


def nearest(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    return torch.cdist(queries, references).argmin(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEGs (one per class)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num", type=int, default=64, help="images (= classes) to use")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    jpegs = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.num]
    if len(jpegs) < 2 * args.batch:
        raise SystemExit(f"check_dali: need at least {2 * args.batch} JPEGs in {args.images}, found {len(jpegs)}")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="fatscale-dali-") as tmp:
        tree = make_tree(jpegs, Path(tmp) / "tree")
        shards = Path(tmp) / "shards"
        make_shards(tree, shards, samples_per_shard=max(4, len(jpegs) // 5), progress=False, log=lambda *a: None)
        manifest = load_manifest(shards)
        cfg = DataConfig(shards=str(shards), img_size=args.img_size, num_threads=args.threads, shuffle_buffer=len(jpegs))
        # the class folder c0007 holds jpegs[7]: label i names image i
        labels_ok = [manifest.classes[i] == f"c{i:04d}" for i in range(len(jpegs))]
        assert all(labels_ok), "class order is not the folder order"

        val_auto = ValLoader(manifest, cfg, batch_size=args.batch, device=device)
        aug = AugConfig(scale=(1.0, 1.0), ratio=(0.1, 10.0), hflip=0.0, rand_augment=None, color_jitter=0.0, reprob=0.0, mixup=0.0,
                        cutmix=0.0, label_smoothing=0.0)
        train = TrainLoader(manifest, cfg, aug, batch_size=args.batch, device=device, seed=1)
        want = "mixed" if gpu else "cpu"
        result("decode_auto", val_auto.decode == want and train.decode == want,
               f"decode_device auto on {device}: train {train.decode}, val {val_auto.decode} (want {want})")

        val_cpu = ValLoader(manifest, DataConfig(**{**cfg.__dict__, "decode_device": "cpu"}), batch_size=args.batch,
                            device=device)
        got = [(to_pixels(x), y.cpu()) for x, y in val_auto]
        ref = [(to_pixels(x), y.cpu()) for x, y in val_cpu]
        got_x, got_y = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
        ref_x, ref_y = torch.cat([x for x, _ in ref]), torch.cat([y for _, y in ref])
        same_labels = torch.equal(got_y, ref_y) and sorted(got_y.tolist()) == list(range(len(jpegs)))
        diff = (got_x - ref_x).abs() if got_x.shape == ref_x.shape else torch.full((1,), float("inf"))
        flat = diff.flatten()
        mean_diff = flat.mean().item()
        p99 = flat.kthvalue(max(1, int(0.99 * flat.numel()))).values.item()
        p999 = flat.kthvalue(max(1, int(0.999 * flat.numel()))).values.item()
        # nvJPEG and libjpeg-turbo round the inverse DCT and upsample chroma differently: a few
        # levels in most pixels, more at sharp colour edges. A wrong channel order, a shifted or
        # misplaced image gives tens of levels on average.
        result("val_decode", same_labels and mean_diff < 4.0 and p99 < 40,
               f"{len(got_y)} val images, {val_auto.decode} vs cpu decode: labels {'identical' if same_labels else 'DIFFER'}, "
               f"|diff| mean {mean_diff:.2f} levels, 99th percentile {p99:.1f}, 99.9th {p999:.1f} (of 255)",
               mean_diff=mean_diff, p99=p99, p999=p999)
        picked = nearest(thumbnails(got_x), thumbnails(ref_x))
        own = (ref_y[picked] == got_y).sum().item()
        result("val_labels", own == len(got_y), f"{own}/{len(got_y)} {val_auto.decode}-decoded val images nearest to the cpu-decoded image of their own label")

        # device="cuda" without an index, as README's example `device=device` allows: the
        # pipeline's device_id comes from device.index (fatscale/data/loader.py), None here.
        if gpu:
            try:
                images, _ = next(iter(ValLoader(manifest, cfg, batch_size=args.batch, device="cuda")))
                result("device_without_index", images.is_cuda, f"ValLoader(device='cuda') gives {images.device} batches")
            except Exception as e:  # noqa: BLE001  (the message is the figure)
                result("device_without_index", False, f"ValLoader(device='cuda') fails: {str(e).strip().splitlines()[0][:300]}")
        else:
            result("device_without_index", "SKIP", "no GPU")

        references = torch.stack([pil_thumbnail(p, aug.ratio) for p in jpegs])
        seen_ok, matched, total = True, 0, 0
        for _ in range(2):
            labels = []
            for images, targets in train:
                picked = nearest(thumbnails(to_pixels(images)), references)
                matched += (picked == targets.cpu()).sum().item()
                total += len(targets)
                labels += targets.tolist()
            seen_ok &= len(labels) == len(set(labels)) == len(train) * args.batch
        result("train_labels", seen_ok and matched == total,
               f"{matched}/{total} train crops ({train.decode} decode, 2 epochs) nearest to the Pillow thumbnail of their own label; "
               f"no sample twice in an epoch: {seen_ok}")


if __name__ == "__main__":
    main()
