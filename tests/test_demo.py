"""README command 1, `python launch/local.py --demo`, as a newcomer runs it (in a fresh directory):
the real demo recipe end to end, its bounds, and what its console shows."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import REPO

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
    assert run.inputs.dataset_inputs[0].dataset.name.startswith("textures/")

    # The final printout: the result, the weights and how to load them, the UI, the curves.
    assert f"MLflow run {run.info.run_id} (FINISHED)" in demo.stdout
    assert "weights (timm folders): outputs/demo_cpu/export/model, outputs/demo_cpu/export/model_ema" in demo.stdout
    assert "registered in MLflow: models:/demo_cpu-fat_b0/1, models:/demo_cpu-fat_b0-ema/1" in demo.stdout
    assert (f"browse the run: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/#/experiments/"
            f"{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning") in demo.stdout
    (curves,) = re.findall(r"curves: .* or: (python -c .*)$", demo.stdout, re.M)
    history = subprocess.run([sys.executable, *shlex.split(curves)[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert history.returncode == 0 and len(history.stdout.splitlines()) == 12  # val/top1_ema, every epoch
