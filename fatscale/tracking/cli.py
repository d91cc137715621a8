"""``python -m fatscale.tracking sync OUTPUT_DIR``: delivers a run's spill file by hand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter, deque
from pathlib import Path

from fatscale.tracking.client import brief, connect, create_run, retryable
from fatscale.tracking.records import Terminate, head
from fatscale.tracking.sender import Sender
from fatscale.tracking.spill import SPILL_FILE, Spill
from fatscale.tracking.tags import REJECTED_TAG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fatscale.tracking",
                                     description="MLflow records a training run could not deliver (see fatscale/tracking/spill.py).")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser(
        "sync", help="deliver a run's spill file to MLflow",
        description=f"Deliver OUTPUT_DIR/{SPILL_FILE} to its MLflow run (created if it never was), set the "
                    "run's recorded terminal status, remove the file, print one line. Exits 1, keeping the file, "
                    "if MLflow cannot be reached; run it again then: nothing is shown twice.")
    sync.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path,
                      help=f"the run's output directory (or the spill file itself, if not named {SPILL_FILE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")  # the sender's rejections
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our one line names the run
    code, line = _sync(args.output_dir)
    print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _sync(path: Path) -> tuple[int, str]:
    """Exit status and the line to print."""
    if not path.exists():
        return 1, f"no such output directory or spill file: {path}"
    if path.is_dir():
        path = path / SPILL_FILE
    spill = Spill.read(path)
    if spill is None:
        return 0, f"nothing to sync: no {path}"
    client, database = connect(spill.uri)
    sender = Sender(client, spill.rejected)
    try:
        if spill.run_id is None:
            spill = spill._replace(run_id=create_run(client, spill.experiment, spill.run_name, database))
            spill.write(path)  # a second try after a failure delivers to this run, not to a new one
        else:
            client.get_run(spill.run_id)  # not there (another server?): keep the file
        queue = deque(spill.replay(with_status=True))
        while queue:
            batch = head(queue)
            sender.send(spill.run_id, batch)
            for _ in batch:
                queue.popleft()
    except Exception as e:
        why = "unreachable" if retryable(e) else "cannot take the records"
        return 1, f"MLflow at {spill.uri} {why} ({brief(e)}); {path} kept: run this again"
    path.unlink()
    counts = Counter(record.kind for record in spill.records if not isinstance(record, Terminate))
    status = next((record.status for record in spill.records if isinstance(record, Terminate)), None)
    line = (f"synced {path} to MLflow run {spill.run_id} at {spill.uri}: "
            + ", ".join(f"{n} {kind}(s)" for kind, n in counts.items())
            + (f"; status {status}" if status else "")
            + (f"; {sender.rejected} record(s) rejected by MLflow, tagged {REJECTED_TAG}" if sender.rejected else ""))
    return 0, line
