"""The tags fatscale reads and sets in MLflow: MLflow's own system tags, and fatscale's marks.

Marks on a run: ``fatscale.delivered_late`` (how many records a spill file delivered, the terminal
status aside) and ``fatscale.spilled_at_step`` come with a spill's delivery;
``fatscale.rejected_records`` (records MLflow refused for good) is set just before the terminal
status.
"""

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
# or the URL's workflowType, see fatscale.tracking.uri.run_url) and top1, the metric its run charts lead with.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.experiment.primaryMetric.name": "top1",
                   "mlflow.experiment.primaryMetric.greaterIsBetter": "True"}
# A sweep's point (fatscale.sweep): the job sets this, and the run it creates is a child of that
# run in MLflow's UI (MLflow's own nesting tag).
PARENT_RUN_ENV = "FATSCALE_MLFLOW_PARENT_RUN_ID"
PARENT_RUN_TAG = "mlflow.parentRunId"
