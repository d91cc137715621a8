"""Training images/s per resolution and the progressive-resolution recipes' GPU-hours:
benchmarks/resolution_speed.py on the GPU, bf16, channels_last, eager.

    python -m benchmarks.gpu.check_resolution --out DIR [--models fat_b0 fat_b3] [--device cuda|cpu] [--tiny]

Results, per model with a recipes/<model>_fast.yaml:
  resolution_<model>   images/s at each size the fast recipe trains at (160, 192, 224 px), and its
                       300-epoch GPU-hours against the official recipe's, from those images/s and
                       from MACs alone
"""

from __future__ import annotations

import argparse
import re

from benchmarks.gpu.common import REPO, check_main, run_benchmark
from benchmarks.gpu.results import Results

# benchmarks/resolution_speed.py's lines
SIZE = re.compile(r"^(fat_b\d) train\s+(\d+) px\s+([\d.]+) img/s", re.M)
OFFICIAL = re.compile(r"^(fat_b\d) official recipe \(baseline\): (\d+) epochs, ([\d.]+) device-hours", re.M)
FAST = re.compile(r"^(fat_b\d) fast recipe: (\d+) epochs, ([\d.]+) device-hours: x([\d.]+) of the official "
                  r"\(measured images/s\), x([\d.]+) by MACs", re.M)


def run(args: argparse.Namespace, results: Results) -> None:
    models = [m for m in args.models if (REPO / "recipes" / f"{m}_fast.yaml").is_file()]
    for model in sorted(set(args.models) - set(models)):
        results(f"resolution_{model}", "SKIP", f"no recipes/{model}_fast.yaml")
    if not models:
        return
    sizes = (["--batch", "2", "--iters", "1", "--warmup", "1", "--dtype", "fp32"] if args.tiny
             else ["--batch", "128", "--iters", "5", "--warmup", "2", "--dtype", "bf16"])
    text = run_benchmark(args, results, "resolution_speed.py", ["--channels-last", "--models", *models, *sizes])
    official = {m: float(hours) for m, _, hours in OFFICIAL.findall(text)}
    for model, _epochs, hours, measured, by_macs in FAST.findall(text):
        rates = {int(size): float(rate) for m, size, rate in SIZE.findall(text) if m == model}
        results(f"resolution_{model}", "PASS", ", ".join(f"{s} px {r:.0f}" for s, r in sorted(rates.items()))
                + f" img/s; fast recipe {float(hours):.1f} GPU-hours vs official {official.get(model, float('nan')):.1f}: "
                f"x{measured} (by MACs x{by_macs}), eager", images_per_s=rates, fast_hours=float(hours),
                official_hours=official.get(model), ratio=float(measured), ratio_macs=float(by_macs))


if __name__ == "__main__":
    check_main("resolution", __doc__, run)
