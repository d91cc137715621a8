"""data_prep/make_shards.py --slurm-tasks N: the shards built by a job array on a real Slurm
cluster on loopback (fatscale.tryout.devcluster), byte-identical to a local run.

To catch a task mid-run, a blocker job holds every CPU of the cluster until the test has set the
scene (the plan is made by then: the array is recorded), and a source file replaced by a FIFO
holds one task at that file for as long as the test wants.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fatscale.prep import cli
from fatscale.prep.slurm import ARRAY_FILE, SLURM_DIR
from fatscale.prep.state import STATE_DIR
from fatscale.tryout.demo_data import make_demo_images
from test_make_shards import read_samples, real_tree  # noqa: F401 - real_tree: a fixture
from test_slurm import cluster  # noqa: F401 - a fixture: one 2-node cluster for this module

SCRIPT = str(Path(__file__).resolve().parents[1] / "data_prep" / "make_shards.py")
SHARD_ARGS = ("--samples-per-shard", "8")  # 96 + 32 demo images: 12 train and 4 val shards
TIMEOUT_S = 120


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory) -> Path:
    return make_demo_images(tmp_path_factory.mktemp("demo") / "src", per_class=12, val_per_class=4, size=48)


def local_twin(src: Path, out: Path, *args: str) -> Path:
    """A local run with the same arguments, in this process: what the array must give."""
    cli.main(["--src", str(src), "--out", str(out), *args, "--workers", "1", "--quiet"])
    return out


def command(src: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-u", SCRIPT, "--src", str(src), "--out", str(out), *args]


def run_cli(src: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(src, out, *args), capture_output=True, text=True, timeout=TIMEOUT_S)


def start_cli(src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(command(src, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ended(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=TIMEOUT_S)
    return p.returncode, out, err


def output_files(out: Path) -> dict[str, bytes]:
    """Every file a run leaves in OUT but Slurm's (submitit's files, the array record) and the lock."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and SLURM_DIR not in p.relative_to(out).parts and p.name != "lock"}


def wait_for(what: str, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def recorded_array(out: Path) -> dict:
    """The array the command submitted (job id, shards of each task), once it is recorded."""
    path = out / STATE_DIR / SLURM_DIR / ARRAY_FILE
    wait_for("the array's record", path.exists)
    return json.loads(path.read_text())


def committed(out: Path) -> set[str]:
    return {p.stem for p in (out / STATE_DIR).glob("*-??????.json")}


def sbatch(*args: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=True)
    return r.stdout.strip().split(";")[0]


def queue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


class Blocker:
    """A job on every CPU of the cluster: the array's tasks wait until ``release()``."""

    def __init__(self, cluster):
        self.job_id = sbatch("-N", str(len(cluster.node_names)), "--exclusive", "--output=/dev/null",
                             "--wrap", "sleep 300")
        wait_for("the blocker to run", lambda: queue_state(self.job_id) == "RUNNING")

    def release(self) -> None:
        subprocess.run(["scancel", self.job_id], capture_output=True)  # twice on the way out: no check


def first_source(out: Path, shard: str) -> str:
    """The source file (split/class/file) of the first sample of ``shard`` in a finished OUT."""
    split = shard.split("-")[0]
    sample = next(s for s in read_samples(out, split) if s["shard"] == f"{shard}.tar")
    return f"{split}/{sample['meta']['source']}"


def shard_files(out: Path, names) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the tar, index and commit record of each shard."""
    paths = [p for n in names for p in (out / f"{n}.tar", out / f"{n}.idx", out / STATE_DIR / f"{n}.json")]
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["demo", pytest.param("imagenet-sample", marks=pytest.mark.slow)])  # timm: slow
def test_an_array_of_two_tasks_builds_the_bytes_of_a_local_run(cluster, demo_tree, tmp_path, request, tree):
    if tree == "demo":
        src, args = shutil.copytree(demo_tree, tmp_path / "src"), SHARD_ARGS
    else:
        src, _, labels = request.getfixturevalue("real_tree")
        args = ("--val-labels", str(labels), "--shard-size-mb", "2")
    local = local_twin(src, tmp_path / "local", *args)
    out = tmp_path / "out"
    r = run_cli(src, out, *args, "--slurm-tasks", "2", "--cpus-per-task", "2", "--time", "1:00:00")
    assert r.returncode == 0, r.stderr
    array = recorded_array(out)
    script = (out / STATE_DIR / SLURM_DIR / f"{array['job_id']}_submission.sh").read_text()
    assert "#SBATCH --time=60\n" in script and "#SBATCH --array=0-1%2\n" in script and "--cpus-per-task=2 " in script
    assert f"submitted array job {array['job_id']}: 2 task(s) for " in r.stdout
    assert len(array["shares"]) == 2 and all(array["shares"])
    n = sum(len(share) for share in array["shares"])
    assert f"wrote {n} shard(s), kept 0 from an earlier run" in r.stdout
    assert "shard/s" in r.stderr and "img/s" in r.stderr  # the progress bar
    for i, share in enumerate(array["shares"]):  # each task built its own share, with 2 workers
        log = (out / STATE_DIR / SLURM_DIR / f"{array['job_id']}_{i}_0_log.out").read_text()
        assert f"built {len(share)} of this task's {len(share)} shard(s)" in log and "with 2 worker process" in log
    mine, theirs = output_files(out), output_files(local)
    assert mine.keys() == theirs.keys() and "manifest.json" in mine
    assert {name for name in mine if mine[name] != theirs[name]} == set()
    verify = subprocess.run([sys.executable, SCRIPT, "--verify", str(out), "--quiet"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_a_killed_task_is_rebuilt_alone_by_the_same_command(cluster, demo_tree, tmp_path):
    src = shutil.copytree(demo_tree, tmp_path / "src")
    local = local_twin(src, tmp_path / "local", *SHARD_ARGS)
    out, args = tmp_path / "out", (*SHARD_ARGS, "--slurm-tasks", "2", "--quiet")
    blocker = Blocker(cluster)
    try:
        first = start_cli(src, out, *args)
        array = recorded_array(out)
        # Ctrl-C leaves the array alone; the same command re-attaches to it instead of submitting.
        first.send_signal(signal.SIGINT)
        code, _, err = ended(first)
        assert code == 130 and "run the same command again to re-attach" in err, err
        assert queue_state(array["job_id"]) == "PENDING"
        # A local run on the same OUT would delete the files the tasks are writing.
        local_run = run_cli(src, out, *SHARD_ARGS, "--quiet")
        assert local_run.returncode == 2 and local_run.stderr.count("\n") == 1
        assert f"array job {array['job_id']} is still building shards in" in local_run.stderr
        again = start_cli(src, out, *args)
        assert again.stdout.readline().startswith(f"make_shards: re-attached to array job {array['job_id']}, ")
        # Task 1 stops at its third shard, for good: one of its files is a FIFO now.
        task0, task1 = array["shares"]
        victim = src / first_source(local, task1[2])
        data = victim.read_bytes()
        victim.unlink()
        os.mkfifo(victim)
        blocker.release()
        wait_for("task 0 and task 1's first shards", lambda: committed(out) >= {*task0, *task1[:2]})
        # KILL, to its step: submitit's task ignores SIGTERM, a plain scancel would wait Slurm's KillWait (30 s)
        subprocess.run(["scancel", "--signal=KILL", f"{array['job_id']}_1.0"], check=True)
        code, _, err = ended(again)
    finally:
        blocker.release()
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"make_shards: error: task 1 (job {array['job_id']}_1) ended ")
    assert f"with shard {task1[2]} and {len(task1) - 3} more of its {len(task1)} unbuilt" in err
    assert not (out / "manifest.json").exists()

    built = committed(out)
    assert built == {*task0, *task1[:2]}
    before = shard_files(out, built)
    victim.unlink()
    victim.write_bytes(data)
    r = run_cli(src, out, *args)
    assert r.returncode == 0, r.stderr
    rebuilt = recorded_array(out)
    assert rebuilt["job_id"] != array["job_id"] and f"for {len(task1) - 2} shard(s)" in r.stdout
    assert sorted(sum(rebuilt["shares"], [])) == sorted(task1[2:])
    assert f"wrote {len(task1) - 2} shard(s), kept {len(built)} from an earlier run" in r.stdout
    assert shard_files(out, built) == before  # the shards built before were not touched
    assert output_files(out) == output_files(local)


def test_a_failing_task_fails_the_command_in_one_line(cluster, demo_tree, tmp_path):
    src = shutil.copytree(demo_tree, tmp_path / "src")
    local = local_twin(src, tmp_path / "local", *SHARD_ARGS)
    out = tmp_path / "out"
    blocker = Blocker(cluster)
    try:
        p = start_cli(src, out, *SHARD_ARGS, "--slurm-tasks", "2", "--quiet")
        array = recorded_array(out)
        # A val class folder lies in one val shard of task 1; it goes after the plan, before the task reads it.
        shard = next(name for name in array["shares"][1] if name.startswith("val-"))
        gone = (src / first_source(local, shard)).parent
        shutil.rmtree(gone)
        blocker.release()
        code, _, err = ended(p)
    finally:
        blocker.release()
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"make_shards: error: task 1 (job {array['job_id']}_1) stopped at shard {shard}: "
                          f"cannot read {gone}/"), err
    assert err.endswith(": No such file or directory; run the same command again to resume\n")
    assert not (out / "manifest.json").exists()
    assert set(array["shares"][0]) <= committed(out)  # task 0 went on


@pytest.mark.parametrize("args, message", [
    (["--slurm-tasks", "0"], "--slurm-tasks must be >= 1, got 0"),
    (["--slurm-tasks", "2", "--cpus-per-task", "0"], "--cpus-per-task must be >= 1, got 0"),
    (["--slurm-tasks", "2", "--time", "1h"], "--time 1h is not a Slurm time limit"),
    (["--slurm-tasks", "2", "--mem", "4X"], "--mem 4X is not a Slurm memory size"),
    (["--slurm-tasks", "2", "--qos", "a b"], "--qos 'a b' is not a Slurm name"),
    (["--slurm-tasks", "2", "--partition", "nope"], "Slurm refuses --slurm-tasks 2 --cpus-per-task 1 "
                                                    "--partition nope: invalid partition specified: nope"),
    (["--slurm-tasks", "2", "--cpus-per-task", "64"], "Slurm refuses --slurm-tasks 2 --cpus-per-task 64: "),
    (["--partition", "debug"], "--partition is an option of --slurm-tasks, which is not given"),
    (["--slurm-tasks", "2", "--workers", "2"], "--workers 2 is for a local run"),
])
def test_bad_slurm_options_are_one_line_errors_before_anything_is_submitted(cluster, demo_tree, tmp_path, capsys,
                                                                           args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["--src", str(demo_tree), "--out", str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"make_shards: error: {message}"), err
    assert not (tmp_path / "out").exists()  # where a submission's files would be


def test_help_answers_without_importing_submitit():
    r = subprocess.run([sys.executable, "-X", "importtime", SCRIPT, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--slurm-tasks N" in r.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "fatscale.prep.slurm" in imported
    assert not {m for m in imported if m.split(".")[0] in ("submitit", "tqdm", "torch", "timm")}
