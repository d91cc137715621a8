"""The spill file: what a Tracker's ``close()`` could not deliver in time (written atomically).
The next Tracker given the same path (the resumed job's) delivers the file's records before its own
and then removes the file; ``python -m fatscale.tracking sync OUTPUT_DIR`` does it by hand and then
sets the terminal status recorded in the file. The file stays until all its records are in, so a
replay cut short (a crash, the server gone again) is redone from the start. That shows nothing
twice: MLflow's SQL store keeps one row for a re-sent identical metric point (key, value,
timestamp, step; the point keeps the timestamp it was logged with), an identical param or tag
changes nothing and an artifact is overwritten. (A file store, ``./mlruns``, would repeat the
re-sent points.)

Format: JSON lines (as Python's ``json`` writes them: NaN and Infinity stay as such). The first
line describes the run::

    {"kind": "spill", "version": 1, "uri": "http://...", "experiment": "...", "run_name": "...",
     "run_id": "..." or null (never created), "step": highest step logged or null,
     "rejected": records MLflow has rejected so far}

then one record a line (fatscale.tracking.records), in the order they were logged::

    {"kind": "metric", "key": "train/loss", "value": 0.5, "timestamp": 1700000000000, "step": 120}
    {"kind": "param", "key": "optim.lr", "value": "0.001"}
    {"kind": "tag", "key": "interrupted_at_step", "value": "120"}
    {"kind": "artifact", "path": "/abs/output_dir/train.log", "artifact_path": null}
    {"kind": "dataset", "name": "imagenet/train", "digest": "...", "source": "{...}", "schema": "{...}",
     "profile": "{...}", "context": "training"}
    {"kind": "model", "name": "...", "path": "/abs/output_dir/export/model_ema", "flavors": {...},
     "params": {...}, "step": 120, "metrics": [["top1_ema", 91.5, 1700000000000]],
     "registered_name": "..." or null, "description": "..."}
    {"kind": "terminate", "status": "KILLED"}                                       (last)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from fatscale.atomic import write_atomic
from fatscale.tracking.records import KINDS, Record, Tag, Terminate
from fatscale.tracking.tags import DELIVERED_LATE_TAG, SPILLED_AT_STEP_TAG

SPILL_FILE = "mlflow-spill.jsonl"  # its name in a run's output_dir, where `sync OUTPUT_DIR` looks
SPILL_VERSION = 1


def sync_command(spill_path: Path) -> str:
    """What a user runs to deliver ``spill_path`` by hand."""
    target = spill_path.parent if spill_path.name == SPILL_FILE else spill_path
    return f"python -m fatscale.tracking sync {target}"


class Spill(NamedTuple):
    """A spill file's content (format: module docstring)."""

    uri: str
    experiment: str
    run_name: str
    run_id: str | None
    step: int | None
    rejected: int
    records: list[Record]

    def write(self, path: Path) -> None:
        header = {"kind": "spill", "version": SPILL_VERSION, **self._asdict()}
        del header["records"]
        lines = [header, *({"kind": record.kind, **record._asdict()} for record in self.records)]
        write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines).encode())

    @classmethod
    def read(cls, path: Path) -> Spill | None:
        try:
            header, *lines = (json.loads(line) for line in path.read_text().splitlines())
        except FileNotFoundError:
            return None
        if header.get("kind") != "spill" or header.get("version") != SPILL_VERSION:
            raise ValueError(f"{path} is not a version {SPILL_VERSION} fatscale spill file")
        records = [KINDS[line.pop("kind")](**line) for line in lines]
        return cls(**{field: header[field] for field in cls._fields[:-1]}, records=records)

    def replay(self, with_status: bool) -> list[Record]:
        """The records to deliver, then the tags saying they came late; then the recorded terminal
        status if ``with_status`` (a resumed run is RUNNING again instead)."""
        data = [record for record in self.records if not isinstance(record, Terminate)]
        late = [Tag(DELIVERED_LATE_TAG, str(len(data)))]
        if self.step is not None:
            late.append(Tag(SPILLED_AT_STEP_TAG, str(self.step)))
        status = [record for record in self.records if isinstance(record, Terminate)] if with_status else []
        return data + late + status
