"""README command 1, `python launch/local.py --demo`, as a newcomer runs it (in a fresh directory):
the real demo recipe end to end (the pipeline's end-to-end test: it learns, tracks, exports and
registers), its bounds, and what its console shows."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

import fatscale  # noqa: F401  (registers the FAT models with timm)
import timm
from conftest import REPO
from fatscale.checkpoint import layout as ckpt
from fatscale.tryout.demo_data import CLASSES

pytestmark = pytest.mark.slow  # ~2.5 minutes on 2 cores: the whole demo

# Library chatter that belongs in OUTPUT_DIR/train.log, not on the console: DeepSpeed's compiler
# probes and build message, MLflow's database set-up and system-metrics lines, the sync_bn warning.
NOISE = ("compilers.C.base", "built successfully", "mlflow.store.db", "database tables", "system_metrics",
         "system metrics", "sync_bn")


def test_the_demo_reaches_90_percent_with_the_ema_close_and_says_what_to_do_next(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    demo = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "--demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    console = demo.stdout + demo.stderr
    assert demo.returncode == 0, console[-4000:]
    noisy = [line for line in console.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, noisy
    log = (tmp_path / "outputs" / "demo_cpu" / "train.log").read_text()
    assert "compilers.C.base" in log and "Creating initial MLflow database tables" in log  # kept, in the log

    uri = f"sqlite:///{tmp_path / 'outputs' / 'demo_cpu' / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
    metrics = run.data.metrics
    print(f"demo: top1 {metrics['top1']:.2f}%, top1_ema {metrics['top1_ema']:.2f}%, best {metrics['best_top1']:.2f}%")
    assert run.info.status == "FINISHED"
    assert metrics["top1"] >= 90 and abs(metrics["top1"] - metrics["top1_ema"]) <= 5
    assert {"val/top5", "val/loss", "train/loss", "train/lr"} <= set(metrics)
    assert run.data.params["train.epochs"] == "12" and run.data.params["global_batch"] == "64"
    # What MLflow's UI shows: the source and its commit, and a description that states the result.
    tags = run.data.tags
    assert tags["model"] == "fat_b0" and tags["nodes"] == "1"
    assert tags["mlflow.source.name"] == str(REPO / "fatscale" / "train" / "trainer.py") and tags["mlflow.source.type"] == "LOCAL"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit
    # 800 train images on 2 ranks of 32: 12 steps per epoch, 144 in all
    note = tags["mlflow.note.content"]
    assert note.startswith(f"**top-1 {metrics['top1']:.2f}%** (EMA {metrics['top1_ema']:.2f}%, best "
                           f"{metrics['best_top1']:.2f}%) on textures/val (200 images): fat_b0 trained on textures/train "
                           "(800 images, 8 classes) for 12 epochs (144 steps), ")
    assert " images/s, " in note and note.endswith(" device-hours on 2 CPU ranks.")
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["textures/train", "textures/val"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"recipe.yaml", "train.log"}
    # The final raw and EMA weights: timm folders, registered as model versions with their top-1.
    versions = {v.name: v for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")}
    assert sorted(versions) == ["demo_cpu-fat_b0", "demo_cpu-fat_b0-ema"]
    assert versions["demo_cpu-fat_b0-ema"].description == (
        f"fat_b0, EMA weights at step 144: top-1 {metrics['top1_ema']:.2f}% on textures/val (200 images)")
    logged = {m.name: m for m in client.search_logged_models([run.info.experiment_id])}
    assert [(m.key, m.value) for m in logged["demo_cpu-fat_b0"].metrics] == [("top1", metrics["top1"])]
    # The export loads from its folder alone, with the trained function: the EMA of the last checkpoint.
    out = tmp_path / "outputs" / "demo_cpu"
    model = timm.create_model(f"local-dir:{out / 'export' / 'model_ema'}", pretrained=True).eval()
    assert model.num_classes == len(CLASSES) and tuple(model.pretrained_cfg["input_size"]) == (3, 64, 64)
    assert model.pretrained_cfg["label_names"] == sorted(CLASSES)
    tag = ckpt.latest_tag(out / "checkpoints")
    assert torch.equal(ckpt.load_ema(out / "checkpoints", tag)["head.weight"], model.head.weight.detach())

    # The final printout: the result, the weights and how to load them, the UI, the curves.
    assert f"MLflow run {run.info.run_id} (FINISHED)" in demo.stdout
    assert f"top1 {metrics['top1']:.2f}%, top1_ema {metrics['top1_ema']:.2f}%" in demo.stdout
    assert ("load: import fatscale, timm; timm.create_model('local-dir:outputs/demo_cpu/export/model_ema'"
            in demo.stdout)
    assert "weights (timm folders): outputs/demo_cpu/export/model, outputs/demo_cpu/export/model_ema" in demo.stdout
    assert "registered in MLflow: models:/demo_cpu-fat_b0/1, models:/demo_cpu-fat_b0-ema/1" in demo.stdout
    assert (f"browse the run: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/#/experiments/"
            f"{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning") in demo.stdout
    (curves,) = re.findall(r"curves: .* or: (python -c .*)$", demo.stdout, re.M)
    history = subprocess.run([sys.executable, *shlex.split(curves)[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert history.returncode == 0 and len(history.stdout.splitlines()) == 12  # val/top1_ema, every epoch
