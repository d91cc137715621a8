"""Sweeps (fatscale/sweep.py) through launch/slurm.py: one Slurm job array on a real cluster on
loopback, nested MLflow runs on a real tracking server, re-submission of only what is not
finished; node ranges (--nodes MIN-MAX) checked for every node count."""

import csv
import io
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import submitit
import yaml
from mlflow import MlflowClient

from conftest import REPO, demo_recipe, free_port
from fatscale.checkpoint import layout as ckpt
from fatscale import sweep
from test_slurm import CPU_NODES, cluster, jobs, submit  # noqa: F401 (cluster: the fixture)

LAUNCH = str(REPO / "launch" / "slurm.py")


def test_points_names_and_overrides(tmp_path):
    points = sweep.grid(["optim.lr=2.5e-4,5e-4", "model.name=fat_b0,fat_b1"])
    assert [p.name for p in points] == ["optim.lr=0.00025,model.name=fat_b0", "optim.lr=0.00025,model.name=fat_b1",
                                        "optim.lr=0.0005,model.name=fat_b0", "optim.lr=0.0005,model.name=fat_b1"]
    assert points[2].overrides == ["optim.lr=0.0005", 'model.name="fat_b0"']  # 5e-4 a number, not YAML 1.1's string
    (odd,) = sweep.grid(["aug.scale=[0.3,1.0]"])
    assert odd.name == "aug.scale=_0.3,1.0_" and odd.overrides == ["aug.scale=[0.3, 1.0]"]
    listed = tmp_path / "grid.yaml"
    listed.write_text("- {optim.lr: 1e-3, train.max_steps: 6}\n- {optim.lr: 0.002}\n")
    assert [p.name for p in sweep.listed(listed)] == ["optim.lr=0.001,train.max_steps=6", "optim.lr=0.002"]
    for specs, message in ((["optim.lr=5e-4,0.0005"], "a value is listed twice"),
                           (["slurm.nodes=1,2"], "'slurm.nodes' cannot differ between points"),
                           (["optim.lr"], "expected KEY=VALUE,VALUE,..."),
                           (["optim.lr=1", "optim.lr=2"], "optim.lr: given twice")):
        with pytest.raises(sweep.SweepError, match=message):
            sweep.grid(specs)


def test_failure_tickets_are_per_array_element(tmp_path, monkeypatch):
    from fatscale.job import TrainJob

    for key, value in dict(SUBMITIT_EXECUTOR="slurm", SUBMITIT_FOLDER=str(tmp_path), SLURM_JOB_ID="124",
                           SLURM_ARRAY_JOB_ID="123", SLURM_ARRAY_TASK_ID="1", SLURM_RESTART_COUNT="0").items():
        monkeypatch.setenv(key, value)
    job = TrainJob("", "recipe.yaml")
    job.max_failures = 0  # then it writes its ticket and does not requeue
    job.requeue_after_failure("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["123_1.failure-0"]  # what scontrol requeue is given too


def test_the_summary_survives_a_tracking_server_that_is_down(tmp_path):
    points = sweep.grid(["optim.lr=1e-3,2e-3"])
    sweep.save(tmp_path, sweep.new_sweep("recipe.yaml", points, f"http://127.0.0.1:{free_port()}", "x", "demo"))
    warning = sweep.try_update_summary(tmp_path, timeout=60)
    assert "the MLflow parent run's summary was not updated" in warning and "Connection refused" in warning
    rows = (tmp_path / "summary.csv").read_text().splitlines()  # written all the same
    assert rows[1].startswith("optim.lr=0.001,0.001,NOT_SUBMITTED,") and len(rows) == 3
    assert sweep.load(tmp_path).parent_run_id is None  # the next update creates it


def test_node_range_goes_to_sbatch_and_every_node_count_is_checked(tmp_path, demo_shards):
    recipe = demo_recipe(tmp_path, demo_shards, slurm=CPU_NODES)
    out = launch(recipe, "--nodes", "1-2", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("#SBATCH --nodes")] == ["#SBATCH --nodes=1-2"]
    assert "  nodes: 1-2\n" in out.stdout  # the recipe's slurm.nodes, as the job gets it
    # The global batch of 2 nodes, whatever the job gets: on 1 node, 2 accumulation steps of 16.
    assert "slurm.nodes 1-2: a global batch of 32 on any of these node counts (train.global_batch)" in out.stdout
    assert "  grad_accum: 1\n  global_batch: 32\n" in out.stdout
    # 480 train samples: 3 nodes of 2 tasks with 96 per rank would be 576 per step.
    out = launch(recipe, "--nodes", "1-3", "--tasks-per-node", "2", "--set", "train.batch_per_device=96", "--dry-run")
    assert out.returncode != 0 and out.stderr.count("\n") == 1
    assert out.stderr == (f"error: {recipe}: slurm.nodes 1-3: the job cannot train on 1, 2, 3 node(s) of 2 task(s): "
                          "train.global_batch: 576 train samples per step, data.shards has 480: zero steps per epoch\n")
    # 3 nodes of one task cannot share the global batch of 4 (64)
    out = launch(recipe, "--nodes", "3-4", "--dry-run")
    assert out.stderr == (f"error: {recipe}: slurm.nodes 3-4: the job cannot train on 3 node(s) of 1 task(s): "
                          "train.global_batch: a global batch of 64 cannot be split over 3 ranks: use a number of "
                          "ranks that divides 64\n")
    # an explicit global batch is kept, and a run with checkpoints keeps theirs
    out = launch(recipe, "--nodes", "1-2", "--set", "train.global_batch=48", "--dry-run")
    assert out.returncode == 0 and "  global_batch: 48\n" in out.stdout
    out = launch(recipe, "--nodes", "3-1", "--dry-run")
    assert out.returncode != 0 and "slurm.nodes: must be a node count or a range MIN-MAX" in out.stderr


def launch(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCH, str(recipe), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values, expected", [
    ("1e-3,abc", "error: point optim.lr=abc: {recipe}: optim.lr: expected a number, got 'abc'"),
    # 480 train samples on 1 rank: a batch of 512 trains no step
    ("1e-3 --sweep train.batch_per_device=16,512",
     "error: point optim.lr=0.001,train.batch_per_device=512: {recipe}: train.batch_per_device: 512 x"),
])
def test_a_bad_point_fails_the_submission_before_any_job(cluster, tmp_path, demo_shards, values, expected):
    recipe = demo_recipe(tmp_path, demo_shards, slurm=CPU_NODES)
    before = jobs(cluster)
    out = submit(cluster, recipe, "--sweep", *f"optim.lr={values}".split())
    assert out.returncode != 0 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(expected.format(recipe=recipe)), out.stderr
    assert jobs(cluster) == before and not (tmp_path / "out").exists()


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def submitted_jobs(out: subprocess.CompletedProcess) -> dict[str, str]:
    """Point name -> job id, from the launcher's output."""
    assert out.returncode == 0, out.stderr
    return {line.split(":")[0].strip(): line.split(" job ")[1].split(",")[0]
            for line in out.stdout.splitlines() if ": job " in line and ", log " in line}


@pytest.mark.slow
def test_a_sweep_is_one_array_with_nested_runs_and_resubmits_only_what_is_unfinished(cluster, tmp_path, demo_shards,
                                                                                     mlflow_server):
    recipe = demo_recipe(tmp_path, demo_shards, train={"epochs": 1, "log_every": 2},
                         checkpoint={"every_steps": 2, "every_minutes": None},
                         tracking={"uri": mlflow_server.uri, "experiment": "sweep"}, slurm=CPU_NODES)
    grid = tmp_path / "grid.yaml"  # a short point, and a long one (a 30-step epoch) to cancel mid-run
    grid.write_text(yaml.safe_dump([{"optim.lr": 1e-3, "train.max_steps": 6}, {"optim.lr": 2e-3}]))
    short, long = "optim.lr=0.001,train.max_steps=6", "optim.lr=0.002"
    sweep_dir = tmp_path / "out"
    first = submitted_jobs(submit(cluster, recipe, "--sweep-file", str(grid)))
    array = first[short].split("_")[0]
    assert first == {short: f"{array}_0", long: f"{array}_1"}  # one job array
    checkpoints = sweep_dir / long / "checkpoints"
    wait_for(lambda: ckpt.sealed_tags(checkpoints), "the long point saved no checkpoint")
    # Preempted (USR2, as before its time limit): the array element requeues and resumes by itself.
    subprocess.run(["scancel", "--signal=USR2", first[long]], check=True)
    long_log = sweep_dir / "slurm" / f"{first[long]}_0_log.out"
    wait_for(lambda: "resuming from" in long_log.read_text(), "the preempted point did not requeue and resume")
    preempted_at = int(long_log.read_text().split("stop requested: saved ")[1].split("step-")[1][:9])
    assert f"resuming from {checkpoints / ckpt.tag_for(preempted_at)}" in long_log.read_text()
    subprocess.run(["scancel", first[long]], check=True)
    # Its tasks ignore scancel's SIGTERM (submitit's handler) and train on until Slurm's KillWait (30 s)
    # ends them with SIGKILL: that, at once.
    for task in tasks_of(first[long]):
        task.kill()
    wait_for(lambda: not sweep.queued_jobs([first[long]]), "the cancelled point did not end")
    short_result = submitit.SlurmJob(folder=sweep_dir / "slurm", job_id=first[short], tasks=(0,)).results()[0]
    status = status_of(sweep_dir)
    assert status[short][:2] == ["FINISHED", first[short]] and status[long][:2] == ["CANCELLED", first[long]]
    progress = ckpt.read_json(checkpoints / ckpt.sealed_tags(checkpoints)[0] / "progress.json")
    cancelled_at, run_id = progress["global_step"], progress["mlflow_run_id"]
    assert status[long][3] == str(cancelled_at) and cancelled_at < 30
    short_checkpoints = sweep_dir / short / "checkpoints"
    short_progress = ckpt.read_json(short_checkpoints / ckpt.sealed_tags(short_checkpoints)[0] / "progress.json")
    assert short_progress["device_s"] > 0
    assert float(status[short][5]) == pytest.approx(short_progress["device_s"] / 3600, abs=1e-3)

    again = submit(cluster, recipe, "--sweep-file", str(grid))
    assert f"  {short}: finished (top-1 {short_result['summary']['top1']:.2f}), skipped" in again.stdout
    assert f"  {long}: submit, resumes step {cancelled_at} (epoch 0, MLflow run {run_id})" in again.stdout
    (resubmitted,) = submitted_jobs(again).items()  # only the cancelled point
    assert resubmitted[0] == long
    result = submitit.SlurmJob(folder=sweep_dir / "slurm", job_id=resubmitted[1], tasks=(0,)).results()[0]
    log = (sweep_dir / "slurm" / f"{resubmitted[1]}_0_log.out").read_text()
    assert f"resuming from {checkpoints / ckpt.tag_for(cancelled_at)}" in log

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("sweep").experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment])}
    parent = runs.pop("recipe")
    children = {run.info.run_id: run for run in runs.values()}
    assert len(children) == 2 and run_id in children  # the cancelled point continued its run
    assert {run.data.tags["mlflow.parentRunId"] for run in children.values()} == {parent.info.run_id}
    resumed = children[run_id]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_at_step"] == str(cancelled_at)
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == set(range(2, 31, 2))
    assert parent.info.status == "FINISHED" and parent.data.params["optim.lr"] == "[0.001,0.002]"
    best = max(short_result["summary"]["top1"], result["summary"]["top1"])
    assert parent.data.metrics["top1"] == best
    assert parent.data.tags["best_run_id"] in children
    summary = Path(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))).read_text()
    assert [(row["point"], row["state"]) for row in csv.DictReader(io.StringIO(summary))] == [
        (short, "FINISHED"), (long, "FINISHED")]

    before = jobs(cluster)
    done = submit(cluster, recipe, "--sweep-file", str(grid))
    assert done.returncode == 0 and "nothing to submit" in done.stdout and jobs(cluster) == before


def tasks_of(array_task: str) -> list[psutil.Process]:
    """The task processes of array element ``ARRAY_TASK`` (they run on this machine)."""
    array, task = array_task.split("_")
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if (env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")) == (array, task) and \
                    "submitit.core._submit" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    assert found, f"no task of {array_task} runs"
    return found


def status_of(sweep_dir: Path) -> dict[str, list[str]]:
    """--status: point values -> its columns (state, job, epoch, step, top1, device_h)."""
    out = subprocess.run([sys.executable, LAUNCH, "--status", str(sweep_dir)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["point", "state", "job", "epoch", "step", "top1", "device_h"]
    return {",".join(line.split()[:-6]): line.split()[-6:] for line in lines[1:-1]}
