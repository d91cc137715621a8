"""Where a run's MLflow records are, and how a person looks at them."""

from __future__ import annotations

import os
from pathlib import Path


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
