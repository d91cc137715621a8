"""Building shards: one shard per task, by this process and ``--workers - 1`` child processes.

The unit of parallel work is a whole shard (forkserver, else spawn: nothing is inherited,
everything is pickled). A worker reads, checks, (re-)encodes and writes its shard under a
temporary name, renames the index and then the tar into place, and last writes the shard's
commit record (fatscale.prep.state). Image bytes never cross a process boundary: on the 2-core
build machine the pickling and pipe copies of a per-image pool plus a single writer would cost
about as much as ``tar cf`` of the same files takes in total.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fatscale.atomic import replacing, write_atomic
from fatscale.data.shard_format import ShardWriter
from fatscale.prep.encode import SkipSample, load_sample
from fatscale.prep.errors import PROG, RESUME, RunStopped, one_line, quoted
from fatscale.prep.plan import ShardTask
from fatscale.prep.state import write_record

Report = Callable[[int, int], None]  # (files done, source bytes read) since the last call
OnShard = Callable[[dict], None]  # called in the main process with each committed shard's record


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mp_context():
    """forkserver where there is one (workers fork from a server that imported fatscale.prep once,
    ~1 s sooner than spawn's per-worker imports on 2 cores), else spawn. Both pickle everything
    they pass, so the code stays spawn-safe."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["fatscale.prep"])
    return ctx


# --- one shard -------------------------------------------------------------------------------


class _Tally:
    """One shard's progress, passed on to ``report`` at most every 0.2 s."""

    def __init__(self, report: Report):
        self.report, self.files, self.bytes, self.last = report, 0, 0, time.monotonic()

    def add(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last > 0.2:
            self.flush()
            self.last = now

    def flush(self) -> None:
        self.report(self.files, self.bytes)
        self.files = self.bytes = 0


class _NoSamples(Exception):
    """Every file of the shard was skipped: no shard file at all."""


def _sample_json(meta: dict) -> bytes:
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a file name that is not UTF-8: JSON's \udcXX escapes keep its bytes
        return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def build_shard(task: ShardTask, report: Report | None = None) -> dict:
    """Write one shard (tar + idx, atomically) and its commit record; return the record.

    Source files go through load_sample's boundary. Failing to write the output (disk full,
    quota) is no file's fault either: RunStopped, and the shard is redone by a re-run.
    """
    try:
        return _build_shard(task, report or _queue_report)
    except RunStopped as e:
        e.shard = task.name
        raise
    except OSError as e:
        raise RunStopped(f"cannot write {task.name} in {quoted(task.out_dir)}: "
                         f"{e.strerror or one_line(e)}; {RESUME}", task.name) from e


def _write_samples(task: ShardTask, w: ShardWriter, tally: _Tally) -> tuple[list[dict], Counter]:
    """Every file of ``task`` into ``w``; returns the skipped files and the changes made."""
    skipped, changes = [], Counter()
    for s in task.samples:
        _note_current(s.path)
        try:
            data, jpg, width, height, what = load_sample(s.path, task.opts)
        except SkipSample as e:
            skipped.append({"path": f"{task.split}/{s.rel}", "reason": str(e)})
            tally.add(0)
            continue
        meta = {"wnid": task.classes_of[s.label], "source": s.rel, "width": width,
                "height": height, "changes": what}
        changes.update(what)
        w.write(s.key, (("cls", b"%d" % s.label), ("jpg", jpg), ("json", _sample_json(meta))))
        tally.add(len(data))
    _note_current("")
    return skipped, changes


def _build_shard(task: ShardTask, report: Report) -> dict:
    out = Path(task.out_dir)
    tar_path, idx_path = out / f"{task.name}.tar", out / f"{task.name}.idx"
    fsync = task.opts.fsync
    tally = _Tally(report)
    try:
        with replacing(tar_path, fsync) as tmp_tar, ShardWriter(tmp_tar) as w:
            skipped, changes = _write_samples(task, w, tally)
            w.finish()
            record = {"name": task.name, "digest": task.digest, "num_samples": w.num_samples,
                      "skipped": skipped, "changes": dict(sorted(changes.items()))}
            if not w.num_samples:
                raise _NoSamples
            # the index first: a tar in place always has its index
            write_atomic(idx_path, w.index_text().encode("ascii"), fsync)
        record.update(path=tar_path.name, index=idx_path.name, bytes=w.offset,
                      index_bytes=idx_path.stat().st_size, sha256=w.sha.hexdigest())
    except _NoSamples:
        for p in (tar_path, idx_path):
            p.unlink(missing_ok=True)
    write_record(out, record, fsync)
    tally.flush()
    return record


# --- in a child process ----------------------------------------------------------------------

_progress_queue = None
_current_file = None  # in a worker: shared memory naming the file it is on, read by the parent


def _note_current(path: str) -> None:
    """Name the file this worker is on: a worker that gets killed is reported with it."""
    if _current_file is not None:
        _current_file.value = os.fsencode(path)[:len(_current_file) - 1]


def _queue_report(n: int, b: int) -> None:
    if _progress_queue is not None and (n or b):
        _progress_queue.put((n, b))


def _child_main(task_q, result_q, progress_q, current_file) -> None:
    """A worker process: build the shards it is handed until it gets None."""
    global _progress_queue, _current_file
    _progress_queue, _current_file = progress_q, current_file
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    while True:
        task = task_q.get()
        if task is None:
            return
        try:
            result_q.put((True, build_shard(task)))
        except BaseException as e:  # noqa: BLE001 - the parent re-raises it
            try:
                result_q.put((False, e))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                result_q.put((False, RuntimeError(f"{task.name}: {type(e).__name__}: {e}")))
            return


# --- in the main process ---------------------------------------------------------------------


class WorkerDied(RunStopped):
    """A worker process ended without reporting (killed, out of memory...)."""


class _Progress:
    """The tqdm bar (images, and the MB/s read), fed by this process and the children's queue."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bytes = 0
        self._lock = threading.Lock()
        self._bar = tqdm(total=total, unit="img", unit_scale=True, desc=PROG, disable=not enabled,
                         mininterval=0.5, smoothing=0.1, dynamic_ncols=True)
        self._t0 = time.perf_counter()

    def report(self, n: int, b: int) -> None:
        with self._lock:
            self.bytes += b
            if n:
                self._bar.update(n)
            el = time.perf_counter() - self._t0
            if el > 0 and not self._bar.disable:
                self._bar.set_postfix_str(f"{self.bytes / 1e6 / el:.0f} MB/s", refresh=False)

    def close(self) -> None:
        self._bar.close()


class _Children:
    """``n`` worker processes, each holding at most two shards (one running, one queued); one
    that dies is reported instead of being waited for forever."""

    def __init__(self, n: int, report: Report):
        ctx = mp_context()
        self._tasks, self._results, self._progress = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self._drain = threading.Thread(target=self._drain_progress, args=(report,), daemon=True)
        self._drain.start()
        self._current = [ctx.RawArray("c", 4096) for _ in range(n)]
        self._procs = [ctx.Process(target=_child_main, args=(self._tasks, self._results, self._progress, cur),
                                   daemon=True) for cur in self._current]
        for c in self._procs:
            c.start()
        self.outstanding = 0

    def _drain_progress(self, report: Report) -> None:
        while (item := self._progress.get()) is not None:
            report(*item)

    def fill(self, pending: collections.deque) -> None:
        while pending and self.outstanding < 2 * len(self._procs):
            self._tasks.put(pending.popleft())
            self.outstanding += 1

    def receive(self, block: bool) -> dict | None:
        """A finished shard's record (None: none yet); a child's exception is raised here."""
        try:
            good, r = self._results.get(timeout=1.0) if block else self._results.get_nowait()
        except queue.Empty:
            dead = [(c, cur) for c, cur in zip(self._procs, self._current) if c.exitcode is not None]
            if block and dead:
                c, cur = dead[0]
                on = f" while processing {quoted(os.fsdecode(cur.value))}" if cur.value else ""
                raise WorkerDied(f"a worker process died (exit code {c.exitcode}){on}; {RESUME}") from None
            return None
        self.outstanding -= 1
        if not good:
            raise r
        return r

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, exc_type, *_) -> None:
        stopped = False
        try:
            if exc_type is None:
                for _ in self._procs:
                    self._tasks.put(None)
                for c in self._procs:
                    c.join(timeout=10)
                stopped = True
        finally:
            if not stopped:  # failing: stop the children now (their partial shards are temporary files)
                for c in self._procs:
                    c.terminate()
                for c in self._procs:
                    c.join(timeout=5)
            self._progress.put(None)
            self._drain.join(timeout=5)


def run_tasks(todo: list[ShardTask], workers: int, n_todo: int, progress: bool, records: dict,
              on_shard: OnShard | None = None) -> int:
    """Build the shards of ``todo`` in this process and ``workers - 1`` child processes, putting
    each commit record in ``records`` (and through ``on_shard``); return the source bytes read.

    This process builds shards too, so the children's start-up (about a second here) overlaps
    with useful work.
    """
    bar = _Progress(n_todo, progress and bool(todo))

    def commit(rec: dict) -> None:
        records[rec["name"]] = rec
        if on_shard is not None:
            on_shard(rec)

    n_children = min(workers - 1, len(todo) - 1)
    try:
        if n_children <= 0:
            for t in todo:
                commit(build_shard(t, bar.report))
            return bar.bytes
        pending = collections.deque(todo)
        with _Children(n_children, bar.report) as children:
            children.fill(pending)
            while pending:
                while (rec := children.receive(block=False)) is not None:
                    commit(rec)
                children.fill(pending)
                if pending:
                    commit(build_shard(pending.popleft(), bar.report))
            while children.outstanding:
                if (rec := children.receive(block=True)) is not None:
                    commit(rec)
    finally:
        bar.close()
    return bar.bytes
