"""fatscale.devcluster with real daemons (munged, MariaDB, slurmdbd, slurmctld, one slurmd per
node): multi-node jobs, accounting, submitit round trips including a requeue, stop by PID, CLI."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from fatscale import devcluster
from fatscale.devcluster import DevCluster, DevClusterError

REPO = Path(__file__).resolve().parents[1]
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
MISSING = [b for b in ("munged", "mariadb-install-db", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "srun",
                       "sacct") if shutil.which(b, path=SEARCH_PATH) is None]
needs_daemons = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {' '.join(MISSING)} "
                                                         f"({devcluster.INSTALL_HINT})")

# Jobs unpickle the callables below; the job's Python cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def job_facts() -> dict:
    env = submitit.JobEnvironment()
    return {"node": os.environ["SLURMD_NODENAME"], "rank": env.global_rank, "tasks": env.num_tasks,
            "hostnames": env.hostnames}


class TwoRuns(submitit.helpers.Checkpointable):
    """Waits to be interrupted in its first run; its requeued second run returns the run count."""

    def __init__(self):
        self.runs = 0

    def __call__(self, started: str) -> int:
        self.runs += 1  # checkpoint() pickles self, so the second run sees 1 here
        Path(started).write_text(str(self.runs))
        if self.runs == 1:
            time.sleep(300)
        return self.runs


def run(cluster: DevCluster, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env={**os.environ, **cluster.env}, capture_output=True, text=True, check=check,
                          timeout=60)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)
    return result


def gone(pid: int) -> bool:
    """No such process, or a zombie (this machine's init does not reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def sacct_states(cluster: DevCluster, job_id: str) -> list[str]:
    """Every record of the job (a requeue adds one), oldest first."""
    out = run(cluster, "sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job_id).stdout
    return out.split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with DevCluster(tmp_path_factory.mktemp("devcluster"), nodes=2, cpus_per_node=2) as cluster:
        yield cluster


@pytest.fixture
def executor(cluster, tmp_path, monkeypatch):
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)  # submitit runs sbatch/sacct with os.environ
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(timeout_min=5, slurm_partition=cluster.partition, cpus_per_task=1, mem_gb=1)
    return executor


@needs_daemons
def test_two_node_job_runs_one_task_per_node(cluster):
    nodes = dict(line.split() for line in run(cluster, "sinfo", "-h", "-N", "-o", "%N %T").stdout.splitlines())
    assert nodes == {name: "idle" for name in cluster.node_names} and len(nodes) == 2
    out = cluster.root.parent / "two_nodes.out"
    submitted = run(cluster, "sbatch", "--wait", "--parsable", "-N2", "--ntasks-per-node=1", "--cpus-per-task=2",
                    f"--mem={cluster.memory_mb_per_node}", "--time=1", "--requeue", "--signal=USR2@90",
                    f"--output={out}", "--wrap", "srun bash -c 'echo $SLURM_PROCID $SLURMD_NODENAME'")
    job_id = submitted.stdout.strip()
    lines = sorted(out.read_text().splitlines())
    assert [line.split()[0] for line in lines] == ["0", "1"]
    assert {line.split()[1] for line in lines} == set(cluster.node_names)
    assert wait_for(lambda: sacct_states(cluster, job_id), 15, "the job in sacct") == ["COMPLETED"]
    too_big = run(cluster, "sbatch", f"--mem={cluster.memory_mb_per_node + 1}", "--output=/dev/null", "--wrap", "true",
                  check=False)
    assert too_big.returncode != 0 and "Memory specification can not be satisfied" in too_big.stderr


@needs_daemons
def test_submitit_two_node_round_trip(cluster, executor):
    executor.update_parameters(nodes=2, tasks_per_node=1)
    job = executor.submit(job_facts)
    facts = job.results()
    assert job.task(0).result() == facts[0]
    assert [f["rank"] for f in facts] == [0, 1] and {f["tasks"] for f in facts} == {2}
    assert {f["node"] for f in facts} == set(cluster.node_names)
    assert facts[0]["hostnames"] == cluster.node_names  # what MASTER_ADDR is taken from
    wait_for(lambda: job.get_info(mode="force").get("State") == "COMPLETED", 15, "sacct to report COMPLETED")
    assert job.state == "COMPLETED"


@needs_daemons
def test_submitit_requeue_round_trip(cluster, executor, tmp_path):
    started = tmp_path / "started"
    job = executor.submit(TwoRuns(), str(started))
    wait_for(lambda: started.exists(), 30, "the first run to start")
    t0 = time.monotonic()
    job._interrupt()  # preemption: SIGTERM (ignored by submitit), then USR2: checkpoint, requeue
    assert job.result() == 2
    round_trip = time.monotonic() - t0
    print(f"requeue round trip: {round_trip:.1f} s")
    assert round_trip < 30  # without cred_expire=5 a requeued job waits 120 s

    def finished_records() -> list[str] | None:
        states = sacct_states(cluster, job.job_id)
        return states if states[-1:] == ["COMPLETED"] else None

    assert wait_for(finished_records, 15, "sacct to report COMPLETED") == ["REQUEUED", "COMPLETED"]


@needs_daemons
def test_start_failure_names_daemon_and_log_and_cleans_up(tmp_path_factory, monkeypatch):
    busy = socket.socket()
    busy.bind(("", 0))
    busy.listen()
    free_ports = devcluster._free_ports

    def ports(count: int) -> list[int]:  # the third one is MariaDB's, which exits at once if it is taken
        picked = free_ports(count)
        picked[2] = busy.getsockname()[1]
        return picked

    monkeypatch.setattr(devcluster, "_free_ports", ports)
    cluster = DevCluster(tmp_path_factory.mktemp("failing"), nodes=1)
    with pytest.raises(DevClusterError) as failure:
        cluster.start()
    busy.close()
    message = str(failure.value)
    assert "\n" not in message and message.startswith("mariadbd exited at start")
    assert f"see {cluster.root / 'log' / 'mariadbd.log'}: " in message and "ERROR" in message
    assert cluster.running() == [] and not list((cluster.root / "pids").iterdir())


def test_missing_binary_names_it_and_the_packages(tmp_path, monkeypatch):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None if name == "slurmctld" else which(name, **kw))
    with pytest.raises(DevClusterError, match=r"^slurmctld not found; .*apt-get install .*slurmctld") as failure:
        DevCluster(tmp_path / "c").start()
    assert "\n" not in str(failure.value) and not (tmp_path / "c").exists()


@needs_daemons
def test_stop_ends_jobs_and_daemons_by_pid(tmp_path_factory):
    cluster = DevCluster(tmp_path_factory.mktemp("stop"), nodes=1)
    cluster.start()
    try:
        daemons = cluster.running()
        assert [name for name, _ in daemons] == ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd-127.0.0.11"]
        assert not any(gone(pid) for _, pid in daemons)
        with pytest.raises(DevClusterError, match="already runs in"):
            DevCluster(cluster.root, nodes=1).start()
        sleeping = run(cluster, "sbatch", "--parsable", f"--output={cluster.root}/sleep.out", "--wrap", "sleep 300")
        job_id = sleeping.stdout.strip()
        listpids = ("scontrol", "listpids", job_id, cluster.node_names[0])
        pids = wait_for(lambda: run(cluster, *listpids, check=False).stdout.split()[5::5], 30, "the job's processes")
    finally:
        cluster.stop()
    assert cluster.running() == []
    assert all(gone(pid) for _, pid in daemons) and all(gone(int(pid)) for pid in pids)
    t0 = time.monotonic()
    cluster.stop()
    assert time.monotonic() - t0 < 0.5


@needs_daemons
def test_cli_start_status_stop(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "c"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "launch" / "devcluster.py"), *args, "--dir", str(root)],
                              capture_output=True, text=True, timeout=120)

    started = cli("start", "--nodes", "1")  # returns while its daemons keep running
    try:
        assert started.returncode == 0, started.stderr
        assert f"export SLURM_CONF={root / 'slurm.conf'}\n" in started.stdout
        assert "idle 127.0.0.11" in started.stdout
        pids = [int(p.read_text()) for p in (root / "pids").iterdir()]
        assert len(pids) == 5 and not any(gone(pid) for pid in pids)
        again = cli("start")
        assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already runs in" in again.stderr
        status = cli("status")
        assert status.returncode == 0 and "slurmctld" in status.stdout and "idle 127.0.0.11" in status.stdout
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped 5 daemons")
    assert all(gone(pid) for pid in pids)
    again = cli("stop")
    assert again.returncode == 0 and again.stdout.startswith("no dev cluster runs in")
    assert cli("status").stdout.startswith("no dev cluster runs in")


@needs_daemons
def test_too_long_a_root_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / ("x" * 60)
    with pytest.raises(DevClusterError, match=r"too long a path .* \(at most \d+ characters\); pick a shorter"):
        DevCluster(root).start()
    assert not root.exists()
