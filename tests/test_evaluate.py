"""python -m fatscale.evaluate on a real training run (2 DeepSpeed ranks, DALI, real JPEGs, MLflow):
the figures it gets back are the ones the run logged, from the output directory, the exported
folder, the registry and under torchrun; its files and MLflow records; one-line refusals."""

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

import fatscale  # noqa: F401  (registers the FAT models with timm)
import timm
from conftest import demo_recipe
from fatscale import evaluate as evaluate_cli

ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
pytestmark = pytest.mark.slow


class Run:
    """A finished 2-rank demo run at 32 px and what it logged."""

    def __init__(self, out: Path, shards: Path):
        self.out, self.shards = out, shards
        self.uri = f"sqlite:///{out / 'mlflow.db'}"
        client = MlflowClient(self.uri)
        [run] = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
        self.run_id, self.metrics = run.info.run_id, run.data.metrics

    def logged(self, model: str) -> tuple[float, float]:
        """(top-1, top-5) of the run's final evaluation of ``model``."""
        suffix = model.removeprefix("model")
        return self.metrics[f"top1{suffix}"], self.metrics[f"val/top5{suffix}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_shards) -> Run:
    root = tmp_path_factory.mktemp("evaluated")
    # 2 epochs of 15 steps without warmup: a model that tells some classes apart (~30% top-1),
    # so that equal figures mean equal predictions.
    path = demo_recipe(root, demo_shards, data={"img_size": 32}, train={"epochs": 2},
                       optim={"warmup_epochs": 0, "lr": 4e-2})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "fatscale.train", str(path)], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Run(root / "out", demo_shards)


def evaluate(*args: str, nproc: int = 0, cwd: Path | None = None,
             env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else []
    done = subprocess.run([sys.executable, *launcher, "-m", "fatscale.evaluate", *args], env=env or ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def figures(done: subprocess.CompletedProcess) -> dict[tuple[str, int], dict]:
    return {(entry["model"], entry["size"]): entry for entry in json.loads(done.stdout)}


def test_an_output_directory_scores_what_the_run_logged(run):
    # The recipe's size, crop, val batch (40: one process cuts the val split into the batches the
    # two ranks did) and precision are the defaults.
    found = figures(evaluate(str(run.out), "--shards", str(run.shards), "--json"))
    assert found.keys() == {("model", 32), ("model_ema", 32)}
    for model in ("model", "model_ema"):
        entry = found[model, 32]
        assert (entry["top1"], entry["top5"]) == run.logged(model)
        assert entry["images"] == 160
    # Per-class figures add up to the totals; a confusion picture per model and size.
    evaluation = run.out / "evaluation"
    assert json.loads((evaluation / "results.json").read_text())["results"] == list(found.values())
    rows = list(csv.DictReader((evaluation / "per_class_model_ema_32px.csv").open()))
    assert [row["name"] for row in rows] == ["blobs", "checks", "diagonal", "dots", "horizontal", "plain", "rings",
                                             "vertical"]
    assert sum(int(row["images"]) for row in rows) == 160
    assert 100 * sum(int(row["top1_correct"]) for row in rows) / 160 == found["model_ema", 32]["top1"]
    for model in ("model", "model_ema"):
        assert (evaluation / f"confusion_{model}_32px.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_exported_folder_and_the_registered_model_score_the_runs_ema_figures(run, tmp_path):
    # The folder's config.json gives the size and crop; the registry's model is that folder.
    exported = figures(evaluate(str(run.out / "export" / "model_ema"), "--shards", str(run.shards), "--json",
                                cwd=tmp_path))
    assert list(exported) == [("model_ema", 32)]
    assert (exported["model_ema", 32]["top1"], exported["model_ema", 32]["top5"]) == run.logged("model_ema")
    assert (tmp_path / "evaluation" / "per_class_model_ema_32px.csv").exists()  # ./evaluation by default
    registered = figures(evaluate("models:/recipe-fat_b0-ema/1", "--shards", str(run.shards), "--json",
                                  "--out", str(tmp_path / "registry"), env=dict(ENV, MLFLOW_TRACKING_URI=run.uri)))
    assert registered == exported


def test_torchrun_ranks_give_the_same_figures_and_log_them_into_the_finished_run(run, tmp_path):
    client = MlflowClient(run.uri)
    before = client.get_run(run.run_id).info
    history = client.get_metric_history(run.run_id, "val/top1")
    done = evaluate(str(run.out), "--shards", str(run.shards), "--sizes", "32", "48", "--log-to-run",
                    "--out", str(tmp_path), nproc=2)
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["model", "size", "top-1", "top-5", "images"]
    assert lines[2].split() == ["model", "32", f"{run.logged('model')[0]:.2f}", f"{run.logged('model')[1]:.2f}", "160"]
    assert f"logged to MLflow run {run.run_id} at step 30" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ranks"] == "2 CPU ranks"
    found = {(e["model"], e["size"]): e for e in results["results"]}
    assert [(found[m, 32]["top1"], found[m, 32]["top5"]) for m in ("model", "model_ema")] == \
        [run.logged("model"), run.logged("model_ema")]
    # Training's keys at the run's last step; the recipe's own size also as val/top1; status unchanged.
    after = client.get_run(run.run_id)
    for model, suffix in (("model", ""), ("model_ema", "_ema")):
        for size in (32, 48):
            assert after.data.metrics[f"val/top1{suffix}_{size}px"] == found[model, size]["top1"]
            assert after.data.metrics[f"val/top5{suffix}_{size}px"] == found[model, size]["top5"]
            assert f"val/loss{suffix}_{size}px" in after.data.metrics
    assert client.get_metric_history(run.run_id, "val/top1_48px")[0].step == history[-1].step == 30
    assert [m.value for m in client.get_metric_history(run.run_id, "val/top1")] == \
        [m.value for m in history] + [found["model", 32]["top1"]]
    assert (after.info.status, after.info.end_time) == (before.status, before.end_time) == ("FINISHED", before.end_time)
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.run_id, "evaluation")}
    assert {"results.json", "per_class_model_48px.csv", "confusion_model_ema_32px.png"} <= artifacts


def test_a_bare_weights_file_on_the_train_split(run, tmp_path):
    weights = tmp_path / "weights.safetensors"
    save_file(load_file(str(run.out / "export" / "model" / "model.safetensors")), str(weights))
    done = evaluate(str(weights), "--model", "fat_b0", "--shards", str(run.shards), "--split", "train", "--sizes", "32",
                    "--crop-pct", "1.0", "--batch", "64", cwd=tmp_path)
    assert done.stdout.splitlines()[0].endswith("train (480 images), crop 1, batch 64, fp32, 1 CPU rank")
    row = done.stdout.splitlines()[2].split()
    assert row[:2] == ["model", "32"] and row[-1] == "480"
    assert (tmp_path / "evaluation" / "train" / "per_class_model_32px_crop1.csv").exists()


def test_help_and_a_missing_source_answer_without_torch(tmp_path):
    probe = ("import runpy, sys\n"
             "sys.argv = ['fatscale.evaluate', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('fatscale.evaluate', run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules, file=sys.stderr)\n")
    for args, code in ((["--help"], 0), ([str(tmp_path / "nothing"), "--shards", str(tmp_path)], 2)):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert done.stderr.splitlines()[-1] == f"exit {code} False"
    assert done.stderr.splitlines() == [f"error: {tmp_path / 'nothing'}: no such file or directory", "exit 2 False"]


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if an evaluation gets as far as building its process group or pipelines."""
    def refuse(*_):
        raise AssertionError("the evaluation started")
    monkeypatch.setattr(evaluate_cli, "init_group", refuse)
    monkeypatch.setattr(evaluate_cli, "evaluate_all", refuse)


def fat(name: str, **extra) -> dict:
    return {**timm.create_model(name, num_classes=8).state_dict(), **extra}


def weights_file(tmp_path: Path, content, *flags: str) -> list[str]:
    """SOURCE and flags for a file of ``content``: bytes as they are, anything else through torch.save."""
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return [str(path), *flags]


# case -> (its SOURCE and flags from tmp_path and the run, what the error says)
BAD = {
    "missing": (lambda tmp, run: [str(tmp / "nothing-here")], "no such file or directory"),
    "folder": (lambda tmp, run: [str(tmp)],
               "neither a run's output directory, a checkpoint, an exported timm folder nor a weights file"),
    "list_pickle": (lambda tmp, run: weights_file(tmp, [1, 2, 3]), "not a state dict (a mapping of names to tensors)"),
    # os.system, pickled: run if unpickled as code; refused, never run
    "code_pickle": (lambda tmp, run: weights_file(tmp, pickle.dumps(os.system)),
                    "not a state dict loadable without running code"),
    "other_architecture": (lambda tmp, run: weights_file(tmp, fat("fat_b1"), "--model", "fat_b0"), "has shape"),
    "named_architecture": (lambda tmp, run: [str(run.out), "--model", "fat_b1"], "holds fat_b0 weights, not fat_b1"),
    "unexpected_key": (lambda tmp, run: weights_file(tmp, fat("fat_b0", **{"extra.weight": torch.zeros(1)}),
                                                     "--model", "fat_b0"), "unexpected key extra.weight"),
    "no_architecture": (lambda tmp, run: weights_file(tmp, fat("fat_b0")), "the file names no architecture"),
    "other_classes": (lambda tmp, run: weights_file(tmp, timm.create_model("fat_b0").state_dict(), "--model", "fat_b0"),
                      "classifies 1000 classes, "),
    "no_run": (lambda tmp, run: weights_file(tmp, fat("fat_b0"), "--model", "fat_b0", "--log-to-run"),
               "names no MLflow run"),
    "split": (lambda tmp, run: [str(run.out), "--split", "test"], "--split test: "),
    "size": (lambda tmp, run: [str(run.out), "--sizes", "16"], "argument --sizes: 16: sizes start at 32 px"),
    "shards": (lambda tmp, run: [str(run.out), "--shards", str(tmp)], "no such manifest"),
}


@pytest.mark.parametrize("case", BAD)
def test_every_bad_source_or_flag_is_one_line_before_any_work(run, tmp_path, capsys, no_work, case):
    make, message = BAD[case]
    with pytest.raises(SystemExit) as refused:
        evaluate_cli.main(["--shards", str(run.shards), *make(tmp_path, run)])
    err = capsys.readouterr().err
    assert refused.value.code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
