"""A rank that stops making progress ends the job in about ``train.stall_timeout_s``, not at the
collective's timeout, and the ranks name it.

Each rank's trainer reports what it is doing (:meth:`Watchdog.enter`: a phase and the step, a
plain assignment). A thread per rank publishes that, with a beat counter, in the rendezvous store
(a TCP server apart from the collectives' backend, so it answers while ranks wait in a
collective) every few seconds, and reads every other rank's. A rank whose beat has not changed
for the timeout has stopped altogether (frozen, or its host gone); one whose progress has not
changed has a main thread that is stuck (a hung read, a deadlocked pipeline). The ranks waiting
for it in a collective stop progressing too, a phase or more later: every rank enters the same
phases in the same order, so the rank(s) with the fewest are the ones that stopped first.
Each observer counts the time with its own clock, so clocks of different hosts never mix.

On a stall the first rank to see it posts the verdict in the store; every rank that can dumps
its Python stacks to its log (``faulthandler``), logs the one-line verdict, runs ``on_stall``
(under Slurm: requeue, fatscale.job) and exits with :data:`STALLED_EXIT`; the launcher ends the
rest of the job (torchrun stops its workers, srun ``--kill-on-bad-exit``).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

log = logging.getLogger(__name__)

STALLED_EXIT = 75  # EX_TEMPFAIL: a retry may succeed
VERDICT = "verdict"
DONE = "done"


class Watchdog:
    """``timeout_s`` None: no watching (``enter`` still records the phase)."""

    def __init__(self, rank: int, world: int, timeout_s: float | None, on_stall: Callable[[str], None] | None = None):
        self.rank, self.world, self.timeout_s, self.on_stall = rank, world, timeout_s, on_stall
        self.phase, self.step, self.progress = "starting", 0, 0
        self.interval_s = min(5.0, (timeout_s or 0) / 6)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fatscale-watchdog", daemon=True)

    def enter(self, phase: str, step: int) -> None:
        """The main thread starts ``phase`` ("loading data", "forward/backward", ...) of ``step``."""
        self.phase, self.step, self.progress = phase, step, self.progress + 1

    def start(self) -> Watchdog:
        """Publishes this rank's first record (every rank's is there once all have started), then watches."""
        if self.timeout_s is None:
            return self
        self._beat = 0
        self._store = self._connect()
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops watching, and tells the others this rank is done (a rank that finishes first is not stalled)."""
        if self._thread.is_alive():
            self._stopped.set()
            self._thread.join()
            self.phase = DONE
            try:
                self._store = self._store or self._connect()
                self._publish()
            except (RuntimeError, OSError):
                pass  # the others then see this rank stop; the run is over for it either way

    def _connect(self):
        """A client of its own to the rendezvous store (MASTER_ADDR:MASTER_PORT; served by rank 0
        or the launcher), with short timeouts: a frozen server must not hold this thread."""
        import torch.distributed as dist

        return dist.PrefixStore("fatscale/heartbeat/", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=max(2 * self.interval_s, 5)), wait_for_workers=False))

    def _publish(self) -> None:
        self._beat += 1
        record = dict(beat=self._beat, progress=self.progress, phase=self.phase, step=self.step,
                      pid=os.getpid(), host=socket.gethostname())
        self._store.set(str(self.rank), json.dumps(record))

    def _records(self) -> dict[int, dict]:
        """Every rank's last record; one request when all ranks have published (the store's server is
        shared by every rank), else one per rank, to find those that never did."""
        keys = [str(r) for r in range(self.world)]
        if self._store.check(keys):
            return {r: json.loads(value) for r, value in enumerate(self._store.multi_get(keys))}
        return {r: json.loads(self._store.get(key)) for r, key in enumerate(keys) if self._store.check([key])}

    def _watch(self) -> None:
        started = store_ok = time.monotonic()
        seen = {}  # rank -> (its record, when its beat last changed, when its progress last changed)
        while not self._stopped.wait(self.interval_s):
            now = time.monotonic()
            try:
                self._store = self._store or self._connect()
                self._publish()
                if self._store.check([VERDICT]):
                    return self._end(self._store.get(VERDICT).decode())
                others = self._records()
            except (RuntimeError, OSError) as e:  # the store's server answers no more
                self._store = None
                if now - store_ok > self.timeout_s:
                    return self._end(f"stalled: the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                                     f"{os.environ.get('MASTER_PORT')} (rank 0 or the launcher) has not answered for "
                                     f"{now - store_ok:.0f} s ({e})")
                continue
            store_ok = now
            for r, other in others.items():
                old, beat_at, progress_at = seen.get(r, (None, started, started))
                if old is None or other["beat"] != old["beat"]:
                    beat_at = now
                if old is None or other["progress"] != old["progress"]:
                    progress_at = now
                seen[r] = other, beat_at, progress_at
            verdict = self._verdict(seen, started, now)
            if verdict is not None:
                self._store.set(VERDICT, verdict)  # the first to see it speaks for all
                self._kill_frozen_here(seen, now)
                return self._end(self._store.get(VERDICT).decode())

    def _verdict(self, seen: dict, started: float, now: float) -> str | None:
        """The one line naming the rank(s) that stopped first, once any has for the timeout."""
        ranks = [r for r in range(self.world) if r not in seen or seen[r][0]["phase"] != DONE]
        silent = {r: now - seen[r][1] if r in seen else now - started for r in ranks}
        idle = {r: now - seen[r][2] if r in seen else now - started for r in ranks}
        if not ranks or max(max(silent.values()), max(idle.values())) <= self.timeout_s:
            return None
        frozen = [r for r in ranks if silent[r] > self.timeout_s]
        progress = {r: seen[r][0]["progress"] if r in seen else -1 for r in ranks}
        first = frozen or [r for r in ranks if progress[r] == min(progress.values())]
        parts = []
        for r in first:
            record = seen[r][0] if r in seen else None
            doing = (f"{record['phase']} at step {record['step']}, pid {record['pid']} on {record['host']}" if record
                     else "never reported")
            how = f"no heartbeat for {silent[r]:.0f} s" if r in frozen else f"no progress for {idle[r]:.0f} s"
            parts.append(f"rank {r} ({how}; last heard: {doing})")
        return (f"stalled: {', '.join(parts)} (train.stall_timeout_s {self.timeout_s:g}); every rank's Python stack "
                f"is in its log; the job ends")

    def _kill_frozen_here(self, seen: dict, now: float) -> None:
        """Frozen ranks on this host (SIGSTOP, a D-state hang) get SIGKILL: they would hold the
        launcher for its grace period, and never be of use again."""
        for r, (record, beat_at, _) in seen.items():
            if (now - beat_at > self.timeout_s and record["phase"] != DONE and record["host"] == socket.gethostname()
                    and r != self.rank):
                try:
                    os.kill(record["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _end(self, verdict: str) -> None:
        log.error("%s", verdict)
        files = [sys.stderr] + [h.stream for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        for file in files:  # the console (a Slurm task's .err file) and rank 0's train.log
            file.flush()
            faulthandler.dump_traceback(file=file, all_threads=True)
        if self.on_stall is not None:
            self.on_stall(verdict)
        os._exit(STALLED_EXIT)
