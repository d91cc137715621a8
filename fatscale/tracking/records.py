"""The records a Tracker queues and a spill file holds: one MLflow write each, in call order."""

from __future__ import annotations

import itertools
from collections import deque
from typing import NamedTuple


class Metric(NamedTuple):
    key: str
    value: float
    timestamp: int  # ms, when logged: a re-sent point is then the same point
    step: int
    kind = "metric"


class Param(NamedTuple):
    key: str
    value: str
    kind = "param"


class Tag(NamedTuple):
    key: str
    value: str
    kind = "tag"


class Artifact(NamedTuple):
    path: str  # absolute; the file is read when delivered
    artifact_path: str | None
    kind = "artifact"


class Dataset(NamedTuple):
    """An MLflow dataset input of the run (the JSON fields as MLflow's ``Dataset`` holds them)."""

    name: str
    digest: str
    source: str
    schema: str
    profile: str
    context: str  # the input's mlflow.data.context tag
    kind = "dataset"


class Model(NamedTuple):
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


class Terminate(NamedTuple):
    status: str
    kind = "terminate"


Record = Metric | Param | Tag | Artifact | Dataset | Model | Terminate
KINDS = {cls.kind: cls for cls in (Metric, Param, Tag, Artifact, Dataset, Model, Terminate)}


def head(records: deque[Record]) -> list[Record]:
    """The records at the front that go out in one request: consecutive metrics, params or tags up
    to MLflow's batch limits, else the first record alone."""
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    kind = type(records[0])
    limit = {Metric: MAX_METRICS_PER_BATCH, Param: MAX_PARAMS_TAGS_PER_BATCH, Tag: MAX_PARAMS_TAGS_PER_BATCH}.get(kind, 1)
    return list(itertools.takewhile(lambda record: type(record) is kind, itertools.islice(records, limit)))
