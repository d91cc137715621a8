"""Damaged checkpoints end to end (real DeepSpeed ranks under torchrun, real DALI, real files): a
relaunch names the damaged file and resumes from the newest intact checkpoint to the weights of an
uninterrupted run; with none intact it refuses in one line and trains nothing; ``verify`` and
``export`` name the damage."""

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import demo_recipe
from fatscale.checkpoint import layout as ckpt
from mlflow.tracking import MlflowClient
from test_checkpoint import flip_middle_byte
from test_train import LOCAL, launch, run

pytestmark = pytest.mark.slow

# 15 steps per epoch on 2 ranks; saves at steps 2, 4, 6 (and again at the last step, the end's).
# ZeRO 1: each rank writes a DeepSpeed file of its own (its optimizer partition).
SETTINGS = dict(train={"epochs": 1, "max_steps": 6, "deterministic": True, "zero_stage": 1},
                checkpoint={"every_steps": 2, "keep_last": 2}, data={"img_size": 32})
STATES = "mp_rank_00_model_states.pt"


def make_recipe(folder: Path, shards: Path) -> Path:
    folder.mkdir()
    return demo_recipe(folder, shards, **SETTINGS)


@pytest.fixture(scope="module")
def fell_back(tmp_path_factory, demo_shards) -> SimpleNamespace:
    """An uninterrupted run to step 6; the same run ended at step 4 (train.max_steps), the DeepSpeed
    file of its newest checkpoint damaged in the middle (size unchanged), then relaunched to step 6;
    and a copy of its checkpoints as the relaunch found them."""
    root = tmp_path_factory.mktemp("damaged")
    run(make_recipe(root / "reference", demo_shards))
    recipe = make_recipe(root / "damaged", demo_shards)
    run(recipe, "train.max_steps=4")
    checkpoints = root / "damaged" / "out" / "checkpoints"
    flip_middle_byte(checkpoints / ckpt.tag_for(4) / STATES)
    shutil.copytree(checkpoints, root / "as-found" / "checkpoints")
    return SimpleNamespace(root=root, recipe=recipe, checkpoints=checkpoints, as_found=root / "as-found",
                           out=run(recipe), shards=demo_shards)


def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_before_it_to_the_same_weights(fell_back):
    checkpoints, out = fell_back.checkpoints, fell_back.out
    step_2, step_4 = checkpoints / ckpt.tag_for(2), checkpoints / ckpt.tag_for(4)
    assert f"checkpoint {step_4}: {step_4 / STATES} is damaged (sha256 mismatch); resuming from {step_2}" in out
    assert f"resuming from {step_2} (epoch 0, step 2)" in out
    for name in ("model", "model_ema"):
        a = load_file(str(fell_back.root / "reference" / "out" / "export" / name / "model.safetensors"))
        b = load_file(str(fell_back.root / "damaged" / "out" / "export" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    # Step 4 was saved again over the damaged one; the seal records every file of both ranks.
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [ckpt.tag_for(4), ckpt.tag_for(6)]
    for tag in (ckpt.tag_for(4), ckpt.tag_for(6)):
        assert ckpt.verify(checkpoints, tag).good
        sealed = ckpt.read_json(checkpoints / tag / ckpt.COMPLETE)["files"]
        assert sorted(sealed) == sorted(p.name for p in (checkpoints / tag).iterdir() if p.name != ckpt.COMPLETE)
        assert {STATES, "progress.json", "ema.safetensors"} | {f"rank-{r}.json" for r in (0, 1)} \
            | {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} == sealed.keys()


def test_verify_says_which_checkpoints_are_good_and_export_refuses_a_damaged_one(fell_back):
    checkpoints = fell_back.as_found / "checkpoints"
    verify = subprocess.run([sys.executable, "-m", "fatscale.checkpoint", "verify", str(fell_back.as_found)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 2, verify.stderr  # the newest is damaged, an older one is good
    assert verify.stdout.splitlines() == [
        f"{ckpt.tag_for(2)}  good",
        f"{ckpt.tag_for(4)}  damaged: {checkpoints / ckpt.tag_for(4) / STATES} is damaged (sha256 mismatch)"]
    export = subprocess.run([sys.executable, "-m", "fatscale.export", str(fell_back.as_found)], capture_output=True,
                            text=True, timeout=300)
    assert export.returncode == 1 and export.stderr.count("\n") == 1
    assert export.stderr.startswith(f"error: {checkpoints / ckpt.tag_for(4) / STATES} is damaged (sha256 mismatch): "
                                    f"not exported")
    assert not (fell_back.as_found / "export").exists()


def test_with_every_checkpoint_damaged_a_relaunch_refuses_in_one_line_and_trains_nothing(fell_back, tmp_path):
    shutil.copytree(fell_back.root / "damaged" / "out", tmp_path / "out")
    recipe = demo_recipe(tmp_path, fell_back.shards, **SETTINGS)
    checkpoints = tmp_path / "out" / "checkpoints"
    flip_middle_byte(checkpoints / ckpt.tag_for(6) / "ema.safetensors")
    (checkpoints / ckpt.tag_for(4) / "rank-1.json").unlink()
    before = sorted(p.name for p in checkpoints.iterdir())
    client = MlflowClient(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
    losses = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")]
    refusal = (f"no checkpoint in {checkpoints} is intact: {checkpoints / ckpt.tag_for(6) / 'ema.safetensors'} is "
               f"damaged (sha256 mismatch) (and 1 older ones are damaged); python -m fatscale.checkpoint verify "
               f"{tmp_path / 'out'} lists them; start fresh in another output_dir (--set output_dir=...) or after "
               f"removing {checkpoints}")

    launcher = subprocess.run([sys.executable, LOCAL, str(recipe), "--nproc", "2", "--set", "train.max_steps=8"],
                              capture_output=True, text=True, timeout=300)
    assert launcher.returncode == 1 and launcher.stderr == f"error: {refusal}\n"
    direct = launch(recipe, "train.max_steps=8")  # torchrun without the launcher: the trainer refuses too
    text, _ = direct.communicate(timeout=300)
    assert direct.returncode != 0
    assert [line.split(" ERROR ", 1)[1] for line in text.splitlines() if " ERROR " in line] == [refusal]
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # nothing saved, nothing pruned
    (after,) = client.search_runs([mlflow_run.info.experiment_id])
    assert after.info.status == mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(after.info.run_id, "train/loss")] == losses
