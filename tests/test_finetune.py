"""Fine-tuning (``model.init_from``, fatscale.weights): every kind of SOURCE, strict loading but for
the classifier, one-line refusals, layer-wise LR decay, and real runs: a demo model registered in a
real MLflow server fine-tuned on fewer classes from ``models:/NAME/VERSION``."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

import fatscale  # noqa: F401  (registers the FAT models with timm)
import timm
from conftest import REPO, demo_recipe
from fatscale.config import load_recipe
from fatscale.train import components
from fatscale.weights import SourceError, build_model, load_weights

WIDER = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16))  # FAT-B0's layers, other widths
LOCAL = str(REPO / "launch" / "local.py")


def run_local(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LOCAL, str(path), "--nproc", "2", *args], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_weights_files_load_strictly_and_a_new_head_is_fresh(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("fat_b0", num_classes=10)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": trained.state_dict()}, tmp_path / "release.pth")  # the official release's layout
    for source in (tmp_path / "w.safetensors", tmp_path / "release.pth"):
        weights = load_weights(str(source))
        same = build_model(weights, "fat_b0")
        assert all(torch.equal(same.state_dict()[k], v) for k, v in trained.state_dict().items())
        fewer = build_model(weights, "fat_b0", num_classes=4)  # another number of classes
        assert fewer.head.weight.shape == (4, 256)
        assert all(torch.equal(fewer.state_dict()[k], v) for k, v in trained.state_dict().items() if not k.startswith("head"))


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file or directory"),
    ("folder", "neither a run's output directory, a checkpoint, an exported timm folder nor a weights file"),
    ("not_a_state_dict", "not a state dict (a mapping of names to tensors)"),
    ("code", "not a state dict loadable without running code"),
    ("other_architecture", "has shape"),
    ("unexpected_key", "unexpected key extra.weight"),
    ("named_architecture", "holds fat_b1 weights, not fat_b0"),
])
def test_every_bad_source_is_one_line(tmp_path, case, message):
    state = timm.create_model("fat_b0", num_classes=10, **WIDER).state_dict()
    source = tmp_path / "w.pt"
    if case == "missing":
        source = tmp_path / "nothing-here"
    elif case == "folder":
        source = tmp_path
    elif case == "not_a_state_dict":
        torch.save([1, 2, 3], source)
    elif case == "code":  # a pickle that would run code: refused, not run
        source.write_bytes(pickle.dumps(os.system))
    elif case == "other_architecture":
        torch.save(state, source)
    elif case == "unexpected_key":
        torch.save({**timm.create_model("fat_b0").state_dict(), "extra.weight": torch.zeros(1)}, source)
    elif case == "named_architecture":
        (tmp_path / "export").mkdir()
        timm.models.save_for_hf(timm.create_model("fat_b1", num_classes=3), str(tmp_path / "export"),
                                safe_serialization=True)
        source = tmp_path / "export"
    with pytest.raises(SourceError) as refused:
        build_model(load_weights(str(source)), "fat_b0")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_layer_decay_gives_lower_blocks_smaller_learning_rates(tmp_path, demo_shards):
    recipe = load_recipe(demo_recipe(tmp_path, demo_shards, optim={"layer_decay": 0.5}))
    model = timm.create_model("fat_b0", num_classes=8)
    optimizer = components.build_optimizer(recipe, model, global_batch=recipe.train.batch_per_device)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    # stem, 12 blocks and the final norm + head: 0.5 ** 13 .. 1.0
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** 13) and len(scales) == 14
    head = next(g for g in optimizer.param_groups if any(p is model.head.weight for p in g["params"]))
    stem = next(g for g in optimizer.param_groups if any(p is model.patch_embed.conv1.conv[0].weight for p in g["params"]))
    assert head["lr_scale"] == 1.0 and stem["lr_scale"] == scales[0]


def test_a_launch_with_a_bad_init_from_fails_before_training(tmp_path, demo_shards):
    (tmp_path / "w.pt").write_bytes(b"not a pickle")
    path = demo_recipe(tmp_path, demo_shards, model={"init_from": str(tmp_path / "w.pt")})
    out = run_local(path)
    assert out.returncode != 0 and out.stderr.startswith(f"error: {tmp_path / 'w.pt'}: not a state dict")
    assert out.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    path = demo_recipe(tmp_path, demo_shards, model={"init_from": str(tmp_path / "missing")})
    out = run_local(path)
    assert out.returncode != 0 and "model.init_from: no such file or directory" in out.stderr


@pytest.fixture(scope="module")
def fewer_classes(tmp_path_factory) -> Path:
    """Shards of 4 of the demo's 8 classes, other images of them (another seed)."""
    from fatscale.prep import make_shards
    from fatscale.tryout.demo_data import CLASSES, make_demo_images

    root = tmp_path_factory.mktemp("fewer")
    images = make_demo_images(root / "images", per_class=80, val_per_class=20, size=56, seed=7)
    for split in ("train", "val"):
        for name in CLASSES[4:]:
            for f in (images / split / name).iterdir():
                f.unlink()
            (images / split / name).rmdir()
    make_shards(images, root / "shards", samples_per_shard=60, progress=False, log=lambda *a: None)
    return root / "shards"


@pytest.mark.slow
def test_fine_tuning_a_registered_model_on_fewer_classes(tmp_path, demo_shards, fewer_classes, mlflow_server):
    settings = dict(data={"img_size": 32}, tracking={"uri": mlflow_server.uri, "experiment": "finetune"})
    for run in ("base", "tuned", "scratch"):
        (tmp_path / run).mkdir()
    assert run_local(demo_recipe(tmp_path / "base", demo_shards, train={"epochs": 4}, **settings)).returncode == 0
    client = MlflowClient(mlflow_server.uri)
    (version,) = client.search_model_versions("name='recipe-fat_b0-ema'")
    source = f"models:/recipe-fat_b0-ema/{version.version}"
    short = dict(train={"epochs": 1}, optim={"warmup_epochs": 0}, **settings)
    tuned = demo_recipe(tmp_path / "tuned", fewer_classes, model={"init_from": source}, **short)
    first = run_local(tuned, "--set", "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"initialised from {source}; the classifier is re-initialised (8 classes there, 4 here)" in first.stdout
    again = run_local(tuned)  # 10 steps: resumes its own checkpoint at 3 (init_from only starts a fresh run)
    assert again.returncode == 0 and "resuming from" in again.stdout and "initialised from" not in again.stdout
    assert run_local(demo_recipe(tmp_path / "scratch", fewer_classes, **short)).returncode == 0

    runs = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    by_shards = {(run.data.params["data.shards"], run.data.params["model.init_from"]): run for run in runs}
    fine_tuned, from_scratch = by_shards[(str(fewer_classes), source)], by_shards[(str(fewer_classes), "None")]
    assert fine_tuned.data.tags["init_from"] == source and fine_tuned.data.tags["init_from_run_id"] == version.run_id
    print("top-1 fine-tuned", fine_tuned.data.metrics["top1"], "from scratch", from_scratch.data.metrics["top1"])
    assert fine_tuned.data.metrics["top1"] >= from_scratch.data.metrics["top1"] + 15  # measured: 57.5 vs 30.0
