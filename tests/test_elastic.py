"""Elastic resume: the same samples in every step, whatever the number of ranks of each session.
Real DALI over real JPEG shards; real DeepSpeed ranks (gloo) for the runs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import demo_recipe as recipe
from conftest import one_rank_world
from fatscale.checkpoint import layout as ckpt
from fatscale.data import ledger
from fatscale.data.loader import AugConfig, DataConfig, TrainLoader
from fatscale.data.manifest import load_manifest
from fatscale.data.sample_order import BatchLayout, LayoutError, SampleOrder
from test_train import kill_group, launch, run

PLAIN = AugConfig(rand_augment=None, color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)


def loaders(shards: Path, world: int, global_batch: int, max_micro: int, state: dict | None = None) -> list[TrainLoader]:
    layout = BatchLayout.for_world(global_batch, world, max_micro)
    cfg = DataConfig(shards=str(shards), img_size=32, num_threads=1)
    ranks = [TrainLoader(load_manifest(shards), cfg, PLAIN, layout.micro_batch, rank, world, seed=7,
                         grad_accum=layout.grad_accum) for rank in range(world)]
    for loader in ranks:
        if state is not None:
            loader.load_state_dict(state)
    return ranks


def global_batches(ranks: list[TrainLoader], steps: int) -> list[list[int]]:
    """The split's indices of each step's samples over all ranks, in rank order (across epochs)."""
    iterators = [iter(r) for r in ranks]
    batches = []
    for _ in range(steps):
        step = []
        for rank, loader in enumerate(ranks):
            for _ in range(loader.layout.grad_accum):
                try:
                    next(iterators[rank])
                except StopIteration:  # the epoch's end: the next one
                    iterators[rank] = iter(loader)
                    next(iterators[rank])
                step += loader.indices.tolist()
        batches.append(step)
    return batches


def test_layouts_keep_the_global_batch_or_are_refused():
    assert BatchLayout.for_world(32, 1, 16) == BatchLayout(32, 1, 16, 2)  # accumulation makes up for fewer ranks
    assert BatchLayout.for_world(32, 4, 16) == BatchLayout(32, 4, 8, 1)
    assert BatchLayout.for_world(36, 2, 8) == BatchLayout(36, 2, 6, 3)  # micro-batches as large as fit, evenly
    with pytest.raises(LayoutError, match="a global batch of 32 cannot be split over 3 ranks"):
        BatchLayout.for_world(32, 3, 16)


def test_train_global_batch_fixes_the_layout_of_a_fresh_run_and_must_match_a_checkpoint(tmp_path, demo_shards):
    from fatscale.checkpoint import resume
    from fatscale.config import RecipeError, load_recipe
    from fatscale.preflight import check_world

    path = recipe(tmp_path, demo_shards, train={"global_batch": 48})  # batch_per_device 16
    r = load_recipe(path)
    assert [resume.fresh_layout(r, w) for w in (1, 2, 3)] == [BatchLayout(48, 1, 16, 3), BatchLayout(48, 2, 12, 2),
                                                               BatchLayout(48, 3, 16, 1)]
    with pytest.raises(RecipeError, match=r"train\.global_batch: a global batch of 48 cannot be split over 5 ranks"):
        check_world(r, load_manifest(demo_shards), 5, str(path))
    progress = {"checkpoint": "CKPT", "resume_identity": {"global_batch": 32, "world_size": 2}}
    with pytest.raises(resume.ResumeMismatch, match="^CKPT was made with a global batch of 32; this run has "
                                                    "train.global_batch=48: resume with the same value or without it$"):
        resume.layout(r, 2, progress)
    assert resume.layout(load_recipe(path, ["train.global_batch=null"]), 1, progress) == BatchLayout(32, 1, 16, 2)
    with pytest.raises(RecipeError, match=r"train\.grad_accum: 2 with train\.global_batch 48: set one of them"):
        load_recipe(path, ["train.grad_accum=2"])


def test_the_order_is_a_function_of_seed_and_epoch_not_of_the_world_size(demo_shards):
    """1, 2 and 3 ranks (a global batch of 12) train every step on the same samples: the epoch's
    permutation of the split, 12 at a time, the tail dropped; each epoch another permutation."""
    num_samples = load_manifest(demo_shards).splits["train"].num_samples
    steps = num_samples // 12  # 40
    worlds = {world: global_batches(loaders(demo_shards, world, 12, 4), steps + 3) for world in (1, 2, 3)}
    assert worlds[1] == worlds[2] == worlds[3]
    order = SampleOrder(num_samples, 7, BatchLayout(12, 1, 12, 1), 0)
    expected = [order.global_batch(epoch, step).tolist() for epoch, step in [(0, s) for s in range(steps)] +
                [(1, s) for s in range(3)]]
    assert worlds[1] == expected
    epoch_0 = [i for batch in worlds[1][:steps] for i in batch]
    assert len(epoch_0) == len(set(epoch_0)) == steps * 12  # every sample at most once in an epoch
    assert worlds[1][steps] != worlds[1][0]  # epoch 1 is another permutation


def test_a_loader_state_resumes_on_another_world_size_on_the_same_samples(demo_shards):
    """2 ranks (accumulating 2 micro-batches of 3) stop after 5 steps; 3 ranks (one micro-batch of 4)
    continue from rank 0's state with the samples an uninterrupted run would have had."""
    reference = global_batches(loaders(demo_shards, 2, 12, 3), 9)
    before = loaders(demo_shards, 2, 12, 3)
    first = global_batches(before, 5)
    state = json.loads(json.dumps(before[0].state_dict()))
    after = loaders(demo_shards, 3, 12, 4, state=state)
    assert [r.state.step for r in after] == [5] * 3  # micro-batches of one step each
    assert first + global_batches(after, 4) == reference
    with pytest.raises(ValueError, match="micro-batch 3 of a step of 2: not at an optimizer step's end"):
        loaders(demo_shards, 3, 12, 4, state={**state, "step": 3})


@pytest.mark.slow
def test_a_run_killed_on_2_ranks_goes_on_on_1_then_2_on_the_same_samples(tmp_path, demo_shards):
    """2 ranks, killed mid-epoch -> 1 rank (accumulating 2 micro-batches), killed again -> 2 ranks
    to the end: every step trained on the samples of the uninterrupted 2-rank run (the sample
    ledger), each sample of an epoch once, and MLflow has one FINISHED run with the world size over
    the steps."""
    settings = dict(train={"epochs": 2, "max_steps": 20, "sample_log": True, "eval_every": 2},
                    checkpoint={"every_steps": 2, "keep_last": 2}, data={"img_size": 32})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = recipe(tmp_path / "a", demo_shards, **settings)
    run(reference)
    path = recipe(tmp_path / "b", demo_shards, **settings)
    out = tmp_path / "b" / "out"
    checkpoints = out / "checkpoints"
    kills = []  # the checkpoint each killed session ended at
    for nproc in (2, 1):
        process = launch(path, nproc=nproc)
        past = kills[-1] + 4 if kills else 4
        deadline = time.monotonic() + 300
        while not ((checkpoints / ckpt.LATEST).exists() and int(ckpt.latest_tag(checkpoints).split("-")[1]) >= past):
            assert time.monotonic() < deadline and process.poll() is None, "no checkpoint to kill after"
            time.sleep(0.05)
        kill_group(process)
        kills.append(int(ckpt.latest_tag(checkpoints).split("-")[1]))
    assert kills[1] < 20
    text = run(path)
    assert f"resuming from {checkpoints / ckpt.tag_for(kills[1])}" in text
    assert "2 ranks (the checkpoint's: 1)" not in text  # back at the recipe's own layout: nothing to say

    for step in range(1, 21):
        got, expected = ledger.step_batch(out, step), ledger.step_batch(tmp_path / "a" / "out", step)
        assert got["keys"] == expected["keys"] and got["epoch"] == expected["epoch"], f"step {step}"
    epoch_0 = [key for step in range(1, 16) for key in ledger.step_batch(out, step)["keys"]]
    assert len(epoch_0) == len(set(epoch_0)) == 15 * 32  # 480 train samples, 15 steps of 32
    # Rank 1's file, written past the first kill, was cut back to its checkpoint: the 1-rank session
    # trained the steps between the kills alone, with micro-batches of 16 accumulated twice.
    lines = [json.loads(line) for line in (out / "samples" / "rank-1.jsonl").read_text().splitlines()]
    two_ranks = [*range(1, kills[0] + 1), *range(kills[1] + 1, 21)]
    assert [entry["step"] for entry in lines] == two_ranks and all(len(e["keys"]) == 16 for e in lines)
    assert all(ledger.step_batch(out, step)["ranks"] == (2 if step in two_ranks else 1) for step in range(1, 21))
    printed = subprocess.run([sys.executable, "-m", "fatscale.data.ledger", str(out), "--step", "17"],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(printed) == {**ledger.step_batch(out, 17), "ranks": 2}

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = sorted(client.get_metric_history(runs[0].info.run_id, "world_size"), key=lambda m: m.timestamp)
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (kills[0], 1.0), (kills[1], 2.0)]
    assert runs[0].data.params["global_batch"] == "32" and "world_size" not in runs[0].data.params


def full_optimizer_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weights and Adam moments, whole, from a live engine."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in engine.module.named_parameters():
        state[f"{name}/fp32"] = safe_get_full_fp32_param(param).float()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).float()
    return state


def saved_optimizer_state(checkpoint: Path, world: int) -> dict[str, torch.Tensor]:
    """The same from a ZeRO 1/2 checkpoint of ``world`` ranks, read directly: each rank's flat
    partition of each parameter group, concatenated, cut by the parameters' shapes."""
    model = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)
    ranks = [torch.load(checkpoint / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             ["optimizer_state_dict"] for r in range(world)]
    state = {}
    for group, shapes in enumerate(model["param_shapes"]):
        flat = {"fp32": torch.cat([r["single_partition_of_fp32_groups"][group] for r in ranks])}
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key] = torch.cat([r["base_optimizer_state"]["state"][group][key] for r in ranks])
        offset = 0
        for name, shape in shapes.items():
            for key, values in flat.items():
                state[f"{name}/{key}"] = values[offset:offset + shape.numel()].view(shape).float()
            offset += shape.numel()
    return state


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_partitions_are_resharded_for_another_world_size(tmp_path, demo_shards, zero_stage):
    """A 2-rank ZeRO checkpoint loads on 1 rank with every parameter's fp32 weights and Adam moments
    as saved; that rank trains on and saves, and 2 ranks continue from its checkpoint."""
    from fatscale.config import dump, load_recipe
    from fatscale.train.trainer import Trainer

    path = recipe(tmp_path, demo_shards, train={"epochs": 1, "max_steps": 3, "zero_stage": zero_stage, "grad_clip": 0.0},
                  checkpoint={"every_steps": 3}, data={"img_size": 32})
    run(path)
    checkpoints = tmp_path / "out" / "checkpoints"
    saved = saved_optimizer_state(checkpoints / ckpt.tag_for(3), world=2)
    with one_rank_world():
        resumed = load_recipe(path, ["train.max_steps=5"])
        trainer = Trainer(resumed, dump(resumed))
        assert trainer.state.global_step == 3 and trainer.layout == BatchLayout(32, 1, 16, 2)
        loaded = full_optimizer_state(trainer.engine)
        assert loaded.keys() == saved.keys()
        for key in saved:
            assert torch.equal(loaded[key], saved[key]), key
        assert not (tmp_path / "out" / "resharding").exists()  # the universal copy is gone once loaded
        trainer.train()
    assert ckpt.latest_tag(checkpoints) == ckpt.tag_for(5)
    out = run(path, "train.max_steps=7")
    assert f"resuming from {checkpoints / ckpt.tag_for(5)}" in out
    assert ckpt.latest_tag(checkpoints) == ckpt.tag_for(7)
