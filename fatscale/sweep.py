"""Sweeps: one recipe trained at several points (values of some of its keys), as one Slurm job array.

    python launch/slurm.py RECIPE --sweep optim.lr=2.5e-4,5e-4 --sweep model.name=fat_b0,fat_b1 [--max-parallel N]
    python launch/slurm.py RECIPE --sweep-file grid.yaml        # a list of points: [{optim.lr: 5e-4, ...}, ...]
    python launch/slurm.py --status SWEEP_DIR

``--sweep KEY=V1,V2,...`` values are YAML (``[V1,V2,...]`` as a flow list); the points are the
product of the ``--sweep`` lists, or the mappings a ``--sweep-file`` lists. The sweep's directory
is the recipe's ``output_dir``::

    sweep.json          the points, where MLflow is and the parent run (written at submission)
    summary.csv         one row per point; also the parent run's artifact
    slurm/              submitit's folder: the array's scripts, pickles and logs (ARRAY_TASK_0_log.out)
    NAME/               a point's output_dir, as a single run has it (checkpoints, train.log, ...)
    NAME/slurm/job_id   the point's last job (ARRAY_TASK), which pre-flight checks look up
    NAME/result.json    the point's final top-1 summary, written when it finished
    mlflow.db           the default tracking store (no tracking.uri): the parent and every point's run

NAME is ``key=value,key=value`` made filesystem-safe. A point's MLflow run is a single run's, with
MLflow's ``mlflow.parentRunId`` tag naming the sweep's parent run (its grid as params). The parent's
summary (summary.csv, the best point's top-1 as its ``top1``) is updated by each point's rank 0
when the point finishes, under a lock on the sweep directory, and by ``--status``; a tracking
server that is away costs a warning, never a point.

Only light modules here (no torch, no mlflow until the parent run is touched): the launcher imports
this for ``--help`` and ``--status``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import itertools
import json
import logging
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from fatscale.checkpoint import layout as ckpt
from fatscale.atomic import write_atomic
from fatscale.tracking.tags import NOTE_TAG

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.csv"
RESULT_FILE = "result.json"
LOCK_FILE = ".sweep.lock"
NOT_SUBMITTED = "NOT_SUBMITTED"
FINISHED = "FINISHED"
# Keys every point shares: the points are one job array (one slurm section) under one parent run
# in one directory.
SHARED_KEYS = ("slurm.", "tracking.", "output_dir")
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
MAX_NAME = 200  # characters of a point's directory name (file systems allow 255 bytes)
# PyYAML reads YAML 1.1, where a float needs a dot: 5e-4 would be the string "5e-4".
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
SUMMARY_TIMEOUT_S = 60.0  # a point's update of the parent run, at its end


class SweepError(ValueError):
    """A sweep that cannot be submitted (one-line message naming the flag, key or point)."""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _yaml_value(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value) else value


class Point(NamedTuple):
    """One point of a sweep: recipe key -> value (YAML's, 5e-4 a number)."""

    values: dict[str, Any]

    @property
    def name(self) -> str:
        """Its directory (and MLflow run) name: ``key=value,...``, filesystem-safe; numbers as Python
        writes them, so that 5e-4 and 0.0005 are one point."""
        name = _UNSAFE.sub("_", ",".join(f"{key}={_text(value)}" for key, value in self.values.items()))
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 13]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
        return name

    @property
    def overrides(self) -> list[str]:
        """Its values as ``--set`` overrides."""
        return [f"{key}={json.dumps(value)}" for key, value in self.values.items()]


def _check_key(key: str, where: str) -> None:
    if key.startswith(SHARED_KEYS):
        raise SweepError(f"{where}: {key!r} cannot differ between points (one job array, one parent run, one "
                         f"directory): set slurm.*, tracking.* and output_dir for all points, with --set or flags")


def grid(specs: list[str]) -> list[Point]:
    """The points of ``--sweep KEY=V1,V2,...`` flags: the product of their values."""
    axes: dict[str, list] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        try:
            values = yaml.safe_load(f"[{text}]") if key and sep and text.strip() else None
        except yaml.YAMLError:
            values = None
        if not values:
            raise SweepError(f"--sweep {spec}: expected KEY=VALUE,VALUE,... (YAML values)")
        _check_key(key, f"--sweep {spec}")
        if key in axes:
            raise SweepError(f"--sweep {key}: given twice; list all its values in one --sweep")
        axes[key] = [_yaml_value(value) for value in values]
        if len({_text(v) for v in axes[key]}) < len(values):
            raise SweepError(f"--sweep {spec}: a value is listed twice")
    return [Point(dict(zip(axes, values))) for values in itertools.product(*axes.values())]


def listed(path: str | Path) -> list[Point]:
    """The points a ``--sweep-file`` lists: a YAML list of mappings ``{recipe.key: value, ...}``."""
    where = f"--sweep-file {path}"
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SweepError(f"{where}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not (isinstance(raw, list) and raw and all(isinstance(p, dict) and p for p in raw)):
        raise SweepError(f"{where}: expected a list of points, each a mapping of recipe keys to values "
                         "(e.g. - {optim.lr: 5e-4, model.name: fat_b0})")
    for point in raw:
        for key in point:
            _check_key(str(key), where)
    return [Point({str(k): _yaml_value(v) for k, v in point.items()}) for point in raw]


def check_names(points: list[Point]) -> None:
    """Every point has a directory of its own."""
    seen: dict[str, Point] = {}
    for point in points:
        if point.name in seen:
            raise SweepError(f"points {seen[point.name].values} and {point.values} would share the directory "
                             f"{point.name}: list each point once")
        seen[point.name] = point


# ---------------------------------------------------------------- the sweep's record (sweep.json)


@dataclass
class Sweep:
    recipe: str  # the recipe file it was submitted from
    points: list[Point]
    uri: str  # MLflow: where the parent and the points log
    experiment: str
    run_name: str  # the parent run's name, and the first part of each point's
    parent_run_id: str | None = None
    grid: dict[str, list] = field(default_factory=dict)  # key -> its values over the points

    def point_dir(self, sweep_dir: Path, point: Point) -> Path:
        return sweep_dir / point.name

    def point_run_name(self, point: Point) -> str:
        # MLflow refuses "." (and "/", ":", "%", quotes) in the names of the models a run logs, which
        # the trainer derives from the run name.
        return f"{self.run_name}-{point.name}".replace(".", "_")


def new_sweep(recipe: str, points: list[Point], uri: str, experiment: str, run_name: str) -> Sweep:
    axes: dict[str, list] = {}
    for point in points:
        for key, value in point.values.items():
            if value not in axes.setdefault(key, []):
                axes[key].append(value)
    return Sweep(recipe, points, uri, experiment, run_name, grid=axes)


def load(sweep_dir: Path) -> Sweep | None:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return Sweep(**{**raw, "points": [Point(values) for values in raw["points"]]})


def save(sweep_dir: Path, sweep: Sweep) -> None:
    raw = asdict(sweep)
    raw["points"] = [point.values for point in sweep.points]
    write_atomic(Path(sweep_dir) / SWEEP_FILE, (json.dumps(raw, indent=1) + "\n").encode())


@contextlib.contextmanager
def locked(sweep_dir: Path) -> Iterator[None]:
    """The sweep directory's lock, held by whoever rewrites sweep.json or the summary (points
    finishing at once, --status). POSIX locks: they hold over NFS too."""
    with open(Path(sweep_dir) / LOCK_FILE, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def same_points(recorded: Sweep, points: list[Point], sweep_dir: Path) -> None:
    """A sweep submitted again must be the same sweep: its parent run's grid stays true."""
    if sorted(p.name for p in recorded.points) != sorted(p.name for p in points):
        raise SweepError(f"output_dir {sweep_dir} holds another sweep ({len(recorded.points)} points, grid "
                         f"{recorded.grid}): submit the same points to continue it, or choose another output_dir "
                         f"(--set output_dir=...)")


# ---------------------------------------------------------------- where each point is


def queued_jobs(job_ids: list[str]) -> dict[str, str]:
    """Those of ``job_ids`` (ARRAY_TASK for an array's) still in Slurm's queue: pending, running,
    completing, requeued...: job id -> state. (squeue answers nothing for the ended ones.)"""
    if not job_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T"], capture_output=True,
                         text=True, timeout=60).stdout
    return dict(line.split("|", 1) for line in out.split())


def ended_jobs(job_ids: list[str]) -> dict[str, str]:
    """Slurm's accounting of ``job_ids``: job id -> state (CANCELLED, FAILED, TIMEOUT, ...)."""
    if not job_ids:
        return {}
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"],
                         capture_output=True, text=True, timeout=60).stdout
    return {job: state.split()[0] for job, state in (line.split("|", 1) for line in out.split("\n") if "|" in line)}


def job_file(output_dir: str | Path) -> Path:
    """Where the launcher writes the id of the last job that trains into ``output_dir``."""
    return Path(output_dir) / "slurm" / "job_id"


class PointStatus(NamedTuple):
    point: Point
    state: str  # FINISHED, the Slurm state of its last job (PENDING, RUNNING, CANCELLED, ...) or NOT_SUBMITTED
    job_id: str | None
    epoch: int | None  # of its newest checkpoint
    step: int | None
    top1: float | None  # final when FINISHED, else the best evaluation so far
    device_hours: float | None
    run_id: str | None  # its MLflow run
    queued: bool  # its job is in Slurm's queue (pending, running, requeued, ...)


def point_statuses(sweep: Sweep, sweep_dir: Path) -> list[PointStatus]:
    folders = [sweep.point_dir(sweep_dir, point) for point in sweep.points]
    job_ids = [job_file(folder).read_text().strip() if job_file(folder).exists() else None for folder in folders]
    queued = queued_jobs([job for job in job_ids if job])
    ended = ended_jobs([job for job in job_ids if job and job not in queued])
    statuses = []
    for point, folder, job_id in zip(sweep.points, folders, job_ids):
        result = folder / RESULT_FILE
        progress = _progress(folder)
        top1 = json.loads(result.read_text())["top1"] if result.exists() else progress.get("best_top1")
        statuses.append(PointStatus(
            point, _state(result.exists(), job_id, queued, ended), job_id, progress.get("epoch"), progress.get("global_step"),
            top1 if top1 is not None and top1 >= 0 else None,
            progress["device_s"] / 3600 if "device_s" in progress else None,
            progress.get("mlflow_run_id"), job_id in queued))
    return statuses


def _state(finished: bool, job_id: str | None, queued: dict[str, str], ended: dict[str, str]) -> str:
    if finished:
        return FINISHED
    if job_id is None:
        return NOT_SUBMITTED
    return queued.get(job_id) or ended.get(job_id, "UNKNOWN")  # UNKNOWN: not in accounting (yet)


def _progress(output_dir: Path) -> dict:
    """The newest sealed checkpoint's progress record ({} before the first)."""
    tags = ckpt.sealed_tags(output_dir / "checkpoints")
    return ckpt.read_json(output_dir / "checkpoints" / tags[0] / "progress.json") if tags else {}


def _show(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def status_lines(statuses: list[PointStatus]) -> list[str]:
    """A header, one line per point (its values, state, epoch, top-1, device-hours), the best point."""
    rows = [["point", "state", "job", "epoch", "step", "top1", "device_h"]]
    rows += [[" ".join(f"{k}={_text(v)}" for k, v in s.point.values.items()), s.state, s.job_id or "-",
              _show(s.epoch, 0), _show(s.step, 0), _show(s.top1, 2), _show(s.device_hours, 3)] for s in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    best = best_point(statuses)
    finished = sum(s.state == FINISHED for s in statuses)
    lines.append(f"{finished} of {len(statuses)} points finished" +
                 (f"; best: {best.point.name} top-1 {best.top1:.2f} (MLflow run {best.run_id})" if best else ""))
    return lines


def best_point(statuses: list[PointStatus]) -> PointStatus | None:
    finished = [s for s in statuses if s.state == FINISHED and s.top1 is not None]
    return max(finished, key=lambda s: s.top1, default=None)


def summary_csv(statuses: list[PointStatus], sweep: Sweep) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["point", *sweep.grid, "state", "job_id", "epoch", "step", "top1", "device_hours", "run_id"])
    for s in statuses:
        writer.writerow([s.point.name, *(_text(s.point.values.get(key, "")) for key in sweep.grid), s.state,
                         s.job_id or "", *("" if v is None else v for v in (s.epoch, s.step, s.top1, s.device_hours)),
                         s.run_id or ""])
    return out.getvalue()


# ---------------------------------------------------------------- the parent run


def parent_params(sweep: Sweep) -> dict[str, str]:
    return {"points": str(len(sweep.points)), **{key: _text(values) for key, values in sweep.grid.items()}}


def ensure_parent_run(sweep: Sweep, sweep_dir: Path) -> str:
    """The sweep's parent run, created (and recorded in sweep.json) if it is not yet; the caller
    holds the lock. Raises what MLflow raises."""
    if sweep.parent_run_id is None:
        from fatscale.tracking.runs import create_parent_run

        sweep.parent_run_id = create_parent_run(
            sweep.uri, sweep.experiment, sweep.run_name, parent_params(sweep),
            {"fatscale.sweep_dir": str(sweep_dir),
             NOTE_TAG: f"sweep of {len(sweep.points)} points over {', '.join(sweep.grid)}: "
                                    f"python launch/slurm.py --status {sweep_dir}"})
        save(sweep_dir, sweep)
    return sweep.parent_run_id


def update_summary(sweep_dir: Path) -> list[PointStatus]:
    """summary.csv and the parent run (created if needed): its summary artifact, the best point's
    top-1, its points' runs tagged as its children, FINISHED once every point is. Returns the
    statuses; raises what MLflow raises (summary.csv is written before)."""
    from fatscale.tracking.runs import update_parent_run

    sweep_dir = Path(sweep_dir)
    with locked(sweep_dir):
        sweep = load(sweep_dir)
        statuses = point_statuses(sweep, sweep_dir)
        summary = sweep_dir / SUMMARY_FILE
        write_atomic(summary, summary_csv(statuses, sweep).encode())
        best = best_point(statuses)
        update_parent_run(sweep.uri, ensure_parent_run(sweep, sweep_dir), [s.run_id for s in statuses if s.run_id],
                          summary, None if best is None else best.top1,
                          {} if best is None else {"best_point": best.point.name, "best_run_id": best.run_id or ""},
                          finished=all(s.state == FINISHED for s in statuses))
    return statuses


def describe(error: BaseException) -> str:
    """An error in one line, for a warning."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def try_update_summary(sweep_dir: Path, timeout: float = SUMMARY_TIMEOUT_S) -> str | None:
    """update_summary within ``timeout`` s, never raising: a warning when it did not get through
    (a tracking server away or hanging). The next point to finish, or --status, does it again."""
    outcome: list[BaseException | None] = []

    def update() -> None:
        try:
            update_summary(sweep_dir)
            outcome.append(None)
        except Exception as e:  # MLflow away, Slurm's commands failing: the summary waits for the next update
            outcome.append(e)

    worker = threading.Thread(target=update, name="sweep-summary", daemon=True)
    worker.start()
    worker.join(timeout)
    if outcome and outcome[0] is None:
        return None
    why = describe(outcome[0]) if outcome else f"no answer within {timeout:g} s"
    return (f"sweep {sweep_dir}: the MLflow parent run's summary was not updated ({why}); "
            f"`python launch/slurm.py --status {sweep_dir}` updates it")


# ---------------------------------------------------------------- for the job (fatscale.job)


def parent_run_id(sweep_dir: str | Path) -> str | None:
    sweep = load(Path(sweep_dir))
    return None if sweep is None else sweep.parent_run_id


def point_finished(sweep_dir: str | Path, output_dir: str | Path, summary: dict) -> None:
    """A point's rank 0, after its training finished: its result, then the parent's summary (a
    warning if MLflow is away: the point is done all the same)."""
    write_atomic(Path(output_dir) / RESULT_FILE, (json.dumps(summary) + "\n").encode())
    warning = try_update_summary(Path(sweep_dir))
    if warning:
        log.warning("%s", warning)
