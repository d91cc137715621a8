"""The checks' results, written as they are produced: OUT/results.jsonl holds one JSON record per
result (check, name, PASS|FAIL|SKIP, a readable figure, the numbers behind it), OUT/runs.jsonl one
record per check started and ended (by the suite). Appending a line and closing the file puts it
in the kernel's hands: a check killed a moment later keeps every line it wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path

RESULTS = "results.jsonl"
RUNS = "runs.jsonl"
STATUSES = ("PASS", "FAIL", "SKIP")


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    """The records of a .jsonl file; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Results:
    """One check's result writer."""

    def __init__(self, out: Path, check: str):
        self.path, self.check = out / RESULTS, check
        out.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, status: str | bool, figure: str = "", **data) -> bool:
        """Record and print one result (True/False: PASS/FAIL); returns whether it is not a FAIL."""
        if isinstance(status, bool):
            status = "PASS" if status else "FAIL"
        assert status in STATUSES, status
        print(f"RESULT {name} {status} {figure}".rstrip(), flush=True)
        append(self.path, dict(check=self.check, name=name, status=status, figure=figure, time=time.time(), **data))
        return status != "FAIL"


def latest(out: Path) -> dict[str, dict]:
    """The latest record of each result name (a rerun's replace the earlier ones)."""
    return {record["name"]: record for record in read(out / RESULTS)}


def finished_checks(out: Path) -> dict[str, dict]:
    """Each check's last end record whose outcome counts as done: it ran to its end (passed or
    failed); a check stopped (its time limit, a signal) is not done and runs again."""
    ends = {r["check"]: r for r in read(out / RUNS) if r.get("event") == "end"}
    return {check: r for check, r in ends.items() if r["outcome"] in ("done", "failed")}
