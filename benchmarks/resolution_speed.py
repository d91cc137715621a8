"""Training images/s of FAT-B0..B3 per resolution, and the projected GPU-hours of a progressive-
resolution recipe against the official one, from those measurements.

    python benchmarks/resolution_speed.py [--models fat_b0 fat_b3] [--sizes 160 192 224]
        [--fast recipes/fat_b0_fast.yaml] [--official recipes/fat_b0_300ep.yaml]
        [--batch 64] [--dtype bf16] [--channels-last] [--compile] [--device cuda] [--iters 20]

Baseline, measured in the same run: the official recipe, every epoch at its img_size. Per model:
training-step images/s at each size (forward + backward + AdamW, benchmarks/model_speed.py's step),
the MACs per image at each size, and for each recipe the device-hours of its train epochs on
ImageNet-1K's 1,281,167 images: sum over epochs of images / images_per_s(size of the epoch). The
ratios fast/official are printed twice: from the measured images/s (what the device delivers) and
from MACs alone (what it would deliver if time followed the arithmetic). Evaluation is left out of
both (a few percent of a run). A prediction, until an ImageNet run confirms the accuracy.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGENET_TRAIN = 1_281_167


def epoch_sizes(recipe_path: Path) -> list[int]:
    from fatscale.config import load_recipe

    recipe = load_recipe(recipe_path, check_shards=False)
    return [recipe.data.train_size(epoch) for epoch in range(recipe.train.epochs)]


def device_hours(sizes: list[int], per_size: dict[int, float]) -> float:
    return sum(IMAGENET_TRAIN / per_size[size] for size in sizes) / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fat_b0", "fat_b3"])
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="default: every size the fast recipe trains at")
    parser.add_argument("--fast", type=Path, default=None, help="default: recipes/<model>_fast.yaml")
    parser.add_argument("--official", type=Path, default=None, help="default: recipes/<model>_300ep.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import torch

    from fatscale.models.complexity import count_macs
    from model_speed import build, throughput

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.infer_batch = args.batch
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} "
          f"dtype={args.dtype} channels_last={args.channels_last} compile={args.compile}")
    for name in args.models:
        fast = epoch_sizes(args.fast or REPO / "recipes" / f"{name}_fast.yaml")
        official = epoch_sizes(args.official or REPO / "recipes" / f"{name}_300ep.yaml")
        sizes = sorted(set(args.sizes or []) | set(fast) | set(official))
        rates, macs = {}, {}
        for size in sizes:
            args.img_size = size
            model = build(name, baseline=False, args=args)
            runner = torch.compile(model) if args.compile else model
            rates[size] = throughput(runner, True, args)
            macs[size] = count_macs(build(name, baseline=False, args=argparse.Namespace(device="cpu",
                                                                                       channels_last=False)), size)
        for size in sizes:
            print(f"{name} train {size:4d} px {rates[size]:9.1f} img/s  x{rates[size] / rates[sizes[-1]]:.2f} of "
                  f"{sizes[-1]} px  {macs[size] / 1e9:.2f} GMACs/img", flush=True)
        base_hours, fast_hours = device_hours(official, rates), device_hours(fast, rates)
        base_macs = sum(macs[s] for s in official)
        fast_macs = sum(macs[s] for s in fast)
        print(f"{name} official recipe (baseline): {len(official)} epochs, {base_hours:.1f} device-hours on this device")
        print(f"{name} fast recipe: {len(fast)} epochs, {fast_hours:.1f} device-hours: x{fast_hours / base_hours:.3f} "
              f"of the official (measured images/s), x{fast_macs / base_macs:.3f} by MACs", flush=True)


if __name__ == "__main__":
    main()
