"""The Checkpointer and the state round trips, in this process (a world of one gloo rank, a real
DeepSpeed engine, a real DALI train loader on the demo shards): what a save holds comes back
exactly and its seal records every file written, saves happen when they are due, and a save cut
short, or a step saved again, leaves an intact checkpoint."""

import random

import numpy as np
import pytest
import torch

from conftest import one_rank_world
from fatscale.checkpoint import layout as ckpt
from fatscale.config import CheckpointConfig
from fatscale.data.config import AugConfig, DataConfig
from fatscale.data.loader import TrainLoader
from fatscale.data.manifest import load_manifest
from fatscale.checkpoint.state import TrainState, load_rng_state_dict, rng_state_dict


@pytest.fixture(scope="module")
def process_group():
    with one_rank_world():
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        yield


def make_engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def make_loader(demo_shards):
    data = DataConfig(shards=str(demo_shards), img_size=32, num_threads=1, channels_last=False)
    aug = AugConfig(rand_augment=None, reprob=0.0, mixup=0.0, cutmix=0.0)
    return TrainLoader(load_manifest(demo_shards), data, aug, 8, 0, 1, seed=3)


def step(engine, images, labels) -> None:
    loss = torch.nn.functional.cross_entropy(engine(images), labels)
    engine.backward(loss)
    engine.step()


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_train_state_round_trips_and_reads_older_checkpoints():
    state = TrainState(epoch=3, global_step=120, best_top1=71.5, mlflow_run_id="abc", elapsed_s=12.5)
    restored = TrainState()
    restored.load_state_dict(state.state_dict())
    assert restored == state
    older = TrainState()
    older.load_state_dict(dict(epoch=1, global_step=10, best_top1=-1.0, mlflow_run_id=None))  # before elapsed_s
    assert older == TrainState(epoch=1, global_step=10)


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = rng_state_dict()
    draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    load_rng_state_dict(saved)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == draws


def test_a_checkpoint_restores_everything_it_holds(process_group, demo_shards, tmp_path):
    from fatscale.checkpoint.checkpointer import Checkpointer

    engine, loader = make_engine(seed=0), make_loader(demo_shards)
    ema = torch.nn.Linear(2, 2)  # stands for the EMA module: any module's weights go through safetensors
    state = TrainState(epoch=0, global_step=3, best_top1=40.0, mlflow_run_id="run", elapsed_s=5.0)
    checkpointer = Checkpointer(CheckpointConfig(keep_last=2), tmp_path, 0, engine=engine, state=state, loader=loader,
                                identity=dict(resume_identity={"seed": 0}, recipe="model: {}\n"), ema=ema)
    batches = iter(loader)
    for _ in range(3):
        step(engine, *next(batches))
    saved_dir = checkpointer.save(is_best=True)
    assert saved_dir == tmp_path / "step-000000003" and ckpt.latest_tag(tmp_path) == "step-000000003"
    assert (tmp_path / ckpt.BEST).read_text() == "step-000000003"
    expected_weights, expected_ema = weights(engine.module), weights(ema)
    expected_optimizer = {k: v.clone() for k, v in engine.optimizer.state[engine.optimizer.param_groups[0]["params"][0]].items()}
    next_draw = torch.rand(4)
    images, labels = next(batches)  # what follows the saved position

    # A fresh engine, EMA, loader and state, with other weights and RNG states: load brings all back.
    torch.manual_seed(99)
    engine2, loader2, ema2 = make_engine(seed=1), make_loader(demo_shards), torch.nn.Linear(2, 2)
    assert not torch.equal(engine2.module[0].weight, expected_weights["0.weight"])
    restored = TrainState()
    Checkpointer(CheckpointConfig(), tmp_path, 0, engine=engine2, state=restored, loader=loader2, identity={},
                 ema=ema2).load("step-000000003", seed=0, saved_world=1)
    assert restored == state
    assert all(torch.equal(weights(engine2.module)[k], v) for k, v in expected_weights.items())
    assert all(torch.equal(weights(ema2)[k], v) for k, v in expected_ema.items())
    optimizer_state = engine2.optimizer.state[engine2.optimizer.param_groups[0]["params"][0]]
    assert all(torch.equal(optimizer_state[k], v) for k, v in expected_optimizer.items())
    assert torch.equal(torch.rand(4), next_draw)  # the RNG states of the moment of the save
    images2, labels2 = next(iter(loader2))
    assert torch.equal(images2, images) and torch.equal(labels2, labels)
    assert ckpt.read_json(tmp_path / "step-000000003" / "progress.json") == {**state.state_dict(),
                                                                              **checkpointer.identity}


def test_the_seal_records_every_file_the_save_wrote(process_group, demo_shards, tmp_path):
    from fatscale.checkpoint.checkpointer import Checkpointer

    engine, loader = make_engine(seed=0), make_loader(demo_shards)
    checkpointer = Checkpointer(CheckpointConfig(), tmp_path, 0, engine=engine, state=TrainState(global_step=1),
                                loader=loader, identity={}, ema=torch.nn.Linear(2, 2))
    step(engine, *next(iter(loader)))
    folder = checkpointer.save()
    files = ckpt.read_json(folder / ckpt.COMPLETE)["files"]
    written = sorted(p.name for p in folder.iterdir() if p.name != ckpt.COMPLETE)
    assert sorted(files) == written == ["ema.safetensors", "mp_rank_00_model_states.pt", "progress.json", "rank-0.json"]
    assert all(ckpt.file_record(folder / name) == entry for name, entry in files.items())  # hashed once written


def test_saves_are_due_by_steps_and_by_rank_0s_clock(process_group, tmp_path):
    from fatscale.checkpoint.checkpointer import Checkpointer

    engine = make_engine(seed=0)
    def checkpointer(config: CheckpointConfig, rank: int) -> Checkpointer:
        return Checkpointer(config, tmp_path, rank, engine=engine, state=TrainState(), loader=None, identity={})

    by_steps = checkpointer(CheckpointConfig(every_steps=5, every_minutes=None), rank=0)
    assert [s for s in range(1, 16) if by_steps.due_by_steps(s)] == [5, 10, 15]
    assert not by_steps.due_by_clock(by_steps.last_save + 10**6)
    by_time = checkpointer(CheckpointConfig(every_steps=None, every_minutes=2), rank=0)
    assert not by_time.due_by_clock(by_time.last_save + 119) and by_time.due_by_clock(by_time.last_save + 121)
    assert not any(by_time.due_by_steps(s) for s in range(1, 16))
    other_rank = checkpointer(CheckpointConfig(every_steps=None, every_minutes=2), rank=1)
    assert not other_rank.due_by_clock(other_rank.last_save + 1000)  # it learns rank 0's decision (StepVote)


def test_a_save_cut_short_or_repeated_leaves_an_intact_checkpoint(process_group, demo_shards, tmp_path, monkeypatch):
    from fatscale.checkpoint.resume import intact_checkpoint
    from fatscale.checkpoint.checkpointer import Checkpointer

    engine, loader = make_engine(seed=0), make_loader(demo_shards)
    state = TrainState(global_step=1)
    checkpointer = Checkpointer(CheckpointConfig(keep_last=1), tmp_path, 0, engine=engine, state=state, loader=loader,
                                identity={})
    batches = iter(loader)
    step(engine, *next(batches))
    checkpointer.save()
    good = weights(engine.module)

    def killed(*args):
        raise KeyboardInterrupt  # the process dies after every part is written, before the seal

    # The same step saved again (a periodic save, then the epoch end's), cut short: the first stays.
    monkeypatch.setattr(ckpt, "mark_complete", killed)
    state.epoch = 1
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save()
    monkeypatch.undo()
    assert (tmp_path / "step-000000001.saving").is_dir() and intact_checkpoint(tmp_path) == "step-000000001"
    step(engine, *next(batches))
    monkeypatch.setattr(ckpt, "mark_complete", killed)
    state.global_step, state.epoch = 2, 0
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save()
    monkeypatch.undo()
    assert ckpt.latest_tag(tmp_path) == intact_checkpoint(tmp_path) == "step-000000001"
    restored = TrainState()
    engine2 = make_engine(seed=1)
    Checkpointer(CheckpointConfig(), tmp_path, 0, engine=engine2, state=restored, loader=make_loader(demo_shards),
                 identity={}).load("step-000000001", seed=0, saved_world=1)
    assert restored.global_step == 1 and all(torch.equal(weights(engine2.module)[k], v) for k, v in good.items())
    # Saved again, completed: it replaces the earlier save of its step, and the leftovers go.
    state.epoch = 1
    checkpointer.save()
    state.epoch = 2
    checkpointer.save()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000002"]
    assert ckpt.verify(tmp_path, "step-000000002").good
    assert ckpt.read_json(tmp_path / "step-000000002" / "progress.json")["epoch"] == 2
