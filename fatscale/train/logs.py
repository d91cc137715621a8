"""Where the trainer's log records go: rank 0 shows fatscale's records and every warning on the
console and writes every record from INFO up to OUTPUT_DIR/train.log, once the run holds the
directory (records from before are kept until then); the other ranks show warnings only."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Rank 0's records from before it holds output_dir (DeepSpeed's compiler probes among them), for train.log.
_early_records: logging.handlers.MemoryHandler | None = None


def _console_filter(record: logging.LogRecord) -> bool:
    return record.name.startswith("fatscale") or record.levelno >= logging.WARNING


def setup_logging(rank: int) -> None:
    global _early_records
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.addFilter(_console_filter)
    handlers: list[logging.Handler] = [console]
    if rank == 0:
        _early_records = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        handlers.append(_early_records)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, format=LOG_FORMAT,
                        force=True)


def log_to_file(path: Path) -> None:
    """From now on every record also goes to ``path``, the ones kept since setup_logging first."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if _early_records is not None:
        _early_records.setTarget(handler)
        _early_records.flush()
        root.removeHandler(_early_records)
