"""The MLflow client as the Tracker, the sync command and a sweep's parent run use it: bounded HTTP
retries, MLflow's log records through the application's logging, runs created in experiments set
up for fatscale, and which errors are worth retrying."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fatscale.tracking.tags import EXPERIMENT_TAGS, PARENT_RUN_ENV, PARENT_RUN_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow's REST client retries a failed request for ~4 minutes by default (7 retries, backoff
# factor 2), which would hold up the queue; the tracker retries itself. MLflow reads these from
# the environment at every request, process-wide, so they are set only where the user has not set
# them (docs/tracking.md).
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def connect(uri: str) -> tuple[MlflowClient, Path | None]:
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


def create_run(client: MlflowClient, experiment: str, run_name: str, database: Path | None) -> str:
    """A new run in ``experiment`` (created if needed), a child of the sweep's parent run where the
    job is a sweep's point; its id."""
    parent = os.environ.get(PARENT_RUN_ENV)
    return client.create_run(_experiment_id(client, experiment, database), run_name=run_name,
                             tags={PARENT_RUN_TAG: parent} if parent else None).info.run_id


def retryable(error: Exception) -> bool:
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


def brief(error: Exception) -> str:
    return str(error).strip().split("\n")[0] or type(error).__name__


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


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
