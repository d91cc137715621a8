"""fatscale.tracking against real MLflow stores: a SQLite file, and a real `mlflow server`
that the tests stop and restart to check that nothing logged during an outage is lost."""

import logging
import math
import os
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import free_port
from fatscale.tracking import HTTP_ENV_DEFAULTS, NullTracker, Tracker, tracking_uri


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    # One database for the module: creating one runs MLflow's migrations (several seconds).
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'out' / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def restore_http_env():
    # Tracker sets MLflow's HTTP retry variables process-wide; keep them from leaking between tests.
    saved = {key: os.environ.get(key) for key in HTTP_ENV_DEFAULTS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fatscale.tracking" and r.levelno >= logging.WARNING]


def test_sqlite_round_trip_and_resume(sqlite_uri, tmp_path, caplog):
    artifact = tmp_path / "recipe.yaml"
    artifact.write_text("model: fat_b0\n")
    params = {"lr": 0.001, "epochs": 10, "long": "x" * 7000, **{f"p{i}": i for i in range(150)}}
    tracker = Tracker(sqlite_uri, "round-trip", "first", tags={"model": "fat_b0"}, system_metrics=False)
    run_id = tracker.run_id
    assert run_id is not None and tracker.wait_run_id(0) == run_id
    tracker.log_params(params)
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step)
    tracker.set_tags({"stage": "train"})
    tracker.log_artifact(str(artifact), "config")
    assert tracker.finish() is True
    assert tracker.finish("FAILED") is True  # a second finish changes nothing

    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["lr"] == "0.001" and run.data.params["p149"] == "149"
    assert len(run.data.params) == len(params)
    assert run.data.params["long"] == "x" * 6000  # MLflow's value limit
    assert run.data.tags["model"] == "fat_b0" and run.data.tags["stage"] == "train"
    assert steps(client, run_id, "train/loss") == [0, 1, 2, 3, 4]
    assert client.get_metric_history(run_id, "train/loss")[-1].value == pytest.approx(0.2)
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/recipe.yaml"]
    # artifacts sit beside the database, not under the working directory
    local = Path(sqlite_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / run_id / "artifacts" / "config"
    assert (local / "recipe.yaml").read_text() == "model: fat_b0\n"

    resumed = Tracker(sqlite_uri, "round-trip", "ignored on resume", run_id=run_id, system_metrics=False)
    assert resumed.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    # identical values are accepted again; a changed one is rejected alone, with one warning
    resumed.log_params({"lr": 0.001, "epochs": 20, "resumed_from": 4})
    for step in range(5, 8):
        resumed.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    assert resumed.finish() is False
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "10" and run.data.params["resumed_from"] == "4"
    assert steps(client, run_id, "train/loss") == list(range(8))
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(tracker_warnings(caplog)) == 1 and "epochs" in tracker_warnings(caplog)[0]


def test_system_metrics_on_an_explicit_run(sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(sqlite_uri, "system-metrics", "sys", system_metrics=True)
    time.sleep(1.5)
    assert tracker.finish(status="KILLED") is True
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert "system/cpu_utilization_percentage" in run.data.metrics


def test_invalid_input_fails_on_the_callers_thread(sqlite_uri, tmp_path):
    tracker = Tracker(sqlite_uri, "invalid", "bad keys", system_metrics=False)
    with pytest.raises(ValueError, match="invalid MLflow key"):
        tracker.log_metrics({"loss?": 1.0}, 0)
    with pytest.raises(ValueError, match="invalid MLflow key"):
        tracker.log_params({"../up": 1})
    with pytest.raises(FileNotFoundError, match="no such file"):
        tracker.log_artifact(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="finish status"):
        tracker.finish("DONE")
    assert tracker.finish() is True
    with pytest.raises(MlflowException):  # resuming a run the store does not have
        Tracker(sqlite_uri, "invalid", "resume", run_id="0" * 32, system_metrics=False)


def test_finish_is_bounded_when_the_server_never_comes(caplog):
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "never", "down", system_metrics=False)
    assert tracker.run_id is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    tracker.log_metrics({"loss": 1.0}, 0)
    started = time.monotonic()
    assert tracker.finish(timeout=1.0) is False
    assert time.monotonic() - started < 3
    assert tracker.wait_run_id(0) is None
    warnings = tracker_warnings(caplog)
    assert len(warnings) == 2 and "unreachable" in warnings[0] and "not delivered" in warnings[1]


@pytest.mark.slow  # 15-30 s on 2 cores: two server starts
def test_server_outage_loses_nothing(mlflow_server, tmp_path, caplog):
    """One tracker loses the server mid-run, another starts while it is down; one restart serves both."""
    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    running = Tracker(mlflow_server.uri, "outage", "mid-run", system_metrics=False)
    assert running.run_id is not None
    running.log_params({"lr": 0.1})
    for step in range(5):
        running.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": float("nan")}, step)
    deadline = time.monotonic() + 10
    while len(client.get_metric_history(running.run_id, "loss")) < 5:  # delivered over HTTP while up
        assert time.monotonic() < deadline, "metrics did not reach the server"
        time.sleep(0.1)

    mlflow_server.stop(signal.SIGKILL)
    late = Tracker(mlflow_server.uri, "outage", "down-at-start", tags={"job_id": "7"}, system_metrics=False)
    assert late.run_id is None and late.wait_run_id(0.1) is None
    artifact = tmp_path / "train.log"
    artifact.write_text("logged during the outage\n")
    slowest = 0.0
    for step in range(5, 30):
        started = time.perf_counter()
        running.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
        late.log_metrics({"loss": float(step)}, step)
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.04)  # meanwhile both trackers fail to send and back off
    assert slowest < 0.05
    for tracker in (running, late):
        tracker.log_params({"batch": 256})
        tracker.set_tags({"outage": "yes"})
        tracker.log_artifact(str(artifact))

    mlflow_server.start()
    assert running.finish(timeout=60) is True
    assert late.finish(timeout=60) is True
    assert late.run_id is not None and late.wait_run_id(0) == late.run_id

    run = client.get_run(running.run_id)
    assert run.info.status == "FINISHED"
    assert steps(client, running.run_id, "loss") == list(range(30))
    assert steps(client, running.run_id, "lr") == list(range(5, 30))
    assert math.isnan(run.data.metrics["grad_norm"])
    assert run.data.params == {"lr": "0.1", "batch": "256"} and run.data.tags["outage"] == "yes"
    assert [a.path for a in client.list_artifacts(running.run_id)] == ["train.log"]

    run = client.get_run(late.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "down-at-start"
    assert run.data.params == {"batch": "256"}
    assert run.data.tags["job_id"] == "7" and run.data.tags["outage"] == "yes"
    assert steps(client, late.run_id, "loss") == list(range(5, 30))
    assert [a.path for a in client.list_artifacts(late.run_id)] == ["train.log"]

    warnings = tracker_warnings(caplog)  # one per tracker, however many calls and retries
    assert len(warnings) == 2 and all("unreachable" in w for w in warnings)


def test_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None, "out") == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(None, "out") == "http://tracking:5000"
    assert tracking_uri("http://recipe:5000", "out") == "http://recipe:5000"  # the recipe's wins


def test_null_tracker_does_nothing(tmp_path):
    tracker = NullTracker()
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.set_tags({"a": "b"})
    tracker.log_artifact(str(tmp_path / "missing"))
    assert tracker.run_id is None and tracker.wait_run_id(0) is None
    assert tracker.finish() is True
