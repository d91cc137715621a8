"""Start-up time of every command line, against an interpreter that does nothing and one that
imports torch, in the same run.

Each command runs --runs times in a fresh interpreter (one warm-up run first, which also writes
the bytecode caches), the commands interleaved so that other load on the machine spreads over all
of them; the median wall time counts. Targets (issue 13): ``--help`` of every entry point under
1 s, ``launch/slurm.py RECIPE --dry-run`` under 3 s (on the 2-core machine). The dry run and
``python -m fatscale.config RECIPE`` use recipes/demo_cpu.yaml on shards of the demo textures set,
made in a temporary directory (fatscale.tryout.demo_data, then data_prep/make_shards.py), or on --shards.

    python benchmarks/startup.py [--runs 5] [--shards SHARD_DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELP_TARGET_S, RECIPE_TARGET_S = 1.0, 3.0
ENTRY_POINTS = [  # (label, arguments after the interpreter); each with --help
    ("launch/slurm.py", ["launch/slurm.py"]),
    ("launch/local.py", ["launch/local.py"]),
    ("launch/devcluster.py", ["launch/devcluster.py"]),
    ("data_prep/make_shards.py", ["data_prep/make_shards.py"]),
    ("-m fatscale.train", ["-m", "fatscale.train"]),
    ("-m fatscale.export", ["-m", "fatscale.export"]),
    ("-m fatscale.tracking", ["-m", "fatscale.tracking"]),
    ("-m fatscale.config", ["-m", "fatscale.config"]),
    ("-m fatscale.tryout.demo_data", ["-m", "fatscale.tryout.demo_data"]),
]


def make_demo_shards(root: Path) -> Path:
    """The demo textures set, small (8 classes x 20 train / 5 val images of 32 px), as shards."""
    run([sys.executable, "-m", "fatscale.tryout.demo_data", str(root / "images"), "--per-class", "20", "--val-per-class", "5",
         "--size", "32"])
    run([sys.executable, "data_prep/make_shards.py", "--src", str(root / "images"), "--out", str(root / "shards"),
         "--samples-per-shard", "80", "--workers", "1", "--quiet"])
    return root / "shards"


def run(command: list[str]) -> float:
    """Seconds ``command`` took; it must succeed."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def commands(shards: Path, output_dir: Path) -> list[tuple[str, list[str], float | None]]:
    """(label, command, target in seconds or None for the baselines)."""
    python = sys.executable
    recipe = ["recipes/demo_cpu.yaml", "--set", f"data.shards={shards}", "--set", f"output_dir={output_dir}"]
    return [
        ("python -c pass", [python, "-c", "pass"], None),
        ("python -c 'import torch'", [python, "-c", "import torch"], None),
        *[(f"{label} --help", [python, *args, "--help"], HELP_TARGET_S) for label, args in ENTRY_POINTS],
        ("launch/slurm.py RECIPE --dry-run", [python, "launch/slurm.py", *recipe, "--dry-run"], RECIPE_TARGET_S),
        ("-m fatscale.config RECIPE", [python, "-m", "fatscale.config", *recipe], RECIPE_TARGET_S),
    ]


def measure(table: list[tuple[str, list[str], float | None]], runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {label: [] for label, _, _ in table}
    for label, command, _ in table:  # warm-up: bytecode caches, page cache
        run(command)
    for _ in range(runs):
        for label, command, _ in table:
            times[label].append(run(command))
    return {label: statistics.median(values) for label, values in times.items()}


def report(table: list[tuple[str, list[str], float | None]], medians: dict[str, float], runs: int) -> None:
    bare, torch_import = medians["python -c pass"], medians["python -c 'import torch'"]
    print(f"median of {runs} runs each; x bare: against `python -c pass` ({bare:.3f} s), "
          f"x torch: against `python -c 'import torch'` ({torch_import:.2f} s)")
    print(f"{'command':36s} {'median':>8s} {'x bare':>7s} {'x torch':>8s} {'target':>7s}")
    for label, _, target in table:
        seconds = medians[label]
        verdict = "" if target is None else f"{target:5.0f} s  " + ("ok" if seconds < target else "OVER")
        print(f"{label:36s} {seconds:7.2f}s {seconds / bare:7.1f} {seconds / torch_import:8.2f} {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shards", type=Path, help="a shard directory (default: demo shards made in a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fatscale-startup-") as tmp:
        shards = args.shards.resolve() if args.shards else make_demo_shards(Path(tmp))
        table = commands(shards, Path(tmp) / "out")
        report(table, measure(table, args.runs), args.runs)


if __name__ == "__main__":
    main()
