"""Building the shards as one Slurm job array (``--slurm-tasks N``), through submitit.

The submitting command scans and plans as a local run does (fatscale.prep.make) and gives the
shards still to build to N array tasks, task i every N-th of them. A task builds its share with
``run_tasks`` and ``--cpus-per-task`` worker processes and commits every shard as a local run
does (fatscale.prep.state): the output is byte-identical to a local run's. The command shows a
progress bar over the commit records until no task is queued or running any more; make.py then
writes the manifest. It is the submitting command that writes it, not the last task: it needs the
scan and the whole plan, which only the submitting command holds (a task gets its share alone),
and so it is written by the one code path of a local run.

``OUT/.make_shards/slurm/`` holds submitit's files (logs, pickles), ``array.json`` (the array's
job id and the shards of every task) and, from a task that failed, ``<job>_<task>_failure.json``
(its shard and the reason). While a task of the recorded array is queued or running, the same
command re-attaches to it (Ctrl-C detaches); once the array has ended, the same command submits a
new array for the shards still missing. submitit is imported only where a job is submitted or
asked about.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fatscale.atomic import write_json_atomic
from fatscale.prep.build import run_tasks
from fatscale.prep.errors import PROG, RESUME, Detached, MakeShardsError, RunStopped, quoted
from fatscale.prep.plan import ShardTask
from fatscale.prep.state import STATE_DIR, committed

SLURM_DIR = "slurm"  # inside STATE_DIR: submitit's files and ours
ARRAY_FILE = "array.json"
POLL_S = 1.0
ACCOUNTING_LAG_S = 30.0  # how long sacct may still call a task running that squeue no longer lists
_NAMES = ("partition", "account", "qos", "constraint")  # options that Slurm alone can check
_MEMORY = re.compile(r"\d+[KMGT]?", re.IGNORECASE)


@dataclass(frozen=True)
class SlurmOptions:
    """``--slurm-tasks`` and the sbatch options of every task of the array."""

    tasks: int
    cpus_per_task: int = 1
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    constraint: str | None = None

    def flags(self) -> str:
        """The options as the command line gave them, for messages."""
        given = {"slurm_tasks": self.tasks, **{k: v for k, v in asdict(self).items() if k != "tasks"}}
        return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None)

    def sbatch(self) -> dict:
        """The options given, as submitit's Slurm parameters (sbatch's names; --time in minutes,
        left out when it is not a time limit)."""
        from fatscale.config import slurm_minutes  # not for --help

        values = dict(asdict(self), time=slurm_minutes(self.time) if self.time else None)
        del values["tasks"]
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class Array:
    """A submitted job array: its job id and, for task i, the names of its shards."""

    job_id: str
    shares: list[list[str]]


def check_options(o: SlurmOptions) -> None:
    """One-line errors for values Slurm cannot take, then Slurm's own verdict on the array
    (``sbatch --test-only``): before the scan, which can take long, and before any submission."""
    sbatch = o.sbatch()
    if o.tasks < 1:
        raise MakeShardsError(f"--slurm-tasks must be >= 1, got {o.tasks}")
    if o.cpus_per_task < 1:
        raise MakeShardsError(f"--cpus-per-task must be >= 1, got {o.cpus_per_task}")
    if o.time is not None and "time" not in sbatch:
        raise MakeShardsError(f"--time {quoted(o.time)} is not a Slurm time limit (MINUTES, H:MM:SS, D-HH:MM:SS...)")
    if o.mem is not None and not _MEMORY.fullmatch(o.mem):
        raise MakeShardsError(f"--mem {quoted(o.mem)} is not a Slurm memory size (e.g. 16G, 4000M; 0: a whole node's)")
    for name in _NAMES:
        value = getattr(o, name)
        if value is not None and (not value or not value.isprintable() or any(c.isspace() for c in value)):
            raise MakeShardsError(f"--{name} {quoted(value)!r} is not a Slurm name (empty, or with spaces)")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sbatch.items()]
    try:
        r = subprocess.run(["sbatch", "--test-only", f"--array=0-{o.tasks - 1}", *flags, "--wrap", "true"],
                           capture_output=True, text=True)
    except FileNotFoundError:
        raise MakeShardsError("--slurm-tasks needs Slurm's sbatch, which is not on PATH here") from None
    if r.returncode:
        why = "; ".join(line.removeprefix("sbatch: error: ") for line in r.stderr.splitlines() if line.strip())
        raise MakeShardsError(f"Slurm refuses {o.flags()}: {why or f'sbatch exit status {r.returncode}'}")


# --- in the submitting command ---------------------------------------------------------------


def _folder(out: Path) -> Path:
    return (out / STATE_DIR / SLURM_DIR).resolve()


def _queued(job_id: str) -> list[str]:
    """The states of the array's tasks that Slurm still has queued or running; [] once all ended
    (or where there is no Slurm: a local run on a machine without it)."""
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    if r.returncode and "Invalid job id" not in r.stderr:  # squeue forgets a job a while after its end
        raise RunStopped(f"squeue cannot tell whether array job {job_id} still runs: "
                         f"{' '.join(r.stderr.split())}; {RESUME}")
    return r.stdout.split() if not r.returncode else []


def running_array(out: Path) -> Array | None:
    """The array recorded in OUT, while one of its tasks is queued or running."""
    try:
        array = Array(**json.loads((_folder(out) / ARRAY_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise MakeShardsError(f"{quoted(_folder(out) / ARRAY_FILE)} is unreadable ({e}); delete it "
                              f"once no make_shards job runs") from None
    return array if _queued(array.job_id) else None


def build_on_slurm(out: Path, todo: list[ShardTask], kept: int, o: SlurmOptions, array: Array | None,
                   progress: bool, log) -> Array | None:
    """Have ``todo`` built by a new array (or by ``array``, still running: re-attach) and watch it
    until it has ended; return it (None: nothing to build). Which shards it left unbuilt is for
    the caller to find (failure_line)."""
    if array is None:
        if not todo:
            return None
        array = _submit(out, todo, o)
        what = f"submitted array job {array.job_id}"
    else:
        what = f"re-attached to array job {array.job_id}, still running"
    if log:
        log(f"{PROG}: {what}: {len(array.shares)} task(s) for {len(todo)} shard(s); logs in {_folder(out)}; "
            f"Ctrl-C leaves it running, the same command re-attaches")
    _watch(out, array, todo, kept, progress)
    return array


def _submit(out: Path, todo: list[ShardTask], o: SlurmOptions) -> Array:
    import submitit

    n = min(o.tasks, len(todo))
    shares = [todo[i::n] for i in range(n)]
    executor = submitit.SlurmExecutor(folder=_folder(out))
    # submitit's time limit (5 min) when --time is not given: the partition's default instead.
    # srun: Slurm 22.05-23.02's does not inherit sbatch's --cpus-per-task (the task would get one).
    executor.update_parameters(**{"job_name": PROG, "nodes": 1, "ntasks_per_node": 1, "array_parallelism": n,
                                  "time": None, "srun_args": [f"--cpus-per-task={o.cpus_per_task}"], **o.sbatch()})
    # Ctrl-C waits until the array is recorded: a re-run would submit a second one otherwise
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        jobs = executor.map_array(build_share, shares, [o.cpus_per_task] * n)
        array = Array(jobs[0].job_id.split("_")[0], [[t.name for t in share] for share in shares])
        write_json_atomic(_folder(out) / ARRAY_FILE, asdict(array))
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise Detached(_detached(array))
    return array


def _detached(array: Array) -> str:
    return (f"detached; array job {array.job_id} goes on (squeue -j {array.job_id}); "
            f"run the same command again to re-attach")


def _watch(out: Path, array: Array, todo: list[ShardTask], kept: int, progress: bool) -> None:
    """A progress bar over every planned shard until no task of ``array`` is queued or running."""
    from tqdm import tqdm

    waiting = {t.name: t for t in todo}
    bar = tqdm(total=kept + len(todo), initial=kept, unit="shard", desc=PROG, disable=not progress,
               mininterval=0.5, dynamic_ncols=True)
    t0, images = time.perf_counter(), 0
    try:
        while True:
            states = _queued(array.job_id)  # before counting: the last count sees every shard committed
            done = _newly_committed(out, waiting)
            images += sum(len(t.samples) for t in done)
            bar.set_postfix_str(f"{images / (time.perf_counter() - t0):.0f} img/s, tasks: "
                                f"{states.count('RUNNING')} running, {states.count('PENDING')} pending", refresh=False)
            bar.update(len(done))
            if not states:
                return
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        raise Detached(_detached(array)) from None
    finally:
        bar.close()


def _newly_committed(out: Path, waiting: dict[str, ShardTask]) -> list[ShardTask]:
    """The shards of ``waiting`` committed by now, taken out of it."""
    present = set(os.listdir(out / STATE_DIR))
    records, _ = committed(out, [t for name, t in waiting.items() if f"{name}.json" in present])
    return [waiting.pop(name) for name in records]


def failure_line(out: Path, array: Array, missing: list[ShardTask]) -> str:
    """The one line for shards ``array`` ended without: the first task that left some, the shard it
    stopped at and why (its note, else its Slurm state and log)."""
    names = {t.name for t in missing}
    failed = [(i, [n for n in share if n in names]) for i, share in enumerate(array.shares)]
    failed = [(i, left) for i, left in failed if left]
    if not failed:  # shards that went missing while the array ran
        return f"{len(missing)} shard(s), e.g. {missing[0].name}, are missing after array job {array.job_id}; {RESUME}"
    (i, left), others = failed[0], len(failed) - 1
    job_id = f"{array.job_id}_{i}"
    task = f"task {i} (job {job_id}{f'; {others} other task(s) failed too' if others else ''})"
    try:
        note = json.loads(_note_path(_folder(out), job_id).read_text())
        return f"{task} stopped at shard {note['shard'] or left[0]}: {note['reason']}"
    except (OSError, ValueError, KeyError):
        pass
    state, log = _ended_state(_folder(out), job_id)
    return (f"{task} ended {state} with shard {left[0]} and {len(left) - 1} more of its {len(array.shares[i])} "
            f"unbuilt (log: {log}); {RESUME}")


def _ended_state(folder: Path, job_id: str) -> tuple[str, Path]:
    """A task's final state in Slurm's accounting, and its log of errors."""
    import submitit

    job = submitit.SlurmJob(folder=folder, job_id=job_id)
    deadline = time.monotonic() + ACCOUNTING_LAG_S
    while not job.watcher.is_done(job_id, mode="force") and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return job.watcher.get_state(job_id, mode="cache").split()[0], job.paths.stderr


# --- in an array task ------------------------------------------------------------------------


def _note_path(folder: Path, job_id: str) -> Path:
    return folder / f"{job_id}_failure.json"


def build_share(shards: list[ShardTask], workers: int) -> None:
    """One array task: build those of ``shards`` not committed yet (a requeued task resumes) with
    ``workers`` processes. A failure leaves a note naming the shard and the reason, for the
    submitting command's one line."""
    import submitit

    t0 = time.perf_counter()
    out = Path(shards[0].out_dir)
    _, todo = committed(out, shards)
    images = sum(len(t.samples) for t in todo)
    try:
        run_tasks(todo, workers, images, progress=False, records={})
    except RunStopped as e:  # anything else (a bug, the time limit): the command gives the state and the log
        with contextlib.suppress(OSError):  # a full disk: the same
            write_json_atomic(_note_path(_folder(out), submitit.JobEnvironment().job_id),
                              {"shard": e.shard, "reason": str(e)}, fsync=False)
        raise
    print(f"{PROG}: built {len(todo)} of this task's {len(shards)} shard(s), {images} images, with {workers} "
          f"worker process(es) in {time.perf_counter() - t0:.1f} s", flush=True)
