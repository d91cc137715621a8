"""The command line of ``data_prep/make_shards.py``: arguments, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import sys

from fatscale.prep.encode import DEFAULT_QUALITY
from fatscale.prep.errors import PROG, RESUME, MakeShardsError, RunStopped
from fatscale.prep.make import make_shards
from fatscale.prep.verify import verify_shards


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
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        if a.verify:
            if a.src or a.out:
                ap.error("--verify takes no --src/--out")
            problems = verify_shards(a.verify, workers=a.workers, progress=not a.quiet)
            sys.exit(1 if problems else 0)
        if not a.src or not a.out:
            ap.error("--src and --out are required (or --verify SHARD_DIR)")
        splits = [s for s in a.splits.split(",") if s] if a.splits else None
        make_shards(a.src, a.out, splits=splits, val_labels=a.val_labels, seed=a.seed,
                    shard_size_mb=a.shard_size_mb, samples_per_shard=a.samples_per_shard,
                    max_side=a.max_side, quality=a.quality, workers=a.workers,
                    decode_check=a.decode_check, fsync=a.fsync, progress=not a.quiet)
    except MakeShardsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {RESUME}", file=sys.stderr)
        sys.exit(130)
