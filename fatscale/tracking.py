"""MLflow tracking for the trainer (rank 0 only) that never stalls or stops training.

Every call validates its input and appends to an in-memory queue; one background daemon thread
delivers the queue in order through an ``MlflowClient`` (explicit run ids, no fluent global
state). While the tracking server is unreachable it logs one warning and retries with
exponential backoff; nothing is dropped. ``finish()`` drains the queue (bounded by a timeout)
and sets the run's terminal status. README section "Experiment tracking" has the details.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    path_not_unique,
    validate_param_and_metric_name,
)

log = logging.getLogger(__name__)

# MLflow's REST client retries a failed request for ~4 minutes by default (7 retries, backoff
# factor 2), which would hold up the queue and make finish() overrun its timeout; the tracker
# retries itself. MLflow reads these from the environment at every request, process-wide, so they
# are set only where the user has not set them (README, "Experiment tracking").
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 10.0  # between retries of the queue's head
FINISH_RETRY_S = 0.5  # retry interval while finish() waits


def tracking_uri(configured: str | None, output_dir: str) -> str:
    """Where a run logs: the recipe's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite
    store in the run's output directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def browse_command(uri: str) -> str:
    """What a user runs to look at the runs stored at ``uri``."""
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


class Tracker:
    """Logs one training run to MLflow; see the module docstring.

    ``run_id=None`` starts a new run in ``experiment`` (created if needed); a given ``run_id``
    resumes that run: its status goes back to RUNNING and its metrics continue. ``__init__``
    tries to reach the store once (bounded by ``MLFLOW_HTTP_REQUEST_TIMEOUT``); if the server is
    unreachable, ``run_id`` stays None until the background thread gets through, and
    ``wait_run_id()`` waits for it. Errors MLflow will never accept (an unknown run_id to resume,
    an invalid experiment name) raise here.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 tags: dict[str, str] | None = None, system_metrics: bool = True):
        if uri.startswith(("http://", "https://")):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        self._database = _sqlite_path(uri)
        if self._database is not None:
            self._database.parent.mkdir(parents=True, exist_ok=True)
        self._uri = uri
        self._client = MlflowClient(uri)
        self._experiment, self._run_name, self._resume_id = experiment, run_name, run_id
        self._system_metrics = system_metrics
        self._monitor: SystemMetricsMonitor | None = None
        self._monitor_lock = threading.Lock()
        self.run_id: str | None = None
        self._run_ready = threading.Event()
        # Metric objects and one-shot callables taking the run id, in call order. An item leaves
        # the queue only once delivered (or rejected by MLflow), so finish() waits for an empty queue.
        self._queue: deque[Metric | Callable[[str], None]] = deque()
        self._cond = threading.Condition()
        self._closed = False  # set by finish(): the worker exits and new calls are ignored
        self._finishing = threading.Event()
        self._unreachable = False
        self._rejected = 0
        self._result: bool | None = None
        self._checked_keys: set[str] = set()
        if tags:
            self.set_tags(tags)
        try:
            self._open_run()
        except Exception as e:
            if not _retryable(e):
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
        items = [Param(self._checked(key), str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()]
        self._put(*(functools.partial(self._send_params, chunk) for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Only validates and enqueues: no I/O on the caller's thread."""
        timestamp = int(time.time() * 1000)
        self._put(*(Metric(self._checked(key), float(value), timestamp, int(step)) for key, value in metrics.items()))

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [RunTag(self._checked(key), str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()]
        self._put(*(functools.partial(self._send_tags, chunk) for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH)))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """The file is read when it is delivered, so it must stay in place until finish()."""
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot log MLflow artifact, no such file: {path}")
        self._put(lambda run_id: self._client.log_artifact(run_id, path, artifact_path))

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Delivers what is queued (waiting at most ``timeout`` s), then ends the run with ``status``
        (FINISHED, FAILED or KILLED). True if everything reached MLflow. A second call is a no-op."""
        if self._result is not None:
            return self._result
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish status must be FINISHED, FAILED or KILLED, not {status!r}")
        deadline = time.monotonic() + timeout
        self._finishing.set()
        with self._monitor_lock:
            if self._monitor is not None:
                self._monitor.finish()  # its last samples go in while the run is still RUNNING
        self._put(lambda run_id: self._client.set_terminated(run_id, status))
        with self._cond:
            delivered = self._cond.wait_for(lambda: not self._queue, max(0.0, deadline - time.monotonic()))
            left = len(self._queue)
            self._closed = True
            self._cond.notify_all()
        if not delivered:
            log.warning("MLflow: %d tracking record(s) for run %s not delivered within %.0f s; dropped",
                        left, self.run_id, timeout)
        self._result = delivered and self._rejected == 0
        return self._result

    def _checked(self, key: str) -> str:
        # Checked on the caller's thread, once per key: MLflow rejects a whole batch for one bad key.
        if key not in self._checked_keys:
            if not (isinstance(key, str) and len(key) <= MAX_ENTITY_KEY_LENGTH
                    and validate_param_and_metric_name(key) and not path_not_unique(key)):
                raise ValueError(f"invalid MLflow key {key!r}: up to {MAX_ENTITY_KEY_LENGTH} letters, digits, "
                                 "spaces and _ - . : / forming a normalized relative path")
            self._checked_keys.add(key)
        return key

    def _put(self, *items: Metric | Callable[[str], None]) -> None:
        with self._cond:
            if not self._closed:
                self._queue.extend(items)
                self._cond.notify_all()

    def _open_run(self) -> None:
        if self._resume_id is not None:
            self._client.update_run(self._resume_id, status="RUNNING")
            run_id = self._resume_id
        else:
            run_id = self._client.create_run(self._experiment_id(), run_name=self._run_name).info.run_id
        self.run_id = run_id
        self._run_ready.set()

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(self._experiment)
        if experiment is not None:
            return experiment.experiment_id
        # With a SQLite store, artifacts go beside the database file (MLflow's default is ./mlruns
        # under whatever the working directory is); a server chooses for itself.
        location = None if self._database is None else (self._database.parent / "mlartifacts").as_uri()
        try:
            return self._client.create_experiment(self._experiment, artifact_location=location)
        except MlflowException as e:  # another job created it in between
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(self._experiment).experiment_id

    def _start_system_metrics(self) -> None:
        # MLflow's monitor thread stops for good at its first failed request, so a new one (continuing
        # the step count) is started after every outage.
        if not self._system_metrics:
            return
        with self._monitor_lock:
            if self._finishing.is_set():
                return
            if self._monitor is not None:
                self._monitor.finish()
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self._uri)
            self._monitor.start()

    def _deliver(self) -> None:
        """Background thread: sends the queue's head until it is accepted or rejected, in order."""
        delay = MIN_BACKOFF_S
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self.run_id is None or self._closed)
                if self._closed:
                    return
                batch = self._head() if self.run_id is not None else []
            try:
                if not batch:
                    self._open_run()
                elif isinstance(batch[0], Metric):
                    self._client.log_batch(self.run_id, metrics=batch)
                else:
                    batch[0](self.run_id)
            except Exception as e:
                if _retryable(e):
                    self._went_unreachable(e)
                    if self._finishing.is_set():
                        time.sleep(FINISH_RETRY_S)
                    else:
                        self._finishing.wait(delay)  # finish() cuts the wait short
                    delay = min(2 * delay, MAX_BACKOFF_S)
                    continue
                if not batch:
                    log.error("MLflow: cannot create or resume the run, tracking is off: %s", _brief(e))
                    with self._cond:
                        self._rejected += len(self._queue)
                        self._queue.clear()
                        self._closed = True
                        self._cond.notify_all()
                    return
                log.warning("MLflow rejected %d tracking record(s), dropped: %s", len(batch), _brief(e))
                self._rejected += len(batch)
            else:
                if self._unreachable:
                    self._unreachable = False
                    log.info("MLflow tracking at %s reachable again, sending buffered records", self._uri)
                    self._start_system_metrics()
            delay = MIN_BACKOFF_S
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._cond.notify_all()

    def _head(self) -> list:
        # Consecutive metrics go out together: one log_batch call takes up to 1000 of them.
        head = self._queue[0]
        if not isinstance(head, Metric):
            return [head]
        window = itertools.islice(self._queue, MAX_METRICS_PER_BATCH)
        return list(itertools.takewhile(lambda item: isinstance(item, Metric), window))

    def _send_params(self, params: list[Param], run_id: str) -> None:
        try:
            self._client.log_batch(run_id, params=params)
        except MlflowException as e:
            if _retryable(e) or len(params) == 1:
                raise
            # MLflow rejects the whole batch for one param (typically a value changed on resume):
            # send them one by one so that only that one is lost. Re-sending a logged value is allowed.
            for param in params:
                try:
                    self._client.log_batch(run_id, params=[param])
                except MlflowException as e:
                    if _retryable(e):
                        raise
                    log.warning("MLflow rejected param %r, dropped: %s", param.key, _brief(e))
                    self._rejected += 1

    def _send_tags(self, tags: list[RunTag], run_id: str) -> None:
        self._client.log_batch(run_id, tags=tags)

    def _went_unreachable(self, error: Exception) -> None:
        if not self._unreachable:
            self._unreachable = True
            log.warning("MLflow tracking at %s unreachable (%s); training goes on, records are buffered "
                        "and retried in the background", self._uri, _brief(error))


class NullTracker:
    """Stands in for Tracker on ranks != 0: same methods, does nothing."""

    run_id = None

    def wait_run_id(self, timeout: float | None = None) -> None:
        return None

    def log_params(self, params: dict[str, object]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        return True


def _retryable(error: Exception) -> bool:
    """No answer from the server (MLflow reports it as INTERNAL_ERROR, HTTP 500), a 5xx or a 429.
    Anything else (a 4xx, a missing file) will fail the same way again."""
    if isinstance(error, MlflowException):
        code = error.get_http_status_code()
    elif isinstance(error, requests.HTTPError) and error.response is not None:  # artifact uploads
        code = error.response.status_code
    else:
        return isinstance(error, requests.RequestException)
    return code >= 500 or code == 429


def _brief(error: Exception) -> str:
    return str(error).strip().split("\n")[0] or type(error).__name__


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
