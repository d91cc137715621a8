"""Parts of the trainer's GPU path whose faults show on CPU: a Trainer built in this process (one
gloo rank, a real DeepSpeed engine, real DALI on the demo shards), the per-step vote between two
real gloo ranks, the device choice, and the teardown of a rank's process group."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import demo_recipe, free_port, one_rank_world
from fatscale.train.distributed import StepVote, agree, cuda_device_index

REPO = Path(__file__).resolve().parents[1]
RANK_ENV = dict(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")


@pytest.fixture(scope="module")
def compiled_trainer(tmp_path_factory, demo_shards):
    """A Trainer of a compiled (aot_eager) FAT-B0 with EMA, in this process."""
    from fatscale.config import dump, load_recipe

    tmp_path = tmp_path_factory.mktemp("trainer")
    recipe = load_recipe(demo_recipe(tmp_path, demo_shards, model={"compile": True, "compile_backend": "aot_eager"},
                                     data={"img_size": 32, "eval_sizes": [48]},
                                     train={"max_steps": 2, "val_batch_per_device": 160},
                                     tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"}), [])
    with one_rank_world():
        from fatscale.train.trainer import Trainer

        trainer = Trainer(recipe, dump(recipe))
        yield trainer
        trainer.close()


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def test_deepspeed_s_throughput_timer_is_off(compiled_trainer):
    # Left on, the engine synchronizes the device at every forward and step to time itself.
    assert compiled_trainer.engine.tput_timer.config.enabled is False


def test_the_ema_is_a_copy_of_the_bare_module(compiled_trainer):
    assert hooks(compiled_trainer.engine.module) > 0  # DeepSpeed's own (autocast, ...)
    assert hooks(compiled_trainer.ema.module) == 0


def test_evaluation_runs_eager_under_compile(compiled_trainer):
    from fatscale.train.trainer import compiled_graphs

    trainer = compiled_trainer
    trainer.train_epoch()  # train.max_steps: 2 steps at 32 px
    assert trainer.state.global_step == 2
    trained = compiled_graphs()
    assert trained >= 1
    trainer.evaluate()  # the raw and EMA models at 32 and 48 px, with a last partial batch
    trainer.evaluate()
    assert compiled_graphs() == trained
    assert set(trainer.metrics) >= {"val/top1_32px", "val/top1_48px", "val/top1_ema_48px"}


def vote_rank(rank: int, port: int, flags: list, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    vote, decided, agreed = StepVote(torch.device("cpu")), [], []
    for step, per_rank in enumerate(flags, start=1):
        mine = per_rank[rank]
        agreed.append((step, agree(torch.device("cpu"), *mine)))  # today's decision, at once
        previous = vote.cast(step, torch.tensor(mine[0]), *mine[1:])
        if previous is not None:
            decided.append((step, previous))
    decided.append(("end", vote.result()))
    assert vote.result() is None
    results[rank] = (decided, agreed)
    dist.destroy_process_group()


def test_the_step_vote_takes_agree_s_decisions_one_step_later():
    # Per step, each rank's (diverged, stop, save) flags.
    flags = [[(0, 0, 0), (0, 0, 0)], [(0, 1, 0), (0, 0, 0)], [(0, 0, 1), (0, 0, 0)],
             [(0, 0, 0), (1, 0, 0)], [(0, 0, 0), (0, 0, 0)], [(1, 1, 1), (0, 1, 0)]]
    results = mp.Manager().dict()
    mp.spawn(vote_rank, args=(free_port(), flags, results), nprocs=2)
    (decided, agreed), other = results[0], results[1]
    assert other == results[0]  # every rank takes the same decisions
    assert agreed == [(1, [False] * 3), (2, [False, True, False]), (3, [False, False, True]),
                      (4, [True, False, False]), (5, [False] * 3), (6, [True, True, True])]
    # Step s's decision is read at step s + 1 (the last one by result()), the same as agree's.
    assert [read_at for read_at, _ in decided] == [2, 3, 4, 5, 6, "end"]
    assert [voted for _, voted in decided] == agreed


@pytest.mark.parametrize("local_rank,local_world,visible,expected", [
    (0, 1, 1, 0), (3, 4, 1, 0),  # one GPU per task (Slurm --gpus-per-task=1): every rank's is device 0
    (3, 4, 4, 3), (0, 8, 8, 0),  # every rank sees the node's GPUs, one per rank
])
def test_each_rank_takes_the_gpu_it_is_given(local_rank, local_world, visible, expected):
    assert cuda_device_index(local_rank, local_world, visible) == expected


def test_a_gpu_layout_that_fits_no_rule_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError) as refused:
        cuda_device_index(2, 4, 2)
    assert "rank 2 of 4 on this node sees 2 GPUs (CUDA_VISIBLE_DEVICES=0,1)" in str(refused.value)
    assert "\n" not in str(refused.value)


TEARDOWN = """
import os, sys, threading
import torch.distributed as dist
from fatscale.config import dump, load_recipe
from fatscale.train.trainer import Interrupted, train
recipe = load_recipe(sys.argv[1], [])
stop = threading.Event()
stop.set()
try:
    train(recipe, dump(recipe), stop)
except Interrupted as e:
    print("interrupted:", e)
print("process group after train():", dist.is_initialized())
print("CUBLAS_WORKSPACE_CONFIG:", os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
"""


def train_to_the_end(path: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
               "fatscale.train", str(path)]
    out = subprocess.run(command, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_a_stop_saves_a_step_later_resumes_exactly_and_ends_the_process_group(tmp_path, demo_shards):
    settings = dict(data={"img_size": 32}, train={"deterministic": True, "max_steps": 5})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    reference, stopped = (demo_recipe(tmp_path / run, demo_shards, **settings) for run in "ab")
    env = dict(os.environ, **RANK_ENV, MASTER_PORT=str(free_port()))
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", TEARDOWN, str(stopped)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    # The stop request is voted in step 1 and acted on in step 2, where the checkpoint is saved.
    assert "interrupted: interrupted at step 2, checkpoint saved" in out.stdout
    assert "process group after train(): False" in out.stdout
    assert "CUBLAS_WORKSPACE_CONFIG: :4096:8" in out.stdout
    assert f"rank 0: {socket.gethostname()} cpu" in train_to_the_end(reference)  # rank 0 logs where every rank runs
    assert "resuming from" in train_to_the_end(stopped)
    for name in ("model", "model_ema"):
        a, b = (load_file(str(tmp_path / run / "out" / "export" / name / "model.safetensors")) for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
