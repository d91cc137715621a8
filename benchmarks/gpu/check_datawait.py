"""The data-wait fraction of a short FAT-B0 training run from shards of real JPEGs: how much of a
training step's time the trainer spends waiting for the DALI loader.

    python benchmarks/gpu/check_datawait.py --images DIR [--device cuda|cpu] [--replicas 40]
        [--steps 70] [--log-every 10] [--workdir DIR] [--set key=value ...]

Shards: train/ holds every JPEG of DIR --replicas times (each image its own class), val/ each once.
Run: ``launch/local.py recipes/fat_b0_300ep.yaml`` (the official setup: 224 px, batch 128 per
GPU, RandAugment, random erasing, Mixup/CutMix, bf16, EMA; eager, as the recipe has it) for
--steps optimizer steps, evaluating only at the end. The trainer logs images/s and data wait every
--log-every steps; the first window (DALI's start, cuDNN's autotuning) is reported apart.
Results:
  data_wait   the run finishes; the mean data-wait fraction and images/s of the windows after the first
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, result, run_launcher  # noqa: E402

sys.path.insert(0, str(REPO))


def make_tree(images: list[Path], root: Path, replicas: int) -> Path:
    for i, jpeg in enumerate(images):
        for split, copies in (("train", replicas), ("val", 1)):
            folder = root / split / f"c{i:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for r in range(copies):
                (folder / f"{jpeg.stem}_r{r:03d}{jpeg.suffix}").symlink_to(jpeg.resolve())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--replicas", type=int, default=40)
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=8, help="data.num_threads (the recipe's 8)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    from fatscale.prep import make_shards

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fatscale-datawait-"))
    work.mkdir(parents=True, exist_ok=True)
    jpegs = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        make_shards(make_tree(jpegs, work / "tree", args.replicas), shards, samples_per_shard=500, progress=False,
                    log=lambda *a: None)
    gpu = args.device == "cuda"
    overrides = [f"data.shards={shards}", f"output_dir={work / 'run'}", f"train.max_steps={args.steps}",
                 f"train.log_every={args.log_every}", "train.epochs=100", "train.eval_every=1000",
                 f"data.num_threads={args.threads}", "data.shuffle_buffer=1024", "checkpoint.every_minutes=null",
                 "tracking.system_metrics=false"] + args.overrides
    command = [sys.executable, str(REPO / "launch" / "local.py"), str(REPO / "recipes" / "fat_b0_300ep.yaml")]
    command += ["--nproc", "1" if gpu else "2"]
    for o in overrides:
        command += ["--set", o]
    code, output, seconds = run_launcher(command, work, args.timeout, "datawait.log", tail=3000)
    windows = [(int(step), float(rate), float(wait)) for step, rate, wait in
               re.findall(r"step (\d+)/\d+ loss \S+ lr \S+ grad_norm \S+ (\d+) img/s data_wait (\d+)%", output)]
    later = windows[1:]
    decode = set(re.findall(r"train loader: rank \d+/\d+, decode on (\w+)", output))
    ok = code == 0 and len(later) >= 1
    if later:
        wait = sum(w for _, _, w in later) / len(later)
        rate = sum(r for _, r, _ in later) / len(later)
        figure = (f"data wait {wait:.0f}% at {rate:.0f} img/s (mean of steps {later[0][0]}-{later[-1][0]}; "
                  f"first window {windows[0][2]:.0f}% at {windows[0][1]:.0f} img/s); decode {'/'.join(sorted(decode))}; "
                  f"{len(jpegs) * args.replicas} train images; {seconds:.0f} s")
    else:
        wait = rate = float("nan")
        figure = f"no logged windows after the first (exit {code}); see {work / 'datawait.log'}"
    result("data_wait", ok, figure, data_wait_percent=wait, images_per_s=rate, windows=windows, exit=str(code))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
