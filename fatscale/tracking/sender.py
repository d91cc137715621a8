"""Delivers records (fatscale.tracking.records) to an MLflow run, one request per batch; the
Tracker's thread and the sync command both deliver through it.

A model record is delivered as a whole: the logged model (its folder's files and an MLmodel file
with the ``fatscale`` flavor, see fatscale.export), its metrics, the run's output link and the model
version in the registry; each part that is already there (a replay) is found, not made again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING

from fatscale.tracking import records
from fatscale.tracking.client import brief, retryable
from fatscale.tracking.tags import DATASET_CONTEXT_TAG, MODEL_STEP_TAG, REJECTED_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__package__)  # "fatscale.tracking", the package's one logger


class Sender:
    """Sends one batch of records (see ``records.head``) to a run. Errors worth retrying raise;
    whatever MLflow will never accept is logged, counted in ``rejected`` and dropped."""

    def __init__(self, client: MlflowClient, rejected: int):
        self.client, self.rejected = client, rejected

    def send(self, run_id: str, batch: list[records.Record]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        head = batch[0]
        try:
            if isinstance(head, records.Metric):
                self.client.log_batch(run_id, metrics=[Metric(*metric) for metric in batch])
            elif isinstance(head, records.Param):
                self._send_params(run_id, [Param(*param) for param in batch])
            elif isinstance(head, records.Tag):
                self.client.log_batch(run_id, tags=[RunTag(*tag) for tag in batch])
            elif isinstance(head, records.Artifact):
                self.client.log_artifact(run_id, head.path, head.artifact_path)
            elif isinstance(head, records.Dataset):
                self._send_dataset(run_id, head)
            elif isinstance(head, records.Model):
                self._send_model(run_id, head)
            else:
                if self.rejected:  # before the status: a run must not look complete when it is not
                    self.client.set_tag(run_id, REJECTED_TAG, str(self.rejected))
                self.client.set_terminated(run_id, head.status)
        except Exception as e:
            if retryable(e):
                raise
            log.warning("MLflow rejected %d tracking record(s), dropped: %s", len(batch), brief(e))
            self.rejected += len(batch)

    def _send_dataset(self, run_id: str, record: records.Dataset) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(record.name, record.digest, "local", record.source, record.schema, record.profile)
        # MLflow keeps one dataset per name and digest and one input per run and dataset: a re-send adds nothing.
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, record.context)])])

    def _send_model(self, run_id: str, record: records.Model) -> None:
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
            if retryable(e) or len(params) == 1:
                raise
            # MLflow rejects the whole batch for one param (typically a value changed on resume):
            # send them one by one so that only that one is lost. Re-sending a logged value is
            # allowed. Counted once all went through: a retry would send them all again.
            rejected = []
            for param in params:
                try:
                    self.client.log_batch(run_id, params=[param])
                except MlflowException as e:
                    if retryable(e):
                        raise
                    rejected.append((param.key, brief(e)))
            for key, why in rejected:
                log.warning("MLflow rejected param %r, dropped: %s", key, why)
            self.rejected += len(rejected)
