"""The command line of ``data_prep/make_shards.py``: arguments, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import sys

from fatscale.prep.encode import DEFAULT_QUALITY
from fatscale.prep.errors import PROG, RESUME, Detached, MakeShardsError, RunStopped
from fatscale.prep.make import make_shards
from fatscale.prep.slurm import SlurmOptions
from fatscale.prep.verify import verify_shards

# sbatch options passed on as they are, with an example for --help
SLURM_NAMES = {"partition": "cpu", "time": "4:00:00", "account": "myproject", "qos": "normal", "mem": "32G",
               "constraint": "ssd"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Turn an ImageNet-style tree (SRC/train/<class>/*.JPEG, SRC/val/...) into "
                    "WebDataset tar shards with DALI index files and a manifest.json.")
    ap.add_argument("--src", metavar="DIR", help="dataset root holding train/ and/or val/")
    ap.add_argument("--out", metavar="DIR", help="output directory for shards, index files and manifest.json")
    ap.add_argument("--verify", metavar="SHARD_DIR", help="re-read every shard of SHARD_DIR against its manifest")
    ap.add_argument("--splits", metavar="NAMES",
                    help="comma-separated subdirectories of SRC to shard (default: train,val, those present)")
    ap.add_argument("--val-labels", metavar="FILE",
                    help="labels for a flat val/ (Kaggle LOC_val_solution.csv, or 'FILENAME WNID-or-INDEX' lines)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (default 0)")
    ap.add_argument("--shard-size-mb", type=float, default=1000,
                    help="target shard size in MB (1e6 bytes); 0: no size bound (default 1000)")
    ap.add_argument("--samples-per-shard", type=int, help="also cap the samples per shard")
    ap.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds N pixels to N")
    ap.add_argument("--quality", type=int, help=f"re-encode every image at JPEG quality Q "
                                                f"(default: pass through; {DEFAULT_QUALITY} where re-encoding is needed)")
    ap.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    ap.add_argument("--decode-check", action="store_true",
                    help="also fully decode every pass-through JPEG with Pillow (slower)")
    ap.add_argument("--fsync", action="store_true",
                    help="fsync every shard before renaming it into place (survives power loss, "
                         "costs disk bandwidth)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    slurm = ap.add_argument_group(
        "on a Slurm cluster", "build the shards as one job array of N tasks (same result as a local run); "
                              "Ctrl-C leaves the array running, the same command re-attaches, and after a "
                              "failure builds only the missing shards")
    slurm.add_argument("--slurm-tasks", type=int, metavar="N", help="tasks of the job array")
    slurm.add_argument("--cpus-per-task", type=int, metavar="C",
                       help="CPUs of each task, each one a worker process (default 1)")
    for name, example in SLURM_NAMES.items():
        slurm.add_argument(f"--{name}", metavar=name.upper(), help=f"sbatch's --{name} (e.g. {example})")
    return ap


def slurm_options(a: argparse.Namespace) -> SlurmOptions | None:
    """The Slurm options given; an sbatch option without --slurm-tasks is an error."""
    given = {n: getattr(a, n) for n in ("cpus_per_task", *SLURM_NAMES) if getattr(a, n) is not None}
    if a.slurm_tasks is None:
        if given:
            raise MakeShardsError(f"--{next(iter(given)).replace('_', '-')} is an option of --slurm-tasks, "
                                  f"which is not given")
        return None
    return SlurmOptions(a.slurm_tasks, **given)


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        slurm = slurm_options(a)
        if a.verify:
            if a.src or a.out or slurm:
                ap.error("--verify takes no --src/--out/--slurm-tasks")
            problems = verify_shards(a.verify, workers=a.workers, progress=not a.quiet)
            sys.exit(1 if problems else 0)
        if not a.src or not a.out:
            ap.error("--src and --out are required (or --verify SHARD_DIR)")
        splits = [s for s in a.splits.split(",") if s] if a.splits else None
        make_shards(a.src, a.out, splits=splits, val_labels=a.val_labels, seed=a.seed,
                    shard_size_mb=a.shard_size_mb, samples_per_shard=a.samples_per_shard,
                    max_side=a.max_side, quality=a.quality, workers=a.workers,
                    decode_check=a.decode_check, fsync=a.fsync, progress=not a.quiet,
                    slurm=slurm)
    except MakeShardsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Detached as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {RESUME}", file=sys.stderr)
        sys.exit(130)
