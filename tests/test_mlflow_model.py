"""A run as an MLflow citizen, against real MLflow stores: a real `mlflow server` over HTTP (with its
SQLite model registry) and a SQLite store. The trained weights become logged models and registered
model versions that load back without unpickling anything; the shards are the run's dataset inputs;
the experiment says it is a training one; MLflow's own log lines go through the application's
logging."""

import json
import logging
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.version import Version
from safetensors.torch import load_file

import fatscale  # noqa: F401  (registers the FAT models with timm)
import timm
from fatscale.data.manifest import load_manifest
from fatscale.export import WEIGHTS, load_mlflow_model, mlflow_flavors
from fatscale.tracking.spill import SPILL_FILE
from fatscale.tracking.tags import EXPERIMENT_TAGS
from fatscale.tracking.tracker import DIGEST_CHARS, Tracker


def timm_folder(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A FAT-B0 in the folder format fatscale exports (timm's: config.json + model.safetensors)."""
    torch.manual_seed(seed)
    model = timm.create_model("fat_b0", num_classes=8, bidirectional=True)
    timm.models.save_for_hf(model, str(folder), model_args=dict(bidirectional=True), safe_serialization=True)
    return load_file(str(folder / WEIGHTS))


def log_model(tracker: Tracker, folder: Path, step: int, top1: float) -> None:
    tracker.log_model("demo-fat_b0-ema", folder, mlflow_flavors("fat_b0"), {"top1_ema": top1}, step,
                      params={"weights": "EMA"}, registered_name="demo-fat_b0-ema",
                      description=f"EMA weights at step {step}: top-1 {top1}%")


@pytest.mark.slow  # ~25 s on 2 cores: a server restart, a sync interpreter, three model uploads
def test_weights_become_registered_models_that_load_back_without_pickle(mlflow_server, tmp_path, monkeypatch):
    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    weights = timm_folder(tmp_path / "step12", seed=0)
    tracker = Tracker(mlflow_server.uri, "registry", "demo", system_metrics=False, spill_path=tmp_path / SPILL_FILE)
    run_id = tracker.run_id
    # Logged while the server is away: the model record goes through the spill file and the sync command.
    mlflow_server.stop(signal.SIGKILL)
    log_model(tracker, tmp_path / "step12", 12, 91.5)
    assert tracker.close(timeout=1) is False
    mlflow_server.start()
    synced = subprocess.run([sys.executable, "-m", "fatscale.tracking", "sync", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert synced.returncode == 0, synced.stderr
    assert "1 model(s)" in synced.stdout

    (logged,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert logged.name == "demo-fat_b0-ema" and str(logged.status) == "READY"
    assert logged.source_run_id == run_id and logged.params == {"weights": "EMA"}
    assert [(m.key, m.value, m.step) for m in logged.metrics] == [("top1_ema", 91.5, 12)]
    run = client.get_run(run_id)
    assert [output.model_id for output in run.outputs.model_outputs] == [logged.model_id]
    assert [m.value for m in client.get_metric_history(run_id, "top1_ema")] == [91.5]  # the run's point, linked
    files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
    assert files == {"MLmodel", "config.json", WEIGHTS}  # no pickle anywhere
    (version,) = client.search_model_versions("name = 'demo-fat_b0-ema'")
    assert (version.version, version.source, version.run_id) == ("1", logged.artifact_location, run_id)
    assert version.description == "EMA weights at step 12: top-1 91.5%"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    model = load_mlflow_model("models:/demo-fat_b0-ema/1", dst_path=str(tmp_path / "download"))
    assert not model.training and model.num_classes == 8
    assert model.pretrained_cfg["source"] == "local-dir"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())
    mlmodel = yaml.safe_load((tmp_path / "download" / "MLmodel").read_text())
    assert mlmodel["model_id"] == logged.model_id and mlmodel["flavors"]["fatscale"]["model"] == "fat_b0"
    x = torch.randn(1, 3, 64, 64)  # the bidirectional interaction came back with the config
    reference = timm.create_model("fat_b0", num_classes=8, bidirectional=True).eval()
    reference.load_state_dict(weights)
    assert torch.allclose(model(x), reference(x))

    # The resumed run logs the same model again (a replay): nothing new. A later step is a new version.
    resumed = Tracker(mlflow_server.uri, "registry", "demo", run_id=run_id, system_metrics=False)
    log_model(resumed, tmp_path / "step12", 12, 91.5)
    later = timm_folder(tmp_path / "step24", seed=1)
    log_model(resumed, tmp_path / "step24", 24, 95.0)
    assert resumed.close() is True
    versions = sorted(client.search_model_versions("name = 'demo-fat_b0-ema'"), key=lambda v: int(v.version))
    assert [(v.version, v.description) for v in versions] == [
        ("1", "EMA weights at step 12: top-1 91.5%"), ("2", "EMA weights at step 24: top-1 95.0%")]
    assert len(client.search_logged_models([run.info.experiment_id])) == 2
    assert torch.equal(load_mlflow_model("models:/demo-fat_b0-ema/2").state_dict()["head.weight"], later["head.weight"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"loader_module": "x"}}}))
    client.log_artifact(run_id, str(other))
    with pytest.raises(ValueError, match="is not a fatscale model: its MLmodel has the flavors"):
        load_mlflow_model(f"runs:/{run_id}/other")


def test_the_shards_are_the_runs_dataset_inputs(tmp_path, demo_shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "datasets", "demo", system_metrics=False)
    manifest = load_manifest(demo_shards)
    tracker.log_manifest(manifest, demo_shards)
    tracker.log_manifest(manifest, demo_shards)  # a re-send adds nothing
    assert tracker.close() is True
    inputs = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert sorted(by_name) == ["shards/train", "shards/val"] and len(inputs) == 2
    for split, context, count in (("train", "training", 480), ("val", "evaluation", 160)):
        entry = by_name[f"shards/{split}"]
        assert entry.dataset.digest == manifest.split_digest(split)[:DIGEST_CHARS]
        assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", context)]
        assert json.loads(entry.dataset.source) == {"uri": str(demo_shards.resolve())}
        profile = json.loads(entry.dataset.profile)
        assert profile["num_samples"] == count and profile["num_classes"] == 8
        assert profile["num_shards"] == len(manifest.splits[split].shards)
        assert profile["sha256"] == manifest.split_digest(split)


def test_experiments_are_training_experiments_and_mlflow_logs_through_the_app(tmp_path, caplog, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.INFO):
        Tracker(uri, "new", "a", system_metrics=False).close()
    # MLflow's database set-up lines reach the application's handlers, not MLflow's own stderr one.
    assert any(r.name.startswith("mlflow.store.db") for r in caplog.records)
    assert "Creating initial MLflow database tables" not in capfd.readouterr().err
    client = MlflowClient(uri)
    assert EXPERIMENT_TAGS.items() <= client.get_experiment_by_name("new").tags.items()
    assert EXPERIMENT_TAGS["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made elsewhere gets the tags; a kind chosen by hand stays.
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    Tracker(uri, "chosen", "b", system_metrics=False).close()
    tags = client.get_experiment(chosen).tags
    assert tags["mlflow.experimentKind"] == "genai_development" and tags["mlflow.experiment.primaryMetric.name"] == "top1"


def test_dependencies_gpu_metrics_and_bounds_on_internals():
    requirements = {r.name: r for r in map(Requirement, metadata.requires("fatscale")) if not r.marker}  # as installed
    # GPU system metrics: MLflow's GPU monitor needs pynvml (else an ImportError); it is there, so without
    # a GPU the monitor fails only for want of NVML's driver library, and on a GPU node it starts.
    assert "nvidia-ml-py" in requirements
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    if torch.cuda.is_available():
        GPUMonitor()
    else:
        with pytest.raises(RuntimeError, match="Failed to initialize NVML"):
            GPUMonitor()
    # fatscale uses internals of these: each is bounded below its next minor release, which the installed one meets.
    for name in ("mlflow", "timm"):
        upper = [s for s in requirements[name].specifier if s.operator == "<"]
        assert upper, f"{name} has no upper bound"
        installed = Version(metadata.version(name))
        assert installed in requirements[name].specifier
        assert Version(upper[0].version) <= Version(f"{installed.major}.{installed.minor + 1}")
