"""FAT's forward and backward with fatscale's attention against the release's: benchmarks/model_speed.py
on the GPU, bf16, channels_last, eager (the train check measures the compiled trainer step).

    python -m benchmarks.gpu.check_speed --out DIR [--models fat_b0 fat_b3] [--device cuda|cpu] [--tiny]

Results, per model:
  speed_<model>_train   images/s of a training step (forward, backward, AdamW; batch 128, 224 px):
                        the release's explicit attention against fatscale's SDPA, peak memory
  speed_<model>_infer   the same for inference (batch 256)
"""

from __future__ import annotations

import argparse
import re

from benchmarks.gpu.common import check_main, run_benchmark
from benchmarks.gpu.results import Results

# benchmarks/model_speed.py's lines: "<model> <train|infer>  <variant>  <rate> img/s  x<ratio>[  peak <GiB> GiB]"
LINE = re.compile(r"^(fat_b\d) (train|infer)\s+(.+?)\s+([\d.]+) img/s\s+x([\d.]+|nan)(?:\s+peak ([\d.]+) GiB)?", re.M)


def run(args: argparse.Namespace, results: Results) -> None:
    sizes = (["--batch", "2", "--infer-batch", "2", "--img-size", "32", "--iters", "1", "--warmup", "1", "--dtype", "fp32"]
             if args.tiny else ["--batch", "128", "--infer-batch", "256", "--iters", "5", "--warmup", "2", "--dtype", "bf16"])
    text = run_benchmark(args, results, "model_speed.py", ["--channels-last", "--models", *args.models, *sizes])
    rows: dict[tuple[str, str], dict[str, tuple[float, str | None]]] = {}
    for model, mode, label, rate, _ratio, peak in LINE.findall(text):
        variant = "release" if label.startswith("release") else "fatscale"
        rows.setdefault((model, mode), {})[variant] = (float(rate), peak or None)
    for (model, mode), got in rows.items():
        if set(got) != {"release", "fatscale"}:
            continue
        (base, _), (rate, peak) = got["release"], got["fatscale"]
        results(f"speed_{model}_{mode}", "PASS", f"fatscale {rate:.0f} img/s, release attention {base:.0f}: x{rate / base:.2f}"
                + (f", peak {peak} GiB" if peak else ""), images_per_s=rate, release_images_per_s=base)


if __name__ == "__main__":
    check_main("speed", __doc__, run)
