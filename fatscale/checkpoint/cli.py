"""Check every checkpoint of a run against its seal.

    python -m fatscale.checkpoint verify OUTPUT_DIR      (installed: fatscale-checkpoint verify OUTPUT_DIR)

``verify`` prints one line per checkpoint directory, oldest first: ``good``, ``damaged`` (naming
the file and what is wrong), ``unverifiable`` (sealed without checksums by an older fatscale) or
``unsealed`` (a save in progress or cut short). Exit status: 0 when the newest sealed checkpoint is
good or unverifiable (a resume starts from it), 2 when it is damaged but an older one is not (a
resume falls back to that one), 1 when none is usable or there is none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fatscale.checkpoint.layout import Verdict, checkpoint_folders, sealed_tags, verify


def _describe(verdict: Verdict) -> str:
    if not verdict.good:
        return f"damaged: {verdict.damage}"
    return "good" if verdict.checksummed else "unverifiable: sealed without checksums by an older fatscale"


def verify_output_dir(output_dir: Path) -> int:
    """``verify``: one line per checkpoint directory, oldest first; the exit status."""
    checkpoint_dir = output_dir / "checkpoints"
    folders = checkpoint_folders(checkpoint_dir)
    if not folders:
        print(f"{checkpoint_dir}: no checkpoint", file=sys.stderr)
        return 1
    sealed = sealed_tags(checkpoint_dir)
    verdicts = {tag: verify(checkpoint_dir, tag) for tag in sealed}
    for name in folders:
        state = _describe(verdicts[name]) if name in verdicts else "unsealed (a save in progress or cut short)"
        print(f"{name}  {state}")
    usable = [tag for tag in sealed if verdicts[tag].good]
    return 1 if not usable else 0 if usable[0] == sealed[0] else 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fatscale.checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify_parser = commands.add_parser("verify", help="check every checkpoint of OUTPUT_DIR against its seal",
                                        description=__doc__.split("\n\n")[-1].replace("``", ""))
    verify_parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    args = parser.parse_args(argv)
    sys.exit(verify_output_dir(args.output_dir))
