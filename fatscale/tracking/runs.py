"""One-shot MLflow operations for the rest of fatscale, each through its own client: a sweep's
parent run, a finished run's result, the figures an evaluation adds to a finished run, logged and
registered models' files.

A sweep (fatscale.sweep) has one parent run (``create_parent_run``, kept up to date by
``update_parent_run``); its points' runs are nested under it (fatscale.tracking.tags.PARENT_RUN_ENV).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from fatscale.tracking.client import connect, create_run
from fatscale.tracking.tags import PARENT_RUN_TAG


class MlflowError(Exception):
    """What MLflow refused (its message's first line)."""


@contextmanager
def _refusals() -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise MlflowError(str(e).splitlines()[0]) from e


# ---------------------------------------------------------------- a sweep's parent run


def create_parent_run(uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]) -> str:
    """A sweep's parent run in ``experiment``, with its grid as ``params``; its id. Raises what
    MLflow raises (the caller decides whether that matters)."""
    from mlflow.entities import Param, RunTag

    client, database = connect(uri)
    run_id = create_run(client, experiment, run_name, database)
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    return run_id


def update_parent_run(uri: str, parent_id: str, child_ids: list[str], summary: Path, top1: float | None,
                      tags: dict[str, str], finished: bool) -> None:
    """A sweep's parent run brought up to date: ``child_ids`` tagged as its children (a point whose
    run was created while the parent was not, MLflow being away), ``summary`` as its artifact, the
    best point's ``top1`` and ``tags``; FINISHED when ``finished``. Raises what MLflow raises."""
    from mlflow.entities import Metric, RunTag

    client, _ = connect(uri)
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


# ---------------------------------------------------------------- a finished run


class RunResult(NamedTuple):
    experiment_id: str
    run_id: str
    status: str
    metrics: dict[str, float]  # each key's last value
    versions: dict[str, str]  # registered model -> its newest version from this run (a resumed run may have made several)


def latest_run(uri: str, experiment: str, run_name: str) -> RunResult:
    """The newest run named ``run_name`` in ``experiment``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id], f"tags.mlflow.runName = '{run_name}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    run_id = run.info.run_id
    latest = {v.name: v for v in sorted(client.search_model_versions(f"run_id = '{run_id}'"), key=lambda v: int(v.version))}
    return RunResult(experiment_id, run_id, run.info.status, run.data.metrics,
                     {name: version.version for name, version in latest.items()})


def last_step(uri: str, run_id: str, key: str) -> int:
    """The step of the run's last ``key`` point (0 if it has none). MLflow's refusal (no such run)
    raises MlflowError."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    with _refusals():
        client.get_run(run_id)
        steps = [m.step for m in client.get_metric_history(run_id, key)]
    return max(steps, default=0)


def add_to_run(uri: str, run_id: str, metrics: dict[str, float], step: int, files: list[Path],
               artifact_path: str) -> None:
    """``metrics`` at ``step`` and ``files`` under ``artifact_path``, into a run that may have
    finished. Through MLflow's client, not a Tracker: that one resumes its run (RUNNING) and ends
    it, and a finished run's status and end time must stay."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client, timestamp = MlflowClient(uri), int(time.time() * 1000)
    client.log_batch(run_id, [Metric(key, value, timestamp, step) for key, value in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path)


# ---------------------------------------------------------------- models' files


def download_model(model_uri: str, dst_path: str | None = None) -> tuple[Path, dict[str, dict]]:
    """A logged model's files (downloaded to ``dst_path``, default a temporary directory) and its
    MLmodel file's flavors, from the tracking and registry URIs MLflow is set to."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = Path(download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
    return local, Model.load(str(local)).flavors


class ModelVersion(NamedTuple):
    path: Path  # its files, downloaded
    name: str  # the registered model's
    run_id: str | None  # the run that made it


def default_tracking_uri() -> str:
    """MLflow's (``MLFLOW_TRACKING_URI``, else its default)."""
    import mlflow

    return mlflow.get_tracking_uri()


def download_model_version(registry_uri: str, tracking_uri: str) -> ModelVersion:
    """The model version ``models:/NAME/VERSION`` (or ``@ALIAS``) in the registry at ``tracking_uri``.
    MLflow's refusals (no such model, version or alias) raise MlflowError."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    name, alias = registry_uri.removeprefix("models:/").partition("@")[::2]
    name, version = name.partition("/")[::2]
    with _refusals():  # through the client: download_artifacts("models:/...") would ask MLflow's default registry
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        registered = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        location = client.get_model_version_download_uri(name, registered.version)
        local = Path(download_artifacts(artifact_uri=location, tracking_uri=tracking_uri))
    return ModelVersion(local, name, registered.run_id)
