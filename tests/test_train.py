"""The training engine end to end: real DeepSpeed ranks (gloo), real DALI, real JPEGs, MLflow."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import corrupt_copy, free_port, wait_for_first_metrics
from conftest import demo_recipe as recipe
from fatscale.checkpoint import layout as ckpt
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
LOCAL = str(REPO / "launch" / "local.py")
pytestmark = pytest.mark.slow


def launch(recipe_path: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fatscale.train", str(recipe_path)]
    for o in overrides:
        command += ["--set", o]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run(recipe_path: Path, *overrides: str, timeout: float = 600) -> str:
    process = launch(recipe_path, *overrides)
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank at once (torchrun starts its workers in sessions of their own)."""
    victims = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def test_killed_run_resumes_to_the_same_weights(tmp_path, demo_shards):
    # Epoch 0 trains at 32 px, epoch 1 at 48 (progressive resolution): a kill in epoch 0 resumes
    # across the size change, a kill in epoch 1 resumes at the new size.
    settings = dict(train={"epochs": 2, "max_steps": 24, "deterministic": True},
                    checkpoint={"every_steps": 4, "keep_last": 2},
                    data={"resolution": {"start": 32, "end": 48, "ramp": [1, 1], "step": 16}})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = recipe(tmp_path / "a", demo_shards, **settings)
    run(reference)
    interrupted = recipe(tmp_path / "b", demo_shards, **settings)
    process = launch(interrupted)
    checkpoints = tmp_path / "b" / "out" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill mid-epoch, after the checkpoint of step 8
        tag = ckpt.latest_tag(checkpoints) if (checkpoints / ckpt.LATEST).exists() else None
        if tag is not None and int(tag.split("-")[1]) >= 8:
            break
        time.sleep(0.05)
    kill_group(process)
    killed_at = int(ckpt.latest_tag(checkpoints).split("-")[1])
    assert 8 <= killed_at < 24
    out = run(interrupted)
    assert f"resuming from {checkpoints}/step-{killed_at:09d}" in out
    for name in ("model", "model_ema"):
        a = load_file(str(tmp_path / "a" / "out" / "export" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / "out" / "export" / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"


def test_kill_during_save_leaves_a_loadable_latest_checkpoint(tmp_path, demo_shards):
    path = recipe(tmp_path, demo_shards, train={"epochs": 1}, checkpoint={"every_steps": 1, "keep_last": 2})
    checkpoints = tmp_path / "out" / "checkpoints"
    # Kill while a save is visibly in progress (its directory exists, COMPLETE not yet), at
    # different depths into it: DeepSpeed's files, the per-rank JSON, the EMA, the pointers.
    for delay in (0.0, 0.02, 0.05, 0.1):
        process = launch(path)
        start = time.monotonic()
        in_progress = []
        while not in_progress and process.poll() is None and time.monotonic() - start < 300:
            if (checkpoints / ckpt.LATEST).exists():  # a complete checkpoint to fall back on
                in_progress = [p for p in checkpoints.glob("step-*") if not (p / ckpt.COMPLETE).exists()]
            time.sleep(0.001)
        assert in_progress, "no save was seen in progress"
        time.sleep(delay)
        kill_group(process)
        tag = ckpt.latest_tag(checkpoints)
        assert tag is not None and tag != in_progress[0].name
        # Everything the latest checkpoint needs loads (without unpickling code).
        assert ckpt.module_state_dict(checkpoints, tag)
        assert ckpt.load_ema(checkpoints, tag)
        assert ckpt.read_json(checkpoints / tag / "progress.json")["global_step"] == int(tag.split("-")[1])
        assert all((checkpoints / tag / f"rank-{r}.json").exists() for r in range(2))
    run(path)  # and the run still finishes from there
    assert ckpt.latest_tag(checkpoints) == ckpt.tag_for(480 // (2 * 16))  # one epoch
    assert not [p for p in checkpoints.glob("step-*") if not (p / ckpt.COMPLETE).exists()]  # leftovers pruned


@pytest.mark.parametrize("zero_stage,precision", [(1, "bf16"), (2, "fp16")])
def test_zero_and_mixed_precision_checkpoints_resume(tmp_path, demo_shards, zero_stage, precision):
    path = recipe(tmp_path, demo_shards, train={"epochs": 1, "max_steps": 3, "zero_stage": zero_stage,
                                                 "precision": precision, "grad_clip": 0.0},
                  checkpoint={"every_steps": 2})
    run(path)
    out = run(path, "train.max_steps=5")  # resumes from step 3: DeepSpeed's files load weights_only
    assert "resuming from" in out and "step-000000003" in out
    assert ckpt.latest_tag(tmp_path / "out" / "checkpoints") == ckpt.tag_for(5)


def test_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, demo_shards):
    # AdamW moves every weight by ~lr per step: at 1e30 the logits overflow within a few steps.
    path = recipe(tmp_path, demo_shards, train={"epochs": 1}, checkpoint={"every_steps": 1},
                  optim={"lr": 1.0e30, "warmup_epochs": 0})
    process = launch(path)
    out, _ = process.communicate(timeout=600)
    assert process.returncode != 0
    (message,) = [line.split("ERROR ", 1)[1] for line in out.splitlines() if " ERROR " in line and "(rank 0:" in line]
    step = int(message.split(" in step ")[1].split(",")[0])
    checkpoints = tmp_path / "out" / "checkpoints"
    assert f"stopped without saving: the last good checkpoint is {checkpoints / ckpt.tag_for(step - 1)}" in message
    assert ckpt.latest_tag(checkpoints) == ckpt.tag_for(step - 1)  # the diverged step was never saved
    assert ckpt.module_state_dict(checkpoints, ckpt.tag_for(step - 1))  # loads
    client = MlflowClient(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
    assert mlflow_run.info.status == "FAILED"


def test_sigterm_saves_stops_and_the_rerun_continues_the_same_mlflow_run(tmp_path, demo_shards):
    # No periodic saves: any checkpoint before the epoch end comes from the SIGTERM.
    path = recipe(tmp_path, demo_shards, train={"epochs": 2}, checkpoint={"every_steps": None, "every_minutes": None})
    process = launch(path)
    log_file = tmp_path / "out" / "train.log"
    deadline = time.monotonic() + 300
    while not (log_file.exists() and " step 5/30 " in log_file.read_text()):
        assert time.monotonic() < deadline and process.poll() is None, "training did not reach step 5"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)  # torchrun passes it on to both ranks
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    checkpoints = tmp_path / "out" / "checkpoints"
    stopped_at = int(ckpt.latest_tag(checkpoints).split("-")[1])
    assert 5 <= stopped_at < 15 and "run the same command again to resume" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    (first,) = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
    assert first.info.status == "KILLED" and first.data.tags["interrupted_at_step"] == str(stopped_at)

    out = run(path)
    assert f"resuming from {checkpoints / ckpt.tag_for(stopped_at)}" in out
    (resumed,) = client.search_runs([first.info.experiment_id])
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    assert ckpt.latest_tag(checkpoints) == ckpt.tag_for(30)


def test_tracks_over_http_through_a_server_outage(tmp_path, demo_shards, mlflow_server):
    path = recipe(tmp_path, demo_shards, train={"epochs": 2}, tracking={"uri": mlflow_server.uri, "experiment": "outage"},
                  checkpoint={"every_steps": 10})
    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    process = launch(path)
    checkpoints = tmp_path / "out" / "checkpoints"
    run_id = wait_for_first_metrics(client, "outage", lambda: process.poll() is None)  # then the server goes
    deadline = time.monotonic() + 300
    mlflow_server.stop(signal.SIGKILL)
    while ckpt.latest_tag(checkpoints) != ckpt.tag_for(20):  # training goes on without the server
        assert time.monotonic() < deadline and process.poll() is None, "training stalled without the server"
        time.sleep(0.2)
    mlflow_server.start()
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-4000:]
    assert "unreachable" in out
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.metrics["top1"] >= 0
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    assert [m.step for m in client.get_metric_history(run_id, "val/top1_ema")] == [15, 30]
    assert {a.path for a in client.list_artifacts(run_id)} == {"recipe.yaml", "train.log"}
    # the logged models and their versions, through the outage too
    assert sorted(v.name for v in client.search_model_versions(f"run_id = '{run_id}'")) == ["recipe-fat_b0", "recipe-fat_b0-ema"]


def test_every_node_logs_its_system_metrics_under_its_node_id(tmp_path, demo_shards, mlflow_server):
    # Two torchrun "nodes" on this machine, one rank each: two processes with LOCAL_RANK 0.
    path = recipe(tmp_path, demo_shards, train={"epochs": 1}, checkpoint={"every_steps": None},
                  tracking={"uri": mlflow_server.uri, "experiment": "two-nodes", "system_metrics": True})
    mlflow_server.start()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "fatscale.train", str(path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    client = MlflowClient(mlflow_server.uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    system = {key for key in mlflow_run.data.metrics if key.startswith("system/")}
    for node in ("node0", "node1"):
        assert f"system/{node}/cpu_utilization_percentage" in system, system
    assert all(key.split("/")[1] in ("node0", "node1") for key in system)  # no series without its node
    assert mlflow_run.data.tags["nodes"] == "2"
    assert mlflow_run.data.tags["node_hosts"] == f"node0={socket.gethostname()} node1={socket.gethostname()}"
    assert "Started monitoring system metrics" not in outputs[1]  # MLflow's INFO lines stay off the console


def wait_for_log(log_file: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (log_file.exists() and text in log_file.read_text()):
        assert time.monotonic() < deadline and process.poll() is None, f"{text!r} never appeared in {log_file}"
        time.sleep(0.05)


def training_ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes under a launcher (torchrun's workers, not torchrun itself)."""
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "fatscale.train" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]


def test_a_killed_launcher_ends_its_ranks_and_one_live_run_holds_the_output_dir(tmp_path, demo_shards):
    path = recipe(tmp_path, demo_shards, train={"epochs": 40}, checkpoint={"every_steps": 5, "every_minutes": None})
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, LOCAL, str(path), "--nproc", "2"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_log(out / "train.log", " step 5/600 ", first)
    ranks = training_ranks(first)
    (rank0,) = [p for p in ranks if p.environ().get("RANK") == "0"]
    assert len(ranks) == 2
    busy = f"output_dir {out} is in use by a live run (pid {rank0.pid} on "
    # A second run is refused: by the launcher before it starts anything, and by the trainer
    # itself when started under torchrun directly.
    second = subprocess.run([sys.executable, LOCAL, str(path), "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert second.returncode != 0 and second.stderr.startswith(f"error: {busy}") and second.stderr.count("\n") == 1
    direct = launch(path)
    text, _ = direct.communicate(timeout=300)
    assert direct.returncode != 0 and busy in text
    log_text = (out / "train.log").read_text()
    assert "is in use by" not in log_text  # the refused run never wrote into the live run's directory

    first.kill()  # SIGKILL: no handler of the launcher runs
    killed = time.monotonic()
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, f"ranks still running after the launcher died: {alive}"
    print(f"ranks gone {time.monotonic() - killed:.1f} s after the launcher's SIGKILL")
    stopped_at = int(ckpt.latest_tag(out / "checkpoints").split("-")[1])
    assert stopped_at >= 5 and "stop requested: saved" in (out / "train.log").read_text()  # they saved on the way out

    # The same for torchrun killed by SIGKILL: its ranks get SIGTERM from the kernel.
    resumed = launch(path)
    wait_for_log(out / "train.log", f"resuming from {out / 'checkpoints' / ckpt.tag_for(stopped_at)}", resumed)
    deadline = time.monotonic() + 300
    while ckpt.latest_tag(out / "checkpoints") == ckpt.tag_for(stopped_at):  # until the next periodic save
        assert time.monotonic() < deadline and resumed.poll() is None, "the resumed run saved nothing"
        time.sleep(0.05)
    ranks = training_ranks(resumed)
    os.kill(resumed.pid, signal.SIGKILL)
    resumed.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, f"ranks still running after torchrun died: {alive}"
    stopped_at = int(ckpt.latest_tag(out / "checkpoints").split("-")[1])

    # The directory is free again, and the run goes on from its last checkpoint.
    final = run(path, f"train.max_steps={stopped_at + 2}")
    assert f"resuming from {out / 'checkpoints' / ckpt.tag_for(stopped_at)}" in final
    assert ckpt.latest_tag(out / "checkpoints") == ckpt.tag_for(stopped_at + 2)


def test_resume_refuses_an_incompatible_recipe_and_records_a_compatible_change(tmp_path, demo_shards):
    path = recipe(tmp_path, demo_shards, train={"epochs": 1, "max_steps": 4}, checkpoint={"every_steps": 2})
    run(path)
    checkpoints = tmp_path / "out" / "checkpoints"
    before = sorted(p.name for p in (checkpoints / ckpt.tag_for(4)).iterdir())
    refusal = (f"{checkpoints / ckpt.tag_for(4)} was made by 2 rank(s) with a global batch of 32, which the run "
               "keeps: a global batch of 32 cannot be split over 3 ranks: use a number of ranks that divides 32")
    launcher = subprocess.run([sys.executable, LOCAL, str(path), "--nproc", "3"], capture_output=True, text=True, timeout=300)
    assert launcher.returncode != 0 and launcher.stderr == f"error: {refusal}\n"
    direct = launch(path, nproc=3)  # torchrun without the launcher: the trainer refuses too
    text, _ = direct.communicate(timeout=300)
    assert direct.returncode != 0 and refusal in text
    other = subprocess.run([sys.executable, LOCAL, str(path), "--nproc", "2", "--set", "model.name=fat_b1",
                            "--set", "train.batch_per_device=8"], capture_output=True, text=True, timeout=300)
    assert other.returncode != 0
    assert "made with model.name='fat_b0'; this run has model.name='fat_b1': resume with" in other.stderr
    assert ckpt.latest_tag(checkpoints) == ckpt.tag_for(4)
    assert sorted(p.name for p in (checkpoints / ckpt.tag_for(4)).iterdir()) == before  # nothing was written

    out = run(path, "train.max_steps=6", "optim.lr=1.0e-3")  # compatible: resumes, and says what changed
    assert "resumed at step 4 with a changed recipe: optim.lr, train.max_steps" in out
    assert ckpt.latest_tag(checkpoints) == ckpt.tag_for(6)
    client = MlflowClient(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
    assert mlflow_run.data.tags["recipe_changed_at_step"] == "4"
    assert mlflow_run.data.tags["recipe_changes"] == "optim.lr, train.max_steps"
    assert mlflow_run.data.params["optim.lr"] != "0.001"  # params keep the first value; the artifact has the new
    assert {a.path for a in client.list_artifacts(mlflow_run.info.run_id)} >= {"recipe.yaml", "recipe-step-000000004.yaml"}
    changed = (tmp_path / "out" / "recipe-step-000000004.yaml").read_text()
    assert "max_steps: 6" in changed and "lr: 0.001" in changed
    run(path, "train.max_steps=6", "optim.lr=1.0e-3", "train.epochs=2")  # and 2 ranks still resume it


def test_logged_grad_norm_and_val_counts_are_true(tmp_path, demo_shards):
    # fp16 scales the loss by 65536 before backward; the logged norm must be the unscaled one.
    shards = tmp_path / "shards"
    # (a damage the pipeline's decoder rejects whatever the image: zeros over the scan data of a textured
    # JPEG can still decode, as garbage)
    corrupt_copy(demo_shards, shards, "val", 3, how="junk")
    history = {}
    for precision in ("fp32", "fp16"):
        (tmp_path / precision).mkdir()
        path = recipe(tmp_path / precision, shards, train={"epochs": 1, "max_steps": 2, "log_every": 1,
                                                          "precision": precision})
        run(path)
        client = MlflowClient(f"sqlite:///{tmp_path / precision / 'out'}/mlflow.db")
        (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
        history[precision] = [m.value for m in client.get_metric_history(mlflow_run.info.run_id, "train/grad_norm")]
        metrics = mlflow_run.data.metrics
        assert (metrics["val/num_images"], metrics["val/quarantined"]) == (160 - 1, 1)
        eval_line = next(line for line in (tmp_path / precision / "out" / "train.log").read_text().splitlines()
                         if "eval epoch" in line)  # counts said as whole numbers, the images once
        assert " val/quarantined=1 " in eval_line and eval_line.endswith(" (159 images)") and "num_images" not in eval_line
    # (fp16's first step may overflow at the initial scale and be skipped, its norm inf or NaN)
    assert len(history["fp16"]) == 2 and 0.5 < history["fp16"][1] / history["fp32"][1] < 2, history



def test_compile_through_the_engine_matches_eager_across_a_resolution_change(tmp_path, demo_shards):
    # aot_eager: dynamo's graphs and AOTAutograd through DeepSpeed's engine.compile() without
    # inductor's code generation, which takes minutes per graph on 2 cores (BENCHMARKS.md).
    settings = dict(train={"epochs": 2, "deterministic": True}, checkpoint={"every_steps": None},
                    data={"resolution": {"start": 32, "end": 48, "ramp": [1, 1], "step": 16}, "eval_sizes": [64]})
    runs = {}
    for compiled in (False, True):
        (tmp_path / str(compiled)).mkdir()
        path = recipe(tmp_path / str(compiled), demo_shards, model={"compile": compiled, "compile_backend": "aot_eager"},
                      **settings)
        out = run(path, timeout=900)
        client = MlflowClient(f"sqlite:///{tmp_path / str(compiled) / 'out'}/mlflow.db")
        (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fatscale-demo").experiment_id])
        history = {key: [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, key)]
                   for key in ("train/loss", "train/img_size", "train/compiled_graphs", "val/top1_48px", "val/top1_64px")}
        weights = load_file(str(tmp_path / str(compiled) / "out" / "export" / "model" / "model.safetensors"))
        runs[compiled] = (out, mlflow_run, history, weights)
    (_, eager_run, eager, eager_weights), (out, compiled_run, compiled, weights) = runs[False], runs[True]
    # The schedule's sizes, step by step (15 steps per epoch), and the same losses within float noise.
    assert compiled["train/img_size"] == [(5, 32), (10, 32), (15, 32), (20, 48), (25, 48), (30, 48)]
    assert "epoch 1: training at 48 px" in out
    for (step, a), (_, b) in zip(eager["train/loss"], compiled["train/loss"]):
        assert abs(a - b) <= 1e-3 * abs(a), (step, a, b)
    assert max((weights[k] - eager_weights[k]).abs().max().item() for k in weights) < 1e-3
    # Recompiles are counted and logged, and bounded: a graph for 32 px and one dynamic graph after
    # the size change; evaluation runs eager (none per eval size and batch).
    graphs = [value for _, value in compiled["train/compiled_graphs"]]
    assert graphs == sorted(graphs) and 1 <= graphs[0] < graphs[-1] <= 2, graphs
    assert "train/compiled_graphs" not in eager_run.data.metrics
    # Evaluation at the recipe's size and at data.eval_sizes, each logged, the best named.
    assert [s for s, _ in compiled["val/top1_48px"]] == [s for s, _ in compiled["val/top1_64px"]] == [15, 30]
    metrics, tags = compiled_run.data.metrics, compiled_run.data.tags
    assert metrics["top1_48px"] == metrics["top1"] == metrics["val/top1"]
    best = max((48, 64), key=lambda size: metrics[f"top1_{size}px"])
    assert tags["best_eval_size"] == str(best)
    assert f"(best: {best} px)." in tags["mlflow.note.content"]


def test_a_frozen_rank_ends_the_run_named_and_the_next_launch_resumes(tmp_path, demo_shards):
    path = recipe(tmp_path, demo_shards, train={"epochs": 2, "stall_timeout_s": 30}, checkpoint={"every_steps": 4})
    process = launch(path)
    checkpoints = tmp_path / "out" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / ckpt.LATEST).exists():
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint"
        time.sleep(0.05)
    ranks = training_ranks(process)
    (frozen,) = [p for p in ranks if p.environ().get("RANK") == "1"]
    frozen.suspend()  # SIGSTOP: no heartbeat, no progress, no reply to collectives
    stopped = time.monotonic()
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and time.monotonic() - stopped < 90
    (verdict,) = [line for line in out.splitlines() if " ERROR stalled: " in line]
    assert "stalled: rank 1 (no heartbeat for " in verdict and f"pid {frozen.pid} on {socket.gethostname()}" in verdict
    assert "train.stall_timeout_s 30" in verdict
    assert "Thread" in out and "most recent call first" in out  # rank 0's Python stacks (faulthandler)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    assert "resuming from" in run(path)
