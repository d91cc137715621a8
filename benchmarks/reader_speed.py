"""Images/s of the train pipeline with its global-order reader against DALI's webdataset reader.

    python benchmarks/reader_speed.py [--images DIR] [--threads 1 2] [--batch 64] [--batches 40]
        [--repeats 5] [--img-size 224] [--rand-augment rand-m9-mstd0.5-inc1]

Same shards (make_shards of the real ImageNet JPEGs in ../shared/data/imagenet-sample, 100 per
shard), same DALI graph after the reader (fatscale.data.loader.augment_train: decode of the crop
window, bicubic resize, RandAugment, flip, normalise), on the CPU:
  baseline: ``fn.readers.webdataset`` as the train loader used it before the global order: each
    rank's contiguous part of the shards, a 1000-sample shuffle buffer, reshuffled every epoch;
  fatscale: ``fn.external_source`` in parallel mode (one reader process) with
    ``fatscale.data.shard_samples.TrainSource``: every sample read by offset in the epoch's global
    permutation (fatscale.data.sample_order).
For each thread count the two alternate ``--repeats`` times (noise on a shared machine hits both),
each timing ``--batches`` batches after 5 warm-up batches; the ratio is of the medians.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvidia.dali import fn, pipeline_def  # noqa: E402

from benchmarks.loader_speed import SAMPLE_DIR, make_sample_shards  # noqa: E402
from fatscale.data.loader import AugConfig, DataConfig, augment_train  # noqa: E402
from fatscale.data.manifest import load_manifest  # noqa: E402
from fatscale.data.sample_order import BatchLayout, SampleOrder  # noqa: E402
from fatscale.data.shard_samples import ShardSamples, TrainSource  # noqa: E402


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def webdataset_pipeline(paths, index_paths, cfg, aug, img_size):
    encoded, cls = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg", "cls"], random_shuffle=True,
                                          initial_fill=1000, shuffle_after_epoch=True, pad_last_batch=True,
                                          name="reader")
    return augment_train(encoded, cfg, aug, "cpu", img_size), cls


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def global_order_pipeline(source, cfg, aug, img_size):
    encoded, cls, index = fn.external_source(source=source, num_outputs=3, batch=False, parallel=True)
    return augment_train(encoded, cfg, aug, "cpu", img_size), cls, index


def images_per_s(pipe, batch: int, batches: int) -> float:
    pipe.build()
    for _ in range(5):
        pipe.run()
    start = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=SAMPLE_DIR)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rand-augment", default="rand-m9-mstd0.5-inc1")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"reader_speed: error: no image directory {args.images}")
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_sample_shards(args.images, Path(tmp))
        manifest = load_manifest(shards)
        paths, index_paths = manifest.shard_paths("train", shards), manifest.index_paths("train", shards)
        samples = ShardSamples(paths, index_paths)
        order = SampleOrder(len(samples), 0, BatchLayout(args.batch, 1, args.batch, 1), 0)
        cfg = DataConfig(shards=str(shards), img_size=args.img_size, channels_last=False)
        aug = AugConfig(rand_augment=args.rand_augment or None)
        print(f"{len(samples)} images, batch {args.batch}, {args.img_size} px, RandAugment {args.rand_augment or 'off'}, "
              f"{args.batches} batches x {args.repeats} repeats")
        for threads in args.threads:
            common = dict(batch_size=args.batch, num_threads=threads, device_id=None, seed=1)
            old, new = [], []
            for _ in range(args.repeats):
                old.append(images_per_s(webdataset_pipeline(paths, index_paths, cfg, aug, args.img_size, **common),
                                        args.batch, args.batches))
                new.append(images_per_s(global_order_pipeline(TrainSource(samples, order, (0, 0), set()), cfg, aug,
                                                              args.img_size, py_num_workers=1, py_start_method="spawn",
                                                              **common), args.batch, args.batches))
            base, ours = statistics.median(old), statistics.median(new)
            print(f"{threads} thread(s): webdataset reader {base:7.1f} img/s {[round(v) for v in old]}, "
                  f"global order {ours:7.1f} img/s {[round(v) for v in new]}: x{ours / base:.3f}", flush=True)


if __name__ == "__main__":
    main()
