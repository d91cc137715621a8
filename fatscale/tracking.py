"""MLflow tracking for the trainer (rank 0 only) that never stalls or stops training.

Every call validates its input and appends data records to an in-memory queue; one background
daemon thread delivers the queue in order through an ``MlflowClient`` (explicit run ids, no fluent
global state). While the tracking server is unreachable it logs one warning and retries with
exponential backoff. ``finish()`` waits at most its timeout for the queue to drain; the run's
terminal status is the queue's last record, so it is set only once everything before it is in.
README section "Experiment tracking" has the details.

What ``finish()`` could not deliver in time goes, if the Tracker has a ``spill_path``, to that
*spill file* (written atomically), with a warning naming it and the command that delivers it. The
next Tracker given the same path (the resumed job's) delivers the file's records before its own and
then removes the file; ``python -m fatscale.tracking sync OUTPUT_DIR`` does it by hand and then
sets the terminal status recorded in the file. The file stays until all its records are in, so a
replay cut short (a crash, the server gone again) is redone from the start. That shows nothing
twice: MLflow's SQL store keeps one row for a re-sent identical metric point (key, value,
timestamp, step; the point keeps the timestamp it was logged with), an identical param or tag
changes nothing and an artifact is overwritten. (A file store, ``./mlruns``, would repeat the
re-sent points.)

Spill file format: JSON lines (as Python's ``json`` writes them: NaN and Infinity stay as such).
The first line describes the run::

    {"kind": "spill", "version": 1, "uri": "http://...", "experiment": "...", "run_name": "...",
     "run_id": "..." or null (never created), "step": highest step logged or null,
     "rejected": records MLflow has rejected so far}

then one record a line, in the order they were logged::

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

A model record is delivered as a whole: the logged model (its folder's files and an MLmodel file
with the ``fatscale`` flavor, see fatscale.export), its metrics, the run's output link and the model
version in the registry; each part that is already there (a replay) is found, not made again.

Marks on a run: ``fatscale.delivered_late`` (how many records a spill file delivered, the terminal
status aside) and
``fatscale.spilled_at_step`` come with a spill's delivery; ``fatscale.rejected_records`` (records
MLflow refused for good) is set just before the terminal status.

A sweep (fatscale.sweep) has one parent run (``create_parent_run``, kept up to date by
``update_parent_run``); a point's job sets ``FATSCALE_MLFLOW_PARENT_RUN_ID``, and the run a Tracker
creates then carries MLflow's ``mlflow.parentRunId`` tag: the UI nests it under the parent.

mlflow is imported where first needed, so that ``python -m fatscale.tracking --help`` answers
without it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fatscale.atomic import write_atomic

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fatscale.data.manifest import Manifest

log = logging.getLogger(__name__)

# MLflow's REST client retries a failed request for ~4 minutes by default (7 retries, backoff
# factor 2), which would hold up the queue; the tracker retries itself. MLflow reads these from
# the environment at every request, process-wide, so they are set only where the user has not set
# them (README, "Experiment tracking").
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 10.0  # between retries of the queue's head
FINISH_RETRY_S = 0.5  # retry interval while finish() waits
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
SPILL_FILE = "mlflow-spill.jsonl"  # its name in a run's output_dir, where `sync OUTPUT_DIR` looks
SPILL_VERSION = 1
DELIVERED_LATE_TAG = "fatscale.delivered_late"
SPILLED_AT_STEP_TAG = "fatscale.spilled_at_step"
REJECTED_TAG = "fatscale.rejected_records"
MODEL_STEP_TAG = "fatscale.step"  # a logged model's training step: a model of a later step is another model
# MLflow's system tags (mlflow.utils.mlflow_tags) that its UI shows
NOTE_TAG = "mlflow.note.content"  # the run's description
SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.source.name", "mlflow.source.type"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
DATASET_CONTEXT_TAG = "mlflow.data.context"
# Experiment tags fatscale sets on the experiments it uses, where not set already: the model-training
# kind (MLflow 3's UI reads it where it has no GenAI / Model training switch; 3.17's follows the switch
# or the URL's workflowType, see run_url) and top1, the metric its run charts lead with.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.experiment.primaryMetric.name": "top1",
                   "mlflow.experiment.primaryMetric.greaterIsBetter": "True"}
DIGEST_CHARS = 12  # of a split's digest (Manifest.split_digest) as the dataset's MLflow digest; the profile has all
# A sweep's point (fatscale.sweep): the job sets this, and the run it creates is a child of that
# run in MLflow's UI (MLflow's own nesting tag).
PARENT_RUN_ENV = "FATSCALE_MLFLOW_PARENT_RUN_ID"
PARENT_RUN_TAG = "mlflow.parentRunId"


def tracking_uri(configured: str | None, output_dir: str) -> str:
    """Where a run logs: the recipe's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite
    store in the run's output directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def browse_command(uri: str) -> str:
    """What a user runs to look at the runs stored at ``uri``."""
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in MLflow's UI (``mlflow ui``'s default address for a SQLite store), in the
    model-training view of MLflow 3's UI (its default is the GenAI view)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def sync_command(spill_path: Path) -> str:
    """What a user runs to deliver ``spill_path`` by hand."""
    target = spill_path.parent if spill_path.name == SPILL_FILE else spill_path
    return f"python -m fatscale.tracking sync {target}"


# ---------------------------------------------------------------- records: what the queue holds


class _Metric(NamedTuple):
    key: str
    value: float
    timestamp: int  # ms, when logged: a re-sent point is then the same point
    step: int
    kind = "metric"


class _Param(NamedTuple):
    key: str
    value: str
    kind = "param"


class _Tag(NamedTuple):
    key: str
    value: str
    kind = "tag"


class _Artifact(NamedTuple):
    path: str  # absolute; the file is read when delivered
    artifact_path: str | None
    kind = "artifact"


class _Dataset(NamedTuple):
    """An MLflow dataset input of the run (the JSON fields as MLflow's ``Dataset`` holds them)."""

    name: str
    digest: str
    source: str
    schema: str
    profile: str
    context: str  # the input's mlflow.data.context tag
    kind = "dataset"


class _Model(NamedTuple):
    """A logged model of the run, registered as a model version unless ``registered_name`` is None."""

    name: str
    path: str  # absolute: a folder whose files are the model's artifacts, read when delivered
    flavors: dict  # the MLmodel file's flavors: name -> fields
    params: dict
    step: int
    metrics: list  # [key, value, timestamp]: points the run has too, linked to the model
    registered_name: str | None
    description: str
    kind = "model"


class _Terminate(NamedTuple):
    status: str
    kind = "terminate"


_Record = _Metric | _Param | _Tag | _Artifact | _Dataset | _Model | _Terminate
_KINDS = {cls.kind: cls for cls in (_Metric, _Param, _Tag, _Artifact, _Dataset, _Model, _Terminate)}


def _head(records: deque[_Record]) -> list[_Record]:
    """The records at the front that go out in one request: consecutive metrics, params or tags up
    to MLflow's batch limits, else the first record alone."""
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    kind = type(records[0])
    limit = {_Metric: MAX_METRICS_PER_BATCH, _Param: MAX_PARAMS_TAGS_PER_BATCH, _Tag: MAX_PARAMS_TAGS_PER_BATCH}.get(kind, 1)
    return list(itertools.takewhile(lambda record: type(record) is kind, itertools.islice(records, limit)))


class _Spill(NamedTuple):
    """A spill file's content (format: module docstring)."""

    uri: str
    experiment: str
    run_name: str
    run_id: str | None
    step: int | None
    rejected: int
    records: list[_Record]

    def write(self, path: Path) -> None:
        header = {"kind": "spill", "version": SPILL_VERSION, **self._asdict()}
        del header["records"]
        lines = [header, *({"kind": record.kind, **record._asdict()} for record in self.records)]
        write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines).encode())

    @classmethod
    def read(cls, path: Path) -> _Spill | None:
        try:
            header, *lines = (json.loads(line) for line in path.read_text().splitlines())
        except FileNotFoundError:
            return None
        if header.get("kind") != "spill" or header.get("version") != SPILL_VERSION:
            raise ValueError(f"{path} is not a version {SPILL_VERSION} fatscale spill file")
        records = [_KINDS[line.pop("kind")](**line) for line in lines]
        return cls(**{field: header[field] for field in cls._fields[:-1]}, records=records)

    def replay(self, with_status: bool) -> list[_Record]:
        """The records to deliver, then the tags saying they came late; then the recorded terminal
        status if ``with_status`` (a resumed run is RUNNING again instead)."""
        data = [record for record in self.records if not isinstance(record, _Terminate)]
        late = [_Tag(DELIVERED_LATE_TAG, str(len(data)))]
        if self.step is not None:
            late.append(_Tag(SPILLED_AT_STEP_TAG, str(self.step)))
        status = [record for record in self.records if isinstance(record, _Terminate)] if with_status else []
        return data + late + status


class _Sender:
    """Sends one batch of records (see ``_head``) to a run. Errors worth retrying raise; whatever
    MLflow will never accept is logged, counted in ``rejected`` and dropped. Tracker's thread and
    the sync command both deliver through it."""

    def __init__(self, client: MlflowClient, rejected: int):
        self.client, self.rejected = client, rejected

    def send(self, run_id: str, batch: list[_Record]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        head = batch[0]
        try:
            if isinstance(head, _Metric):
                self.client.log_batch(run_id, metrics=[Metric(*metric) for metric in batch])
            elif isinstance(head, _Param):
                self._send_params(run_id, [Param(*param) for param in batch])
            elif isinstance(head, _Tag):
                self.client.log_batch(run_id, tags=[RunTag(*tag) for tag in batch])
            elif isinstance(head, _Artifact):
                self.client.log_artifact(run_id, head.path, head.artifact_path)
            elif isinstance(head, _Dataset):
                self._send_dataset(run_id, head)
            elif isinstance(head, _Model):
                self._send_model(run_id, head)
            else:
                if self.rejected:  # before the status: a run must not look complete when it is not
                    self.client.set_tag(run_id, REJECTED_TAG, str(self.rejected))
                self.client.set_terminated(run_id, head.status)
        except Exception as e:
            if _retryable(e):
                raise
            log.warning("MLflow rejected %d tracking record(s), dropped: %s", len(batch), _brief(e))
            self.rejected += len(batch)

    def _send_dataset(self, run_id: str, record: _Dataset) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(record.name, record.digest, "local", record.source, record.schema, record.profile)
        # MLflow keeps one dataset per name and digest and one input per run and dataset: a re-send adds nothing.
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, record.context)])])

    def _send_model(self, run_id: str, record: _Model) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
        from mlflow.models import Model

        client = self.client
        run = client.get_run(run_id)
        step = str(record.step)
        logged = next((model for model in (client.get_logged_model(output.model_id)
                                           for output in (run.outputs.model_outputs if run.outputs else []))
                       if model.name == record.name and model.tags.get(MODEL_STEP_TAG) == step), None)
        if logged is None:
            logged = client.create_logged_model(run.info.experiment_id, name=record.name, source_run_id=run_id,
                                                tags={MODEL_STEP_TAG: step}, params=record.params, model_type="timm")
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, record.step)])
        if logged.status != LoggedModelStatus.READY:
            client.log_model_artifacts(logged.model_id, record.path)
            mlmodel = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id,
                            model_id=logged.model_id)
            for flavor, fields in record.flavors.items():
                mlmodel.add_flavor(flavor, **fields)
            with tempfile.TemporaryDirectory() as tmp:
                mlmodel.save(os.path.join(tmp, "MLmodel"))
                client.log_model_artifact(logged.model_id, os.path.join(tmp, "MLmodel"))
            # The run has these points already (same key, value, timestamp, step): this links them to the model.
            client.log_batch(run_id, metrics=[Metric(key, value, timestamp, record.step, model_id=logged.model_id)
                                              for key, value, timestamp in record.metrics])
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        if record.registered_name is None:
            return
        try:
            client.create_registered_model(record.registered_name)
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
        # The source is the model's artifact location, where a "models:/ID" source would lead: MLflow's SQL
        # registry store looks such a source up through the process's global tracking URI, not this
        # client's. (Its versions keep no model_id either: the source names the version's model.)
        versions = client.search_model_versions(f"run_id = '{run_id}'")
        if not any(v.name == record.registered_name and v.source == logged.artifact_location for v in versions):
            client.create_model_version(record.registered_name, logged.artifact_location, run_id=run_id,
                                        description=record.description, model_id=logged.model_id)

    def _send_params(self, run_id: str, params: list) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(run_id, params=params)
        except MlflowException as e:
            if _retryable(e) or len(params) == 1:
                raise
            # MLflow rejects the whole batch for one param (typically a value changed on resume):
            # send them one by one so that only that one is lost. Re-sending a logged value is
            # allowed. Counted once all went through: a retry would send them all again.
            rejected = []
            for param in params:
                try:
                    self.client.log_batch(run_id, params=[param])
                except MlflowException as e:
                    if _retryable(e):
                        raise
                    rejected.append((param.key, _brief(e)))
            for key, why in rejected:
                log.warning("MLflow rejected param %r, dropped: %s", key, why)
            self.rejected += len(rejected)


# ---------------------------------------------------------------- the tracker


class Tracker:
    """Logs one training run to MLflow; see the module docstring.

    ``run_id=None`` starts a new run in ``experiment`` (created if needed); a given ``run_id``
    resumes that run: its status goes back to RUNNING and its metrics continue. ``__init__``
    tries to reach the store once (bounded by ``MLFLOW_HTTP_REQUEST_TIMEOUT``); if the server is
    unreachable, ``run_id`` stays None until the background thread gets through, and
    ``wait_run_id()`` waits for it. Errors MLflow will never accept (an unknown run_id to resume,
    an invalid experiment name) raise here.

    ``spill_path``: where ``finish()`` writes what it could not deliver. If that file exists, its
    records are delivered first and the run it names is resumed (``run_id=None`` included); its
    recorded terminal status is superseded, the run being RUNNING again, and the rejections it
    counts carry on (``fatscale.rejected_records``, ``finish()``'s result). A file naming another
    run than ``run_id`` raises ValueError: deliver it with the sync command first.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 tags: dict[str, str] | None = None, system_metrics: bool = True, spill_path: Path | None = None):
        self._uri = uri
        self._client, self._database = _connect(uri)
        self._experiment, self._run_name = experiment, run_name
        self._spill_path = None if spill_path is None else Path(spill_path)
        # The spill file's content as this Tracker left or found it; None once there is none.
        self._spilled = None if self._spill_path is None else _Spill.read(self._spill_path)
        replay: list[_Record] = []
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
        self._sender = _Sender(self._client, rejected)
        self._system_metrics = system_metrics
        self._monitor = None  # MLflow's SystemMetricsMonitor
        self._monitor_lock = threading.Lock()
        self.run_id: str | None = None
        self._run_ready = threading.Event()
        # Records in call order. One leaves the queue only once delivered (or rejected by MLflow),
        # so finish() waits for an empty queue.
        self._queue: deque[_Record] = deque(replay)
        self._replay_left = len(replay)  # at the queue's front; the spill file goes once they are in
        self._cond = threading.Condition()
        self._closed = False  # set by finish(): the worker exits and new calls are ignored
        self._finishing = threading.Event()
        self._unreachable = False
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
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self._put(*(_Param(self._checked(key), str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Only validates and enqueues: no I/O on the caller's thread."""
        timestamp, step = int(time.time() * 1000), int(step)
        self._step = step if self._step is None else max(self._step, step)
        self._put(*(_Metric(self._checked(key), float(value), timestamp, step) for key, value in metrics.items()))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        self._put(*(_Tag(self._checked(key), str(value)[:MAX_TAG_VAL_LENGTH]) for key, value in tags.items()))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """The file is read when it is delivered, so it must stay in place until then (after a
        spill, until the spill file is delivered)."""
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot log MLflow artifact, no such file: {path}")
        self._put(_Artifact(path, artifact_path))

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
            self._put(_Dataset(f"{shards.name}/{split}", digest[:DIGEST_CHARS], json.dumps({"uri": str(shards)}),
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
        self._put(*(_Metric(key, value, ts, step) for key, value, ts in points),
                  _Model(name, folder, flavors, {key: str(value) for key, value in (params or {}).items()}, step,
                         points, registered_name, description))

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
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
        self._stop_system_metrics(deadline)
        self._put(_Terminate(status))
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

    def _put(self, *records: _Record) -> None:
        with self._cond:
            if not self._closed:
                self._queue.extend(records)
                self._cond.notify_all()

    def _open_run(self) -> None:
        if self._resume_id is not None:
            self._client.update_run(self._resume_id, status="RUNNING")
            run_id = self._resume_id
        else:
            run_id = _create_run(self._client, self._experiment, self._run_name, self._database)
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

    def _spill(self, records: list[_Record], timeout: float) -> None:
        run_id = self.run_id or self._resume_id
        what = f"MLflow: {len(records)} tracking record(s) for run {run_id or '(not created yet)'} not delivered within {timeout:g} s"
        if self._spill_path is None:
            log.warning("%s; dropped (no spill file)", what)
            return
        spill = _Spill(self._uri, self._experiment, self._run_name, run_id, self._step, self._sender.rejected, records)
        try:
            spill.write(self._spill_path)
        except OSError as e:
            log.error("%s; lost: cannot write %s: %s", what, self._spill_path, e)
            return
        self._spilled = spill
        log.warning("%s; saved to %s: the resumed run delivers them first, or run `%s`", what, self._spill_path,
                    sync_command(self._spill_path))

    def _start_system_metrics(self) -> None:
        # MLflow's monitor thread stops for good at its first failed request, so a new one (continuing
        # the step count) is started after every outage.
        if not self._system_metrics or self._finishing.is_set():
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self._uri)
        with self._monitor_lock:
            if self._finishing.is_set():
                return
            previous, self._monitor = self._monitor, monitor
            monitor.start()
        if previous is not None:
            previous.finish()

    def _stop_system_metrics(self, deadline: float) -> None:
        # The monitor's finish() joins its thread, which may be in a request, and then flushes: with
        # the server hanging, each takes up to MLFLOW_HTTP_REQUEST_TIMEOUT. Waited for until the deadline only.
        with self._monitor_lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            stopping = threading.Thread(target=monitor.finish, name="mlflow-monitor-stop", daemon=True)
            stopping.start()
            stopping.join(max(0.0, deadline - time.monotonic()))  # its last samples go in while RUNNING

    def _deliver(self) -> None:
        """Background thread: sends the queue's head until it is accepted or rejected, in order."""
        delay = MIN_BACKOFF_S
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self.run_id is None or self._closed)
                if self._closed:
                    return
                batch = _head(self._queue) if self.run_id is not None else []
            try:
                if batch:
                    self._sender.send(self.run_id, batch)
                else:
                    self._open_run()
            except Exception as e:
                if _retryable(e):
                    self._went_unreachable(e)
                    if self._finishing.is_set():
                        time.sleep(FINISH_RETRY_S)
                    else:
                        self._finishing.wait(delay)  # finish() cuts the wait short
                    delay = min(2 * delay, MAX_BACKOFF_S)
                    continue
                # Only opening the run gets here: the sender drops what MLflow rejects.
                kept = f"; {self._spill_path} is kept" if self._replay_left else ""
                log.error("MLflow: cannot create or resume the run, tracking is off: %s%s", _brief(e), kept)
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
                    if not self._replay_left and not self._closed:  # closed: finish() has written a new one
                        self._spill_path.unlink(missing_ok=True)
                        self._spilled = None
                        log.info("MLflow: %s delivered, removed", self._spill_path)
                self._cond.notify_all()

    def _went_unreachable(self, error: Exception) -> None:
        if not self._unreachable:
            self._unreachable = True
            log.warning("MLflow tracking at %s unreachable (%s); training goes on, records are buffered "
                        "and retried in the background", self._uri, _brief(error))


class NullTracker:
    """Stands in for Tracker on ranks != 0: takes the same arguments, does nothing."""

    run_id = None

    def __init__(self, uri: str = "", experiment: str = "", run_name: str = "", run_id: str | None = None,
                 tags: dict[str, str] | None = None, system_metrics: bool = True, spill_path: Path | None = None):
        pass

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

    def log_manifest(self, manifest: Manifest, shards: str | Path) -> None:
        pass

    def log_model(self, name: str, folder: str | Path, flavors: dict[str, dict], metrics: dict[str, float], step: int,
                  params: dict[str, object] | None = None, registered_name: str | None = None,
                  description: str = "") -> None:
        pass

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        return True


class NodeMonitor:
    """MLflow's system metrics of one more node of a multi-node run, into the run ``run_id`` that
    rank 0's Tracker logs (which monitors rank 0's node). One per node, on its local rank 0, after
    ``mlflow.system_metrics.set_system_metrics_node_id``. Light: MLflow's monitor thread alone,
    which ends at its first failed request with MLflow's warning, so an outage ends this node's
    system metrics (rank 0's own monitor is restarted by the Tracker)."""

    def __init__(self, uri: str, run_id: str):
        _connect(uri)  # the same HTTP bounds and logging as the Tracker's
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
        self._monitor.start()

    def finish(self, timeout: float) -> None:
        """Stops the monitor, waiting at most ``timeout`` s for its last request."""
        stopping = threading.Thread(target=self._monitor.finish, name="mlflow-monitor-stop", daemon=True)
        stopping.start()
        stopping.join(timeout)


# ---------------------------------------------------------------- a sweep's parent run


def create_parent_run(uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]) -> str:
    """A sweep's parent run in ``experiment``, with its grid as ``params``; its id. Raises what
    MLflow raises (the caller decides whether that matters)."""
    from mlflow.entities import Param, RunTag

    client, database = _connect(uri)
    run_id = _create_run(client, experiment, run_name, database)
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    return run_id


def update_parent_run(uri: str, parent_id: str, child_ids: list[str], summary: Path, top1: float | None,
                      tags: dict[str, str], finished: bool) -> None:
    """A sweep's parent run brought up to date: ``child_ids`` tagged as its children (a point whose
    run was created while the parent was not, MLflow being away), ``summary`` as its artifact, the
    best point's ``top1`` and ``tags``; FINISHED when ``finished``. Raises what MLflow raises."""
    from mlflow.entities import Metric, RunTag

    client, _ = _connect(uri)
    run = client.get_run(parent_id)
    nested = {r.info.run_id for r in client.search_runs([run.info.experiment_id],
                                                        f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'")}
    for child in set(child_ids) - nested:
        client.set_tag(child, PARENT_RUN_TAG, parent_id)
    client.log_artifact(parent_id, str(summary))
    metrics = [] if top1 is None else [Metric("top1", top1, int(time.time() * 1000), 0)]
    client.log_batch(parent_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    if finished and run.info.status != "FINISHED":
        client.set_terminated(parent_id, "FINISHED")


# ---------------------------------------------------------------- sync command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fatscale.tracking",
                                     description="MLflow records a training run could not deliver (see fatscale/tracking.py).")
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser(
        "sync", help="deliver a run's spill file to MLflow",
        description=f"Deliver OUTPUT_DIR/{SPILL_FILE} to its MLflow run (created if it never was), set the "
                    "run's recorded terminal status, remove the file, print one line. Exits 1, keeping the file, "
                    "if MLflow cannot be reached; run it again then: nothing is shown twice.")
    sync.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path,
                      help=f"the run's output directory (or the spill file itself, if not named {SPILL_FILE})")
    args = parser.parse_args(argv)
    code, line = _sync(args.output_dir)
    print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _sync(path: Path) -> tuple[int, str]:
    """Exit status and the line to print."""
    if not path.exists():
        return 1, f"no such output directory or spill file: {path}"
    if path.is_dir():
        path = path / SPILL_FILE
    spill = _Spill.read(path)
    if spill is None:
        return 0, f"nothing to sync: no {path}"
    client, database = _connect(spill.uri)
    sender = _Sender(client, spill.rejected)
    try:
        if spill.run_id is None:
            spill = spill._replace(run_id=_create_run(client, spill.experiment, spill.run_name, database))
            spill.write(path)  # a second try after a failure delivers to this run, not to a new one
        else:
            client.get_run(spill.run_id)  # not there (another server?): keep the file
        queue = deque(spill.replay(with_status=True))
        while queue:
            batch = _head(queue)
            sender.send(spill.run_id, batch)
            for _ in batch:
                queue.popleft()
    except Exception as e:
        why = "unreachable" if _retryable(e) else "cannot take the records"
        return 1, f"MLflow at {spill.uri} {why} ({_brief(e)}); {path} kept: run this again"
    path.unlink()
    counts = Counter(record.kind for record in spill.records if not isinstance(record, _Terminate))
    status = next((record.status for record in spill.records if isinstance(record, _Terminate)), None)
    line = (f"synced {path} to MLflow run {spill.run_id} at {spill.uri}: "
            + ", ".join(f"{n} {kind}(s)" for kind, n in counts.items())
            + (f"; status {status}" if status else "")
            + (f"; {sender.rejected} record(s) rejected by MLflow, tagged {REJECTED_TAG}" if sender.rejected else ""))
    return 0, line


# ---------------------------------------------------------------- helpers


def _connect(uri: str) -> tuple[MlflowClient, Path | None]:
    """A client for ``uri``, and for a SQLite store its database file (folder created)."""
    from mlflow import MlflowClient

    # MLflow prints its records (INFO included) through a stderr handler of its own: hand them to the
    # application's handlers instead (the trainer: warnings on the console, everything in train.log).
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.handlers.clear()
    mlflow_logger.propagate = True
    mlflow_logger.setLevel(logging.NOTSET)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    database = _sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri), database


def _create_run(client: MlflowClient, experiment: str, run_name: str, database: Path | None) -> str:
    parent = os.environ.get(PARENT_RUN_ENV)
    return client.create_run(_experiment_id(client, experiment, database), run_name=run_name,
                             tags={PARENT_RUN_TAG: parent} if parent else None).info.run_id


def _experiment_id(client: MlflowClient, name: str, database: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # With a SQLite store, artifacts go beside the database file (MLflow's default is ./mlruns
        # under whatever the working directory is); a server chooses for itself.
        location = None if database is None else (database.parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException as e:  # another job created it in between
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:  # a value set by hand (in the UI, say) stays
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _retryable(error: Exception) -> bool:
    """No answer from the server (MLflow reports it as INTERNAL_ERROR, HTTP 500), a 5xx or a 429.
    Anything else (a 4xx, a missing file) will fail the same way again."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        code = error.get_http_status_code()
    elif isinstance(error, requests.HTTPError) and error.response is not None:  # artifact uploads
        code = error.response.status_code
    else:
        return isinstance(error, requests.RequestException)
    return code >= 500 or code == 429


def _brief(error: Exception) -> str:
    return str(error).strip().split("\n")[0] or type(error).__name__


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")  # the sender's rejections
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our one line names the run
    sys.exit(main())
