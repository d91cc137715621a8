"""Compile every graph benchmarks/model_speed.py --compile will compile, all at once, so that its
timed run finds them in torch.compile's caches (inductor's FX-graph and autotuning caches, Triton's
kernel cache) instead of compiling them one after another.

    python benchmarks/gpu/precompile.py [--models fat_b0 ...] [--batch 128] [--infer-batch 256]
        [--img-size 224] [--dtype bf16] [--device cuda|cpu] [--jobs 8] [--backend inductor]

One process per (model, train|infer) pair, --jobs at a time, each building the model with
model_speed.build and running model_speed.throughput on torch.compile(model, fullgraph=True) for
one warm-up and one timed step, exactly as model_speed.py does: same graphs, same cache keys.
Compiling is mostly single-threaded Python, so the pairs overlap well on a 16-core machine;
TORCHINDUCTOR_COMPILE_THREADS (default here: cores / jobs) bounds each one's kernel compilers.
Prints one result per pair (compile seconds: the first step's wall time) and a total.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO, result  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


def one(args: argparse.Namespace, name: str, mode: str) -> None:
    import torch

    import model_speed  # benchmarks/model_speed.py: its build and throughput, unchanged

    ns = argparse.Namespace(device=args.device, channels_last=True, batch=args.batch, infer_batch=args.infer_batch,
                            img_size=args.img_size, dtype=args.dtype, iters=1, warmup=1)
    model = model_speed.build(name, False, ns)
    runner = torch.compile(model, fullgraph=True, backend=args.backend)
    start = time.perf_counter()
    model_speed.throughput(runner, mode == "train", ns)
    print(f"precompile {name} {mode} {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fat_b0", "fat_b1", "fat_b2", "fat_b3"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="aot_eager for quick dry runs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each pair")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args, *args.one)
        return

    pairs = [(m, mode) for m in args.models for mode in ("train", "infer")]
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // min(args.jobs, len(pairs)))))
    common_args = ["--batch", str(args.batch), "--infer-batch", str(args.infer_batch), "--img-size", str(args.img_size),
                   "--dtype", args.dtype, "--device", args.device, "--backend", args.backend]
    start = time.perf_counter()
    running: list[tuple[tuple[str, str], subprocess.Popen, float]] = []
    waiting = list(pairs)
    failures, times = [], {}
    while waiting or running:
        while waiting and len(running) < args.jobs:
            pair = waiting.pop(0)
            command = [sys.executable, __file__, *common_args, "--one", *pair]
            running.append((pair, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   text=True), time.perf_counter()))
        time.sleep(0.2)
        for entry in list(running):
            pair, process, began = entry
            if process.poll() is None and time.perf_counter() - began < args.timeout:
                continue
            if process.poll() is None:
                process.kill()
            output = process.communicate()[0]
            running.remove(entry)
            elapsed = time.perf_counter() - began
            ok = process.returncode == 0
            times[pair] = elapsed
            if not ok:
                failures.append(pair)
                print(output[-3000:], flush=True)
            result(f"compile_{pair[0]}_{pair[1]}", ok, f"{elapsed:.0f} s to compile and run one step ({args.backend})",
                   seconds=elapsed)
    wall = time.perf_counter() - start
    result("precompile", not failures, f"{len(pairs)} graphs compiled in {wall:.0f} s wall, {args.jobs} at a time "
           f"(longest {max(times.values()):.0f} s)" + (f"; failed: {failures}" if failures else ""), seconds=wall)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
