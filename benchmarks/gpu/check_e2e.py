"""The end-to-end demo on the GPU: generated images -> shards -> DALI (mixed) -> DeepSpeed (bf16,
NCCL) -> MLflow (local sqlite store), the final top-1 read back from MLflow.

    python benchmarks/gpu/check_e2e.py [--device cuda|cpu] [--workdir DIR] [--set key=value ...]

Runs ``launch/local.py --demo`` (recipes/demo_cpu.yaml, 12 epochs of FAT-B0 at 64 px on the
textures set) with the GPU overrides: bf16 (the recipe's fp32 is for CPUs without bf16 units),
4 DALI threads, data and output under --workdir. Results:
  e2e_demo   the launcher exits 0 and prints the MLflow run FINISHED with top-1 above twice chance
             (8 classes: 25%), the train loader decoded on mixed (cpu on a CPU), the store exists
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, result, run_launcher  # noqa: E402

CHANCE = 100 / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more recipe overrides (the dry run's tiny sizes)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--min-top1", type=float, default=2 * CHANCE)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fatscale-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = args.device == "cuda"
    overrides = [f"data.shards={work / 'demo_data' / 'shards'}", f"output_dir={work / 'demo'}"]
    if gpu:
        overrides += ["train.precision=bf16", "data.num_threads=4"]
    overrides += args.overrides
    command = [sys.executable, str(REPO / "launch" / "local.py"), "--demo"]
    if not gpu:
        command += ["--nproc", "2"]
    for o in overrides:
        command += ["--set", o]
    code, output, seconds = run_launcher(command, work, args.timeout, "e2e.log", tail=4000)
    final = re.search(r"MLflow run (\w+) \((\w+)\) in experiment '([^']*)': top1 ([\d.]+)%, top1_ema ([\d.na]+)%, "
                      r"best_top1 ([\d.]+)%", output)
    decode = set(re.findall(r"train loader: rank \d+/\d+, decode on (\w+)", output))
    store = work / "demo" / "mlflow.db"
    want = "mixed" if gpu else "cpu"
    top1 = float(final.group(4)) if final else float("nan")
    ok = (code == 0 and final is not None and final.group(2) == "FINISHED" and top1 > args.min_top1
          and decode == {want} and store.is_file())
    figure = (f"top1 {top1:.1f}% (EMA {final.group(5)}%, best {final.group(6)}%) from MLflow run {final.group(1)} "
              f"{final.group(2)}" if final else f"no final top-1 in the output (exit {code})")
    steps = re.findall(r"step (\d+)/(\d+) .* (\d+) img/s data_wait (\d+)%", output)
    rate = f", last logged {steps[-1][2]} img/s, data wait {steps[-1][3]}%" if steps else ""
    result("e2e_demo", ok, f"{figure}; decode {'/'.join(sorted(decode)) or '?'}; {seconds:.0f} s end to end{rate}; "
           f"store {store}", top1=top1, seconds=seconds, exit=str(code))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
