"""fatscale.tracking against real MLflow stores: a SQLite file, and a real `mlflow server`
that the tests stop, freeze and restart to check that nothing logged during an outage is lost:
neither while the process lives, nor through a spill file when it stops."""

import inspect
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import REPO, free_port
from fatscale.tracking.cli import main
from fatscale.tracking.client import HTTP_ENV_DEFAULTS
from fatscale.tracking.spill import SPILL_FILE
from fatscale.tracking.tracker import NullTracker, Tracker
from fatscale.tracking.uri import tracking_uri


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


def read_spill(path: Path) -> tuple[dict, list[dict]]:
    """The spill file as documented in fatscale.tracking: a header line, then one record a line."""
    header, *records = (json.loads(line) for line in path.read_text().splitlines())
    assert header["kind"] == "spill"
    return header, records


def late(records: list[dict]) -> str:
    """fatscale.delivered_late for a spill of ``records``: all but the terminal status."""
    return str(sum(r["kind"] != "terminate" for r in records))


def spilled_steps(records: list[dict], key: str) -> list[int]:
    return [r["step"] for r in records if r["kind"] == "metric" and r["key"] == key]


def wait_for_steps(client: MlflowClient, run_id: str, key: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(client.get_metric_history(run_id, key)) < count:
        assert time.monotonic() < deadline, "metrics did not reach the server"
        time.sleep(0.1)


def run_sync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fatscale.tracking", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_sqlite_round_trip_and_resume(sqlite_uri, tmp_path, caplog):
    artifact = tmp_path / "recipe.yaml"
    artifact.write_text("model: fat_b0\n")
    params = {"lr": 0.001, "epochs": 10, "long": "x" * 7000, **{f"p{i}": i for i in range(150)}}
    tracker = Tracker(sqlite_uri, "round-trip", "first", tags={"model": "fat_b0"}, system_metrics=False)
    run_id = tracker.run_id
    assert run_id is not None and tracker.wait_run_id(0) == run_id
    tracker.log_params(params)
    for step in range(5):
        tracker.log({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step)
    tracker.set_tags({"stage": "train"})
    tracker.log_artifact(str(artifact), "config")
    assert tracker.close() is True
    assert tracker.close("FAILED") is True  # a second finish changes nothing

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
        resumed.log({"train/loss": 1.0 / (step + 1)}, step)
    assert resumed.close() is False
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "10" and run.data.params["resumed_from"] == "4"
    assert steps(client, run_id, "train/loss") == list(range(8))
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(tracker_warnings(caplog)) == 1 and "epochs" in tracker_warnings(caplog)[0]
    assert run.data.tags["fatscale.rejected_records"] == "1"  # FINISHED, but not silently


def test_system_metrics_on_an_explicit_run(sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(sqlite_uri, "system-metrics", "sys", system_metrics=True)
    time.sleep(1.5)
    assert tracker.close(status="KILLED") is True
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert "system/cpu_utilization_percentage" in run.data.metrics


def test_invalid_input_fails_on_the_callers_thread(sqlite_uri, tmp_path):
    tracker = Tracker(sqlite_uri, "invalid", "bad keys", system_metrics=False)
    with pytest.raises(ValueError, match="invalid MLflow key"):
        tracker.log({"loss?": 1.0}, 0)
    with pytest.raises(ValueError, match="invalid MLflow key"):
        tracker.log_params({"../up": 1})
    with pytest.raises(FileNotFoundError, match="no such file"):
        tracker.log_artifact(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="finish status"):
        tracker.close("DONE")
    assert tracker.close() is True
    with pytest.raises(MlflowException):  # resuming a run the store does not have
        Tracker(sqlite_uri, "invalid", "resume", run_id="0" * 32, system_metrics=False)


def test_finish_is_bounded_when_the_server_never_comes(caplog):
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "never", "down", system_metrics=False)
    assert tracker.run_id is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    tracker.log({"loss": 1.0}, 0)
    started = time.monotonic()
    assert tracker.close(timeout=1.0) is False
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
        running.log({"loss": 1.0 / (step + 1), "grad_norm": float("nan")}, step)
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
        running.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
        late.log({"loss": float(step)}, step)
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.04)  # meanwhile both trackers fail to send and back off
    assert slowest < 0.05
    for tracker in (running, late):
        tracker.log_params({"batch": 256})
        tracker.set_tags({"outage": "yes"})
        tracker.log_artifact(str(artifact))

    mlflow_server.start()
    assert running.close(timeout=60) is True
    assert late.close(timeout=60) is True
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
    assert NullTracker("http://x", "e", "r", run_id=None, tags={}, system_metrics=False,
                       spill_path=tmp_path / SPILL_FILE).close("KILLED", timeout=3) is True
    tracker = NullTracker()
    tracker.log_params({"a": 1})
    tracker.log({"loss": 1.0}, 0)
    tracker.set_tags({"a": "b"})
    tracker.log_artifact(str(tmp_path / "missing"))
    assert tracker.run_id is None and tracker.wait_run_id(0) is None
    assert tracker.close() is True


def test_the_null_tracker_takes_every_call_a_tracker_takes():
    # The trainer calls the same methods on every rank: a Tracker's would fail on the others if missing here.
    for name, method in vars(Tracker).items():
        if not name.startswith("_"):
            assert inspect.signature(getattr(NullTracker, name)) == inspect.signature(method), name


@pytest.mark.slow  # ~20 s on 2 cores: a server restart
def test_preemption_spills_and_the_resumed_run_delivers_each_record_once(mlflow_server, tmp_path, caplog):
    """(a) The server dies, the job is preempted: finish() keeps to its short timeout and spills;
    the requeued job's Tracker (no run id: the checkpoint may not have one) delivers the spill
    into the same run, once, with the original timestamps, before its own records."""
    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    spill = tmp_path / SPILL_FILE
    first = Tracker(mlflow_server.uri, "preempted", "first", spill_path=spill, system_metrics=False)
    run_id = first.run_id
    first.log({"loss": 1.0}, 0)
    wait_for_steps(client, run_id, "loss", 1)

    mlflow_server.stop(signal.SIGKILL)
    for step in range(1, 21):
        first.log({"loss": 1.0 / (step + 1), "grad_norm": float("nan") if step == 7 else float(step)}, step)
    first.log_params({"lr": 0.1})
    first.set_tags({"interrupted_at_step": "20"})
    started = time.monotonic()
    assert first.close("KILLED", timeout=2) is False
    assert time.monotonic() - started < 3

    header, records = read_spill(spill)
    assert header["run_id"] == run_id and header["step"] == 20
    assert spilled_steps(records, "loss") == list(range(1, 21)) == spilled_steps(records, "grad_norm")
    assert {"kind": "param", "key": "lr", "value": "0.1"} in records
    assert {"kind": "tag", "key": "interrupted_at_step", "value": "20"} in records
    assert records[-1] == {"kind": "terminate", "status": "KILLED"}
    warning = tracker_warnings(caplog)[-1]
    assert str(spill) in warning and f"python -m fatscale.tracking sync {tmp_path}" in warning

    mlflow_server.start()
    assert client.get_run(run_id).info.status == "RUNNING"  # KILLED waits in the spill with the rest
    second = Tracker(mlflow_server.uri, "preempted", "second", spill_path=spill, system_metrics=False)
    assert second.run_id == run_id
    second.log({"loss": 0.01}, 21)
    assert second.close(timeout=60) is True
    assert not spill.exists()

    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(22))
    spilled = {r["step"]: r["timestamp"] for r in records if r["kind"] == "metric" and r["key"] == "loss"}
    assert {m.step: m.timestamp for m in history if m.step in spilled} == spilled
    assert next(m.timestamp for m in history if m.step == 21) >= max(spilled.values())
    grad_norm = {m.step: m.value for m in client.get_metric_history(run_id, "grad_norm")}
    assert sorted(grad_norm) == list(range(1, 21)) and math.isnan(grad_norm[7])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert run.data.tags["interrupted_at_step"] == "20"
    assert run.data.tags["fatscale.delivered_late"] == late(records)
    assert run.data.tags["fatscale.spilled_at_step"] == "20"


def test_sync_help_answers_without_importing_mlflow():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "fatscale.tracking", "sync", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "OUTPUT_DIR" in result.stdout
    assert "mlflow" not in result.stderr  # -X importtime lists every module imported


@pytest.mark.slow  # ~20 s on 2 cores: a server restart, three interpreters
def test_sync_command_delivers_the_spill_and_sets_the_recorded_status(mlflow_server, tmp_path):
    """(b) The server is down for a whole run; `sync` fails cleanly while it is still down, then
    creates the run, delivers everything and sets the recorded KILLED."""
    mlflow_server.stop(signal.SIGKILL)
    spill = tmp_path / SPILL_FILE
    artifact = tmp_path / "recipe.yaml"
    artifact.write_text("model: fat_b0\n")
    tracker = Tracker(mlflow_server.uri, "sync", "down-all-along", tags={"job_id": "7"}, spill_path=spill,
                      system_metrics=False)
    assert tracker.run_id is None
    tracker.log_params({"lr": 0.1, "epochs": 10})
    for step in range(10):
        tracker.log({"loss": 1.0 / (step + 1)}, step)
    tracker.log_artifact(str(artifact), "config")
    assert tracker.close("KILLED", timeout=1) is False
    before = spill.read_bytes()
    header, records = read_spill(spill)
    assert header["run_id"] is None

    down = run_sync("sync", str(tmp_path))
    assert down.returncode != 0
    assert len((down.stdout + down.stderr).strip().splitlines()) == 1 and "unreachable" in down.stderr
    assert spill.read_bytes() == before

    mlflow_server.start()
    done = run_sync("sync", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and not done.stderr.strip()
    assert not spill.exists()
    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("sync").experiment_id])
    assert run.info.run_id in done.stdout and "KILLED" in done.stdout
    assert run.info.status == "KILLED" and run.info.run_name == "down-all-along"
    assert run.data.params == {"lr": "0.1", "epochs": "10"} and run.data.tags["job_id"] == "7"
    assert steps(client, run.info.run_id, "loss") == list(range(10))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/recipe.yaml"]
    assert run.data.tags["fatscale.delivered_late"] == late(records)
    assert "nothing to sync" in run_sync("sync", str(tmp_path)).stdout


# Replays the spill like a requeued job, and SIGKILLs itself right after MLflow accepted its
# second request: a crash at a known point in the middle of a real replay.
CRASHING_REPLAY = """
import os, signal, sys
from pathlib import Path
from mlflow import MlflowClient
from fatscale.tracking.tracker import Tracker

accepted = 0
log_batch = MlflowClient.log_batch

def log_batch_then_crash(self, *args, **kwargs):
    global accepted
    log_batch(self, *args, **kwargs)
    accepted += 1
    if accepted == 2:
        os.kill(os.getpid(), signal.SIGKILL)

MlflowClient.log_batch = log_batch_then_crash
Tracker(sys.argv[1], "crash", "replayed", spill_path=Path(sys.argv[2]), system_metrics=False).close(timeout=120)
"""


@pytest.mark.slow  # ~25 s on 2 cores: a server restart, a replaying interpreter
def test_replay_killed_midway_then_completed_delivers_each_record_once(mlflow_server, tmp_path):
    """(c) A replay SIGKILLed after part of the spill went in, then done again by the next job:
    one run, every metric point once."""
    mlflow_server.stop(signal.SIGKILL)
    spill = tmp_path / SPILL_FILE
    tracker = Tracker(mlflow_server.uri, "crash", "replayed", spill_path=spill, system_metrics=False)
    for step in range(1500):  # 3000 points: three requests of 1000
        tracker.log({"loss": 1.0 / (step + 1), "grad_norm": float("nan") if step % 100 == 0 else 1.0}, step)
    assert tracker.close("KILLED", timeout=0.5) is False
    assert read_spill(spill)[0]["run_id"] is None

    mlflow_server.start()
    crashed = subprocess.run([sys.executable, "-c", CRASHING_REPLAY, mlflow_server.uri, str(spill)], cwd=REPO,
                             timeout=120)
    assert crashed.returncode == -signal.SIGKILL
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name("crash").experiment_id
    [run] = client.search_runs([experiment_id])
    delivered = len(client.get_metric_history(run.info.run_id, "loss")) + len(
        client.get_metric_history(run.info.run_id, "grad_norm"))
    assert 0 < delivered < 3000
    assert read_spill(spill)[0]["run_id"] == run.info.run_id  # recorded before the replay began

    resumed = Tracker(mlflow_server.uri, "crash", "replayed", spill_path=spill, system_metrics=False)
    assert resumed.run_id == run.info.run_id
    resumed.log({"loss": 0.0}, 1500)
    assert resumed.close(timeout=120) is True
    assert not spill.exists()
    assert len(client.search_runs([experiment_id])) == 1
    assert steps(client, run.info.run_id, "loss") == list(range(1501))
    grad_norm = client.get_metric_history(run.info.run_id, "grad_norm")
    assert sorted(m.step for m in grad_norm) == list(range(1500))
    assert sorted(m.step for m in grad_norm if math.isnan(m.value)) == list(range(0, 1500, 100))


@pytest.mark.slow  # ~20 s on 2 cores: a server restart
def test_finished_is_set_only_once_everything_is_delivered(mlflow_server, tmp_path, caplog):
    """(d) finish("FINISHED") times out: the run stays RUNNING, not FINISHED, until the spill is
    delivered; the run then also says that MLflow rejected a record before it ended."""
    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    spill = tmp_path / SPILL_FILE
    first = Tracker(mlflow_server.uri, "finished", "d", system_metrics=False)
    first.log_params({"lr": 0.1})
    assert first.close() is True
    run_id = first.run_id
    resumed = Tracker(mlflow_server.uri, "finished", "d", run_id=run_id, spill_path=spill, system_metrics=False)
    resumed.log_params({"lr": 0.2})  # MLflow rejects a changed param
    for step in range(5):
        resumed.log({"loss": float(step)}, step)
    wait_for_steps(client, run_id, "loss", 5)

    mlflow_server.stop(signal.SIGKILL)
    for step in range(5, 10):
        resumed.log({"loss": float(step)}, step)
    assert resumed.close("FINISHED", timeout=1) is False
    header, records = read_spill(spill)
    assert header["rejected"] == 1 and records[-1] == {"kind": "terminate", "status": "FINISHED"}

    mlflow_server.start()
    time.sleep(2)  # time for anything still running in this process to reach the server
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and steps(client, run_id, "loss") == list(range(5))
    assert main(["sync", str(tmp_path)]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and steps(client, run_id, "loss") == list(range(10))
    assert run.data.tags["fatscale.rejected_records"] == "1" and run.data.params == {"lr": "0.1"}
    assert run.data.tags["fatscale.delivered_late"] == late(records)


@pytest.mark.slow  # ~10 s on 2 cores: waits out requests to a frozen server
def test_finish_keeps_its_timeout_while_the_server_hangs(mlflow_server, tmp_path, monkeypatch):
    """A server that accepts connections and never answers (SIGSTOP) holds every request for
    MLFLOW_HTTP_REQUEST_TIMEOUT; neither the queue nor the system-metrics monitor may hold up finish()."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    spill = tmp_path / SPILL_FILE
    tracker = Tracker(mlflow_server.uri, "hang", "frozen", spill_path=spill, system_metrics=True)
    tracker.log({"loss": 0.0}, 0)
    wait_for_steps(client, tracker.run_id, "loss", 1)
    os.killpg(mlflow_server.process.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # the monitor is now blocked on a request too
        for step in range(1, 11):
            tracker.log({"loss": float(step)}, step)
        started = time.monotonic()
        assert tracker.close("KILLED", timeout=2) is False
        assert time.monotonic() - started < 3
    finally:
        os.killpg(mlflow_server.process.pid, signal.SIGCONT)
    assert spilled_steps(read_spill(spill)[1], "loss") == list(range(1, 11))
    assert main(["sync", str(tmp_path)]) == 0
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and steps(client, tracker.run_id, "loss") == list(range(11))


def test_a_spill_of_another_run_is_not_mixed_in(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    spill = tmp_path / SPILL_FILE
    tracker = Tracker(dead, "other", "a", run_id="a" * 32, spill_path=spill, system_metrics=False)
    tracker.log({"loss": 1.0}, 0)
    assert tracker.close("KILLED", timeout=0.5) is False
    assert read_spill(spill)[0]["run_id"] == "a" * 32  # the run it resumes, though not reached yet
    with pytest.raises(ValueError, match="sync"):
        Tracker(dead, "other", "b", run_id="b" * 32, spill_path=spill, system_metrics=False)
    assert read_spill(spill)[0]["run_id"] == "a" * 32
