"""MLflow tracking for the trainer (rank 0 only) that never stalls or stops training.

Every call validates its input and appends data records to an in-memory queue; one background
daemon thread delivers the queue in order through an ``MlflowClient`` (explicit run ids, no fluent
global state). While the tracking server is unreachable it logs one warning and retries with
exponential backoff. ``close()`` waits at most its timeout for the queue to drain; the run's
terminal status is the queue's last record, so it is set only once everything before it is in.
docs/tracking.md has the user's view.

What ``close()`` could not deliver in time goes, if the Tracker has a ``spill_path``, to that
spill file (fatscale.tracking.spill), with a warning naming it and the command that delivers it.

A sweep's point (fatscale.sweep) has ``FATSCALE_MLFLOW_PARENT_RUN_ID`` set, and the run a Tracker
creates then carries MLflow's ``mlflow.parentRunId`` tag: the UI nests it under the parent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from fatscale.tracking.client import brief, connect, create_run, retryable
from fatscale.tracking.records import Artifact, Dataset, Metric, Model, Param, Record, Tag, Terminate, head
from fatscale.tracking.sender import Sender
from fatscale.tracking.spill import Spill, sync_command
from fatscale.tracking.system import RunMonitor

if TYPE_CHECKING:
    from fatscale.data.manifest import Manifest

log = logging.getLogger(__package__)  # "fatscale.tracking", the package's one logger

MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 10.0  # between retries of the queue's head
FINISH_RETRY_S = 0.5  # retry interval while close() waits
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
DIGEST_CHARS = 12  # of a split's digest (Manifest.split_digest) as the dataset's MLflow digest; the profile has all


class BaseTracker:
    """What the trainer side (fatscale.train.reporting) calls: a Tracker on rank 0. Here every call
    does nothing, as on the other ranks (NullTracker)."""

    run_id: str | None = None

    def wait_run_id(self, timeout: float | None = None) -> str | None:
        return self.run_id

    def log_params(self, params: dict[str, object]) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_manifest(self, manifest: Manifest, shards: str | Path) -> None:
        pass

    def log_model(self, name: str, folder: str | Path, flavors: dict[str, dict], metrics: dict[str, float], step: int,
                  params: dict[str, object] | None = None, registered_name: str | None = None,
                  description: str = "") -> None:
        pass

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """True if everything reached MLflow."""
        return True


class NullTracker(BaseTracker):
    """Stands in for Tracker on ranks != 0: takes its arguments, does nothing."""

    def __init__(self, *args: object, **kwargs: object):
        pass


class Tracker(BaseTracker):
    """Logs one training run to MLflow; see the module docstring.

    ``run_id=None`` starts a new run in ``experiment`` (created if needed); a given ``run_id``
    resumes that run: its status goes back to RUNNING and its metrics continue. ``__init__``
    tries to reach the store once (bounded by ``MLFLOW_HTTP_REQUEST_TIMEOUT``); if the server is
    unreachable, ``run_id`` stays None until the background thread gets through, and
    ``wait_run_id()`` waits for it. Errors MLflow will never accept (an unknown run_id to resume,
    an invalid experiment name) raise here.

    ``spill_path``: where ``close()`` writes what it could not deliver. If that file exists, its
    records are delivered first and the run it names is resumed (``run_id=None`` included); its
    recorded terminal status is superseded, the run being RUNNING again, and the rejections it
    counts carry on (``fatscale.rejected_records``, ``close()``'s result). A file naming another
    run than ``run_id`` raises ValueError: deliver it with the sync command first.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 tags: dict[str, str] | None = None, system_metrics: bool = True, spill_path: Path | None = None):
        self._uri = uri
        self._client, self._database = connect(uri)
        self._experiment, self._run_name = experiment, run_name
        self._spill_path = None if spill_path is None else Path(spill_path)
        # The spill file's content as this Tracker left or found it; None once there is none.
        self._spilled = None if self._spill_path is None else Spill.read(self._spill_path)
        replay: list[Record] = []
        rejected = 0
        self._step: int | None = None  # the highest step logged, for fatscale.spilled_at_step
        if self._spilled is not None:
            if None not in (run_id, self._spilled.run_id) and run_id != self._spilled.run_id:
                raise ValueError(f"{self._spill_path} holds records of MLflow run {self._spilled.run_id}, not of run "
                                 f"{run_id}: deliver them first with `{sync_command(self._spill_path)}`")
            run_id = run_id or self._spilled.run_id
            replay = self._spilled.replay(with_status=False)
            rejected, self._step = self._spilled.rejected, self._spilled.step
            log.info("MLflow: delivering the %d record(s) of %s first", len(self._spilled.records), self._spill_path)
        self._resume_id = run_id
        self._sender = Sender(self._client, rejected)
        self.run_id: str | None = None
        self._run_ready = threading.Event()
        # Records in call order. One leaves the queue only once delivered (or rejected by MLflow),
        # so close() waits for an empty queue.
        self._queue: deque[Record] = deque(replay)
        self._replay_left = len(replay)  # at the queue's front; the spill file goes once they are in
        self._cond = threading.Condition()
        self._closed = False  # set by close(): the worker exits and new calls are ignored
        self._finishing = threading.Event()
        self._monitor = RunMonitor(uri, self._finishing) if system_metrics else None
        self._unreachable = False
        self._result: bool | None = None
        self._checked_keys: set[str] = set()
        if tags:
            self.set_tags(tags)
        try:
            self._open_run()
        except Exception as e:
            if not retryable(e):
                raise
            self._went_unreachable(e)
        else:
            self._start_system_metrics()
        threading.Thread(target=self._deliver, name="mlflow-tracker", daemon=True).start()

    def wait_run_id(self, timeout: float | None = None) -> str | None:
        """The run id, waiting up to ``timeout`` s for the run to be created; None if it is not yet."""
        self._run_ready.wait(timeout)
        return self.run_id

    def log_params(self, params: dict[str, object]) -> None:
        """Values are stringified and cut to MLflow's limit. Re-logging an identical value is
        allowed; a changed value on a resumed run is rejected by MLflow (one warning, the other
        params still go in)."""
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self._put(*(Param(self._checked(key), str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Only validates and enqueues: no I/O on the caller's thread."""
        timestamp, step = int(time.time() * 1000), int(step)
        self._step = step if self._step is None else max(self._step, step)
        self._put(*(Metric(self._checked(key), float(value), timestamp, step) for key, value in metrics.items()))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        self._put(*(Tag(self._checked(key), str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """The file is read when it is delivered, so it must stay in place until then (after a
        spill, until the spill file is delivered)."""
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot log MLflow artifact, no such file: {path}")
        self._put(Artifact(path, artifact_path))

    def log_manifest(self, manifest: Manifest, shards: str | Path) -> None:
        """The shard splits as the run's MLflow dataset inputs: ``<shard dir name>/<split>``, digest
        ``split_digest`` (its first DIGEST_CHARS characters), source the shard directory, profile
        the sample, shard and class counts and the whole digest; train is the training context, the
        others evaluation."""
        shards = Path(shards).resolve()
        schema = json.dumps({"mlflow_colspec": [{"type": "binary", "name": "jpg"}, {"type": "long", "name": "cls"},
                                                {"type": "string", "name": "json"}]})
        for split, info in manifest.splits.items():
            digest = manifest.split_digest(split)
            profile = dict(num_samples=info.num_samples, num_shards=len(info.shards), num_classes=manifest.num_classes,
                           bytes=sum(shard.bytes for shard in info.shards), skipped=len(info.skipped), sha256=digest)
            self._put(Dataset(f"{shards.name}/{split}", digest[:DIGEST_CHARS], json.dumps({"uri": str(shards)}),
                              schema, json.dumps(profile), "training" if split == "train" else "evaluation"))

    def log_model(self, name: str, folder: str | Path, flavors: dict[str, dict], metrics: dict[str, float], step: int,
                  params: dict[str, object] | None = None, registered_name: str | None = None,
                  description: str = "") -> None:
        """``folder``'s files as the MLflow logged model ``name`` of this run, with an MLmodel file of
        ``flavors``; ``metrics`` go to the run at ``step`` and are linked to the model; with a
        ``registered_name``, the model becomes a new version of that registered model (created if
        needed) with ``description``. The files are read when delivered, like artifacts'."""
        folder = os.path.abspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot log MLflow model, no such folder: {folder}")
        timestamp, step = int(time.time() * 1000), int(step)
        points = [[self._checked(key), float(value), timestamp] for key, value in metrics.items()]
        self._step = step if self._step is None else max(self._step, step)
        self._put(*(Metric(key, value, ts, step) for key, value, ts in points),
                  Model(name, folder, flavors, {key: str(value) for key, value in (params or {}).items()}, step,
                        points, registered_name, description))

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Delivers what is queued, then ends the run with ``status`` (FINISHED, FAILED or KILLED),
        waiting at most ``timeout`` s whatever the server does (a preempted job passes a few
        seconds). True if everything reached MLflow. What did not, the status included, is written
        to the spill file (without one: dropped, with a warning); the run stays RUNNING until the
        file is delivered. A second call is a no-op."""
        if self._result is not None:
            return self._result
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish status must be FINISHED, FAILED or KILLED, not {status!r}")
        deadline = time.monotonic() + timeout
        self._finishing.set()
        if self._monitor is not None:
            self._monitor.stop(deadline)
        self._put(Terminate(status))
        with self._cond:
            delivered = self._cond.wait_for(lambda: not self._queue, max(0.0, deadline - time.monotonic()))
            self._closed = True
            self._cond.notify_all()
            if not delivered:  # under the lock: the worker may be about to remove a replayed spill file
                self._spill(list(self._queue), timeout)
        self._result = delivered and self._sender.rejected == 0
        return self._result

    def _checked(self, key: str) -> str:
        # Checked on the caller's thread, once per key: MLflow rejects a whole batch for one bad key.
        if key not in self._checked_keys:
            from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, path_not_unique, validate_param_and_metric_name

            if not (isinstance(key, str) and len(key) <= MAX_ENTITY_KEY_LENGTH
                    and validate_param_and_metric_name(key) and not path_not_unique(key)):
                raise ValueError(f"invalid MLflow key {key!r}: up to {MAX_ENTITY_KEY_LENGTH} letters, digits, "
                                 "spaces and _ - . : / forming a normalized relative path")
            self._checked_keys.add(key)
        return key

    def _put(self, *records: Record) -> None:
        with self._cond:
            if not self._closed:
                self._queue.extend(records)
                self._cond.notify_all()

    def _open_run(self) -> None:
        if self._resume_id is not None:
            self._client.update_run(self._resume_id, status="RUNNING")
            run_id = self._resume_id
        else:
            run_id = create_run(self._client, self._experiment, self._run_name, self._database)
        with self._cond:
            self.run_id = run_id
            if self._spilled is not None and self._spilled.run_id is None:
                # Else a crash before the file is delivered would have the next job create yet another run.
                self._spilled = self._spilled._replace(run_id=run_id)
                try:
                    self._spilled.write(self._spill_path)
                except OSError as e:
                    log.warning("MLflow: cannot record run %s in %s (%s): delivered again after a crash, "
                                "its records would go to a new run", run_id, self._spill_path, e)
        self._run_ready.set()

    def _spill(self, records: list[Record], timeout: float) -> None:
        run_id = self.run_id or self._resume_id
        what = f"MLflow: {len(records)} tracking record(s) for run {run_id or '(not created yet)'} not delivered within {timeout:g} s"
        if self._spill_path is None:
            log.warning("%s; dropped (no spill file)", what)
            return
        spill = Spill(self._uri, self._experiment, self._run_name, run_id, self._step, self._sender.rejected, records)
        try:
            spill.write(self._spill_path)
        except OSError as e:
            log.error("%s; lost: cannot write %s: %s", what, self._spill_path, e)
            return
        self._spilled = spill
        log.warning("%s; saved to %s: the resumed run delivers them first, or run `%s`", what, self._spill_path,
                    sync_command(self._spill_path))

    def _start_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.start(self.run_id)

    def _deliver(self) -> None:
        """Background thread: sends the queue's head until it is accepted or rejected, in order."""
        delay = MIN_BACKOFF_S
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self.run_id is None or self._closed)
                if self._closed:
                    return
                batch = head(self._queue) if self.run_id is not None else []
            try:
                if batch:
                    self._sender.send(self.run_id, batch)
                else:
                    self._open_run()
            except Exception as e:
                if retryable(e):
                    self._went_unreachable(e)
                    if self._finishing.is_set():
                        time.sleep(FINISH_RETRY_S)
                    else:
                        self._finishing.wait(delay)  # close() cuts the wait short
                    delay = min(2 * delay, MAX_BACKOFF_S)
                    continue
                # Only opening the run gets here: the sender drops what MLflow rejects.
                kept = f"; {self._spill_path} is kept" if self._replay_left else ""
                log.error("MLflow: cannot create or resume the run, tracking is off: %s%s", brief(e), kept)
                with self._cond:
                    self._sender.rejected += len(self._queue)
                    self._queue.clear()
                    self._closed = True
                    self._cond.notify_all()
                return
            if self._unreachable:
                self._unreachable = False
                log.info("MLflow tracking at %s reachable again, sending buffered records", self._uri)
                self._start_system_metrics()
            delay = MIN_BACKOFF_S
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                if self._replay_left:
                    self._replay_left = max(0, self._replay_left - len(batch))
                    if not self._replay_left and not self._closed:  # closed: close() has written a new one
                        self._spill_path.unlink(missing_ok=True)
                        self._spilled = None
                        log.info("MLflow: %s delivered, removed", self._spill_path)
                self._cond.notify_all()

    def _went_unreachable(self, error: Exception) -> None:
        if not self._unreachable:
            self._unreachable = True
            log.warning("MLflow tracking at %s unreachable (%s); training goes on, records are buffered "
                        "and retried in the background", self._uri, brief(error))
