"""launch/slurm.py against a real Slurm cluster on loopback (fatscale.tryout.devcluster): 2 nodes,
real submitit jobs training with DeepSpeed (gloo) across them, preemption and requeue."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import submitit
from mlflow import MlflowClient

from conftest import REPO, demo_recipe, hold_run_lock, wait_for_first_metrics
from fatscale.checkpoint import layout as ckpt
from fatscale.config import load_recipe, slurm_minutes
from fatscale.tryout.devcluster import DevCluster, DevClusterError

LAUNCH = str(REPO / "launch" / "slurm.py")
CPU_NODES = {"gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "time": "00:20:00"}


def test_slurm_time_limits():
    assert [slurm_minutes(t) for t in ("90", "5:30", "1:00:00", "2-00:00:00", "1-12", "1-12:30")] == [
        90, 6, 60, 2880, 2160, 2190]
    assert [slurm_minutes(t) for t in ("0", "1h", "1:2:3:4", "")] == [None] * 4


def test_gpu_nodes_get_one_task_per_gpu(tmp_path, demo_shards):
    from fatscale.launch import slurm as launcher

    recipe = load_recipe(demo_recipe(tmp_path, demo_shards, slurm={"gpus_per_node": 8, "tasks_per_node": None,
                                                                    "partition": "gpu", "time": "1-00:00:00"}))
    parameters = launcher.sbatch_parameters(recipe)
    assert (parameters["ntasks_per_node"], parameters["gpus_per_node"], parameters["time"]) == (8, 8, 1440)
    assert parameters["partition"] == "gpu" and parameters["additional_parameters"] == {"requeue": True}
    assert "gres" not in parameters and "slurm.mem is not set" in launcher.memory_warning(recipe)
    # Clusters without select/cons_tres know only --gres; a job that asks for memory is not warned.
    recipe = load_recipe(demo_recipe(tmp_path, demo_shards, slurm={"gpus_per_node": 4, "tasks_per_node": None,
                                                                    "gres": True, "mem": "400G"}))
    parameters = launcher.sbatch_parameters(recipe)
    assert (parameters["gres"], parameters["ntasks_per_node"], parameters["mem"]) == ("gpu:4", 4, "400G")
    assert "gpus_per_node" not in parameters and launcher.memory_warning(recipe) is None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = DevCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2)
    try:
        cluster.start()
    except DevClusterError as e:
        if "not found" in str(e):
            pytest.skip(f"no Slurm here: {e}")
        raise
    environment = pytest.MonkeyPatch()  # submitit runs sacct & co. in this process too
    try:
        for key, value in cluster.env.items():
            environment.setenv(key, value)
        yield cluster
    finally:
        environment.undo()
        cluster.stop()


def submit(cluster, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCH, str(recipe), *args], capture_output=True, text=True, timeout=120)


def job_of(submitted: subprocess.CompletedProcess, recipe: Path, ranks: int = 2) -> submitit.SlurmJob:
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    return submitit.SlurmJob(folder=Path(load_recipe(recipe).output_dir).resolve() / "slurm", job_id=job_id,
                             tasks=tuple(range(ranks)))


def jobs(cluster) -> set[str]:
    """Every job the cluster ever accepted (accounting)."""
    out = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-o", "JobID", "-S", "2000-01-01"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def final_state(job: submitit.SlurmJob) -> str:
    """The job's state once Slurm has it as ended (results are written just before the end, and
    accounting lags about a second)."""
    deadline = time.monotonic() + 60
    while (state := job.watcher.get_state(job.job_id, mode="force")) in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"):
        assert time.monotonic() < deadline, f"job {job.job_id} did not end"
        time.sleep(0.5)
    return state


def only_run(recipe: Path):
    r = load_recipe(recipe)
    client = MlflowClient(f"sqlite:///{Path(r.output_dir).resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(r.tracking.experiment).experiment_id])
    return client, run


@pytest.mark.slow
def test_two_node_job_trains_across_nodes_and_finishes_in_mlflow(cluster, tmp_path, demo_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output_dir is pinned to the submit directory
    recipe = demo_recipe(tmp_path, demo_shards, train={"epochs": 1}, slurm=CPU_NODES)
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "out"), "out"))
    submitted = submit(cluster, recipe, "--nodes", "2")
    job = job_of(submitted, recipe)
    assert f"tail -f {tmp_path}/out/slurm/{job.job_id}_0_log.out" in submitted.stdout
    results = job.results()  # waits; one per task
    assert {r["node"] for r in results} == set(cluster.node_names)  # one rank on each node
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world_size"] for r in results} == {2}
    assert {r["cpus"] for r in results} == {1}  # slurm.cpus_per_task of the 2 on each node, bound by srun
    assert final_state(job) == "COMPLETED"
    client, run = only_run(recipe)
    assert run.info.status == "FINISHED" and run.data.metrics["top1"] == results[0]["summary"]["top1"]
    assert run.data.tags["nodes"] == "2" and run.data.tags["job_id"] == job.job_id
    assert run.data.params["global_batch"] == "32" and run.data.metrics["world_size"] == 2


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_the_same_run(cluster, tmp_path, demo_shards):
    # Saves only at epoch ends (step 15, 30) and on the interruption.
    recipe = demo_recipe(tmp_path, demo_shards, train={"epochs": 2},
                         checkpoint={"every_steps": None, "every_minutes": None}, slurm=CPU_NODES)
    job = job_of(submit(cluster, recipe, "--nodes", "2"), recipe)
    log = Path(job.paths.stdout)
    deadline = time.monotonic() + 300
    while not (log.exists() and " step 5/30 " in log.read_text()):
        assert time.monotonic() < deadline and not job.done(), "the job did not reach step 5"
        time.sleep(0.2)
    again = submit(cluster, recipe, "--nodes", "2")  # the same output_dir is in use
    assert again.returncode != 0 and f"job {job.job_id} (RUNNING) already trains into" in again.stderr
    job._interrupt()  # preemption: SIGTERM, then USR2, as Slurm does
    results = job.results()
    assert results[0]["requeues"] == 1 and results[0]["summary"]["top1"] >= 0
    text = log.read_text()
    interrupted_at = int(text.split("stop requested: saved ")[1].split("step-")[1][:9])
    assert 5 <= interrupted_at < 30  # (at 15 under load: the stop then comes right after the epoch's save)
    assert f"resuming from {Path(load_recipe(recipe).output_dir) / 'checkpoints' / ckpt.tag_for(interrupted_at)}" in text
    client, run = only_run(recipe)  # one MLflow run, continued
    assert run.info.status == "FINISHED" and run.data.tags["interrupted_at_step"] == str(interrupted_at)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    assert final_state(job) == "COMPLETED"
    resubmit = submit(cluster, recipe, "--nodes", "2", "--dry-run")
    assert resubmit.returncode == 0 and "resuming: " in resubmit.stdout and run.info.run_id in resubmit.stdout
    # Resubmitted on the 1 node there is, for a third epoch: the same run continues, the global batch
    # kept by accumulating 2 micro-batches of 16 on the one rank.
    smaller = job_of(submit(cluster, recipe, "--nodes", "1", "--set", "train.epochs=3"), recipe, ranks=1)
    assert smaller.results()[0]["world_size"] == 1 and final_state(smaller) == "COMPLETED"
    text = Path(smaller.paths.stdout).read_text()
    assert f"resuming from {Path(load_recipe(recipe).output_dir) / 'checkpoints' / ckpt.tag_for(30)}" in text
    assert "1 ranks (the checkpoint's: 2): global batch 32 = 1 rank(s) x 16 x 2 accumulation step(s)" in text
    client, run = only_run(recipe)
    assert run.info.status == "FINISHED" and [m.step for m in client.get_metric_history(
        run.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    history = sorted(client.get_metric_history(run.info.run_id, "world_size"), key=lambda m: m.timestamp)
    assert [(m.step, m.value) for m in history] == [(0, 2), (interrupted_at, 2), (30, 1)]


def test_a_live_run_in_the_output_dir_fails_before_submission(cluster, tmp_path, demo_shards):
    recipe = demo_recipe(tmp_path, demo_shards, slurm=CPU_NODES)
    holder = hold_run_lock(tmp_path / "out")
    try:
        before = jobs(cluster)
        out = submit(cluster, recipe, "--nodes", "2")
        assert out.returncode != 0 and out.stderr.count("\n") == 1
        assert out.stderr.startswith(f"error: output_dir {tmp_path / 'out'} is in use by a live run (pid {holder.pid} on ")
        assert jobs(cluster) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_preemption_with_the_tracking_server_down_requeues_at_once_and_loses_no_metric(cluster, tmp_path, demo_shards,
                                                                                      mlflow_server):
    recipe = demo_recipe(tmp_path, demo_shards, train={"epochs": 2}, checkpoint={"every_steps": None, "every_minutes": None},
                         tracking={"uri": mlflow_server.uri, "experiment": "preempted-outage"}, slurm=CPU_NODES)
    mlflow_server.start()
    client = MlflowClient(mlflow_server.uri)
    job = job_of(submit(cluster, recipe, "--nodes", "2"), recipe)
    log = Path(job.paths.stdout)
    run_id = wait_for_first_metrics(client, "preempted-outage", lambda: not job.done())  # then the server goes
    deadline = time.monotonic() + 300
    mlflow_server.stop(signal.SIGKILL)
    while " step 10/30 " not in log.read_text():
        assert time.monotonic() < deadline and not job.done(), "the job did not reach step 10"
        time.sleep(0.1)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # a preemption (or the time limit near)
    while "Restarts=1" not in subprocess.run(["scontrol", "show", "job", "-o", job.job_id], capture_output=True,
                                             text=True).stdout:
        assert time.monotonic() - signalled < 90, "not requeued within Slurm's 90 s of warning"
        time.sleep(0.2)
    requeued_after = time.monotonic() - signalled
    print(f"requeued {requeued_after:.1f} s after USR2, with the tracking server down")
    assert requeued_after < 30
    spill = Path(load_recipe(recipe).output_dir) / "mlflow-spill.jsonl"
    assert spill.exists()  # what the server did not get is on disk, and the requeued job cannot deliver it yet
    mlflow_server.start()
    results = job.results()
    assert results[0]["requeues"] == 1 and final_state(job) == "COMPLETED"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["fatscale.delivered_late"]) > 0
    interrupted_at = int(run.data.tags["interrupted_at_step"])
    assert 10 <= interrupted_at < 30
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [15, 30]
    assert not spill.exists()


def test_dry_run_prints_and_submits_nothing(cluster, tmp_path, demo_shards):
    recipe = demo_recipe(tmp_path, demo_shards, slurm=CPU_NODES)
    before = jobs(cluster)
    out = submit(cluster, recipe, "--nodes", "2", "--partition", "debug", "--time", "1:30:00", "--dry-run")
    assert out.returncode == 0, out.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=debug", "#SBATCH --time=90", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@90", "--cpus-per-task=1 --kill-on-bad-exit=1", "  nodes: 2",
                 "dry run: nothing submitted"):
        assert line in out.stdout
    assert jobs(cluster) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["bad recipe", "missing shards", "unknown override", "bad flag value", "no tasks",
                                  "too few classes", "batch too large"])
def test_bad_input_fails_before_submission(cluster, tmp_path, demo_shards, case):
    recipe = demo_recipe(tmp_path, demo_shards, slurm=CPU_NODES)
    args, expected = {
        "bad recipe": ([], "train.epochs: expected an integer, got 'many'"),
        "missing shards": (["--set", f"data.shards={tmp_path / 'nowhere'}"], "data.shards: no such directory"),
        "unknown override": (["--set", "train.epochz=3"], "train.epochz: unknown key"),
        "bad flag value": (["--time", "forever"], "slurm.time: must be a Slurm time limit"),
        "no tasks": (["--set", "slurm.tasks_per_node=null"], "slurm.tasks_per_node: required when slurm.gpus_per_node is 0"),
        "too few classes": (["--set", "model.num_classes=4"], "model.num_classes: 4 is fewer than the 8 classes"),
        # 480 train samples over 2 nodes x 2 tasks: 120 per rank
        "batch too large": (["--tasks-per-node", "2", "--set", "train.batch_per_device=128"],
                            "train.batch_per_device: 128 x train.grad_accum 1 on each of 4 ranks is a global batch "
                            "of 512 train samples per step, data.shards has 480: zero steps per epoch"),
    }[case]
    if case == "bad recipe":
        recipe.write_text(recipe.read_text().replace("epochs: 12", "epochs: many"))
    before = jobs(cluster)
    out = submit(cluster, recipe, "--nodes", "2", *args)
    assert out.returncode != 0
    assert out.stderr.startswith(f"error: {recipe}: ") and expected in out.stderr and out.stderr.count("\n") == 1
    assert jobs(cluster) == before


def tasks_of(job: submitit.SlurmJob) -> dict[str, psutil.Process]:
    """The job's task processes on this machine, by Slurm rank (SLURM_PROCID)."""
    tasks = {}
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("SLURM_JOB_ID") == job.job_id and "submitit.core._submit" in " ".join(p.cmdline()):
                tasks[env["SLURM_PROCID"]] = p
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return tasks


def freeze_rank_1(job: submitit.SlurmJob, logged) -> psutil.Process:
    """SIGSTOP the job's rank 1 once rank 0's log is ``logged`` (the job's tasks run on this machine)."""
    log, deadline = Path(job.paths.stdout), time.monotonic() + 300
    while not (log.exists() and logged(log.read_text())):
        assert time.monotonic() < deadline, "the job did not get there"  # (done() is unreliable while requeued)
        time.sleep(0.2)
    rank1 = tasks_of(job)["1"]
    rank1.suspend()
    return rank1


@pytest.mark.slow
def test_a_stalled_job_requeues_and_resumes_until_slurm_max_failures(cluster, tmp_path, demo_shards):
    recipe = demo_recipe(tmp_path, demo_shards, train={"epochs": 3, "stall_timeout_s": 20},
                         checkpoint={"every_steps": 4, "every_minutes": None}, slurm=dict(CPU_NODES, max_failures=1))
    job = job_of(submit(cluster, recipe, "--nodes", "2"), recipe)
    first = freeze_rank_1(job, lambda text: " step 5/45 " in text)  # after the checkpoint of step 4
    # Rank 0 names the frozen rank, requeues the job (failure 1 of slurm.max_failures 1) and ends
    # it; the requeued job resumes, and its new rank 1 is frozen once it trains.
    second = freeze_rank_1(job, lambda text: "resuming from" in text and " step " in text.split("resuming from")[-1])
    assert second.pid != first.pid and not first.is_running()
    assert final_state(job) == "FAILED"
    text = Path(job.paths.stdout).read_text()
    verdicts = [line for line in text.splitlines() if " ERROR stalled: rank 1 (no heartbeat for " in line]
    assert len(verdicts) == 2 and f"pid {first.pid} on {socket.gethostname()}" in verdicts[0]
    assert f"pid {second.pid} on {socket.gethostname()}" in verdicts[1]
    assert f"job {job.job_id} failed (stalled: rank 1" in text and "requeued after failure 1 (slurm.max_failures 1)" in text
    assert (f"not requeued: job {job.job_id} failed 2 times (stalls or crashes; slurm.max_failures is 1); the logs are "
            f"in {Path(job.paths.stdout).parent}; resubmit to continue from the last checkpoint") in text
    assert not tasks_of(job)
