"""The sample ledger: which samples made each optimizer step of the weights (``train.sample_log``).

Each rank appends one JSON line per optimizer step to ``OUTPUT_DIR/samples/rank-R.jsonl``:
``{"step": s, "epoch": e, "keys": [...]}``, the shard ``__key__`` of every sample it trained on in
that step, in the order of its micro-batches. A resumed run first cuts every rank's file back to
the checkpoint's step (also the files of ranks the new world no longer has, and a line half
written when a rank was killed), so the ledger always says exactly which samples made each step of
the weights, whatever the number of ranks of each session.

    python -m fatscale.data.ledger OUTPUT_DIR --step S

prints the global batch of step ``S`` as one JSON line (``keys``: every rank's, in rank order).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FOLDER = "samples"
_STEP = re.compile(rb'^\{"step": (\d+),')


def rank_files(output_dir: Path) -> list[Path]:
    """Every rank's file, in rank order."""
    return sorted((Path(output_dir) / FOLDER).glob("rank-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))


class SampleLedger:
    """This rank's file, appended to."""

    def __init__(self, output_dir: Path, rank: int):
        folder = Path(output_dir) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank-{rank}.jsonl", "a", encoding="utf-8")

    def record(self, step: int, epoch: int, keys: list[str]) -> None:
        # Flushed, not synced: a line lost to a crash belongs to a step after the last checkpoint.
        self.file.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def cut_back(output_dir: Path, step: int) -> None:
    """Every rank file keeps the complete lines of steps up to ``step`` (steps only grow in a file)."""
    for path in rank_files(output_dir):
        keep = 0
        with open(path, "rb") as f:
            for line in f:
                match = _STEP.match(line)
                if not (line.endswith(b"\n") and match and int(match.group(1)) <= step):
                    break
                keep += len(line)
        with open(path, "r+b") as f:
            f.truncate(keep)


def step_batch(output_dir: Path, step: int) -> dict:
    """The global batch of ``step``: its epoch, and every rank's keys in rank order."""
    keys, epoch, ranks = [], None, 0
    for path in rank_files(output_dir):
        with open(path, "rb") as f:
            for line in f:
                match = _STEP.match(line)
                if match and int(match.group(1)) == step:
                    entry = json.loads(line)
                    epoch, ranks = entry["epoch"], ranks + 1
                    keys += entry["keys"]
                    break
    if not ranks:
        raise LookupError(f"{Path(output_dir) / FOLDER}: no rank recorded step {step}")
    return {"step": step, "epoch": epoch, "ranks": ranks, "keys": keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fatscale.data.ledger",
                                     description="The samples of an optimizer step, from a run's sample ledger "
                                                 "(train.sample_log: true).")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--step", type=int, required=True, help="the optimizer step (from 1)")
    args = parser.parse_args(argv)
    if not rank_files(args.output_dir):
        sys.exit(f"error: {args.output_dir / FOLDER} holds no ledger (train.sample_log: true writes it)")
    try:
        print(json.dumps(step_batch(args.output_dir, args.step)))
    except LookupError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
