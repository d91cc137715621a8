"""The data-wait share of a FAT-B0 training run: how much of the trainer's time goes to waiting
for the DALI loader, in a real run of launch/local.py on one GPU.

    python -m benchmarks.gpu.check_datawait --out DIR [--images DIR] [--device cuda|cpu] [--tiny]

The run: recipes/fat_b0_300ep.yaml as it is (224 px, batch 128, RandAugment, random erasing,
Mixup/CutMix, bf16, EMA, 8 DALI threads, MLflow to a local store), compiled with inductor as the
recipe has it: the compiled step is the fast one, so it is the one a slow loader holds back (an
eager run would hide it); 1000 classes, as ImageNet's, so that the graphs are those the train
check compiled and inductor's cache serves them. Shards: the JPEGs (--images, or synthetic
ImageNet-sized ones), each its own class, repeated to fill one epoch of the run's steps. The
trainer logs images/s and data wait every --log-every steps; the first window (compile, DALI's
start) is reported apart. The dry run (--tiny, a CPU) trains eagerly: compiling there takes minutes.
Results:
  data_wait   the run ends; the mean data-wait share and images/s of the windows after the first
              (goal: under 5%)
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import time

from benchmarks.gpu import data
from benchmarks.gpu.common import REPO, check_main, run_program
from benchmarks.gpu.results import Results

WINDOW = re.compile(r"step (\d+)/\d+ .*? ([\d.]+) img/s data_wait ([\d.]+)%")
DECODE = re.compile(r"train loader: rank \d+/\d+, decode on (\w+)")


def settings(tiny: bool) -> dict:
    if tiny:
        return dict(images=8, jpeg=(64, 48), steps=4, log_every=1, batch=4, size=32, threads=1,
                    sets=["model.compile=false", "train.precision=fp32", "train.val_batch_per_device=8"])
    return dict(images=128, jpeg=data.IMAGENET_SIZE, steps=40, log_every=8, batch=128, size=224, threads=8, sets=[])


def run(args: argparse.Namespace, results: Results) -> None:
    s = settings(args.tiny)
    jpegs = data.source_jpegs(args, s["images"], s["jpeg"])
    replicas = math.ceil(s["steps"] * s["batch"] / len(jpegs))  # one epoch holds every step
    shards = data.shards_of(jpegs, args.work, replicas=replicas, samples_per_shard=1000)
    output = args.work / "run"
    shutil.rmtree(output, ignore_errors=True)
    sets = [f"data.shards={shards}", f"output_dir={output}", f"train.max_steps={s['steps']}",
            f"train.log_every={s['log_every']}", "train.eval_every=1000", f"train.batch_per_device={s['batch']}",
            f"data.img_size={s['size']}", f"data.num_threads={s['threads']}", "model.num_classes=1000",
            "checkpoint.every_minutes=null", "tracking.system_metrics=false"] + s["sets"]
    command = [sys.executable, str(REPO / "launch" / "local.py"), str(REPO / "recipes" / "fat_b0_300ep.yaml"),
               "--nproc", "1"]
    for value in sets:
        command += ["--set", value]
    compiled = "model.compile=false" not in s["sets"]
    log = args.work / "run.log"
    start = time.perf_counter()
    code, text = run_program(command, log, timeout=max(args.limit_s - 15, 10))
    seconds = time.perf_counter() - start
    windows = [(int(step), float(rate), float(wait)) for step, rate, wait in WINDOW.findall(text)]
    decode = "/".join(sorted(set(DECODE.findall(text)))) or "?"
    later = windows[1:]
    mode = "compiled (inductor)" if compiled else "eager (the dry run)"
    if not later:
        results("data_wait", False, f"no logged window after the first (exit {code} after {seconds:.0f} s); see {log}",
                exit=str(code))
        return
    wait = sum(w for _, _, w in later) / len(later)
    rate = sum(r for _, r, _ in later) / len(later)
    results("data_wait", code == 0, f"{wait:.1f}% data wait at {rate:.0f} img/s, steps {later[0][0]}-{later[-1][0]} "
            f"(first window {windows[0][2]:.0f}% at {windows[0][1]:.0f} img/s); FAT-B0 {mode}, decode {decode}, "
            f"{len(jpegs) * replicas} train images; exit {code} after {seconds:.0f} s", data_wait_percent=wait,
            images_per_s=rate, windows=windows, compiled=compiled, exit=str(code))


if __name__ == "__main__":
    check_main("datawait", __doc__, run)
