"""fatscale.tryout.devcluster with real daemons (munged, MariaDB, slurmdbd, slurmctld, one slurmd per
node): multi-node jobs, accounting, submitit round trips including a requeue, stop by PID, CLI,
and what other local users and other hosts can reach of it."""

import ipaddress
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from fatscale.tryout import devcluster
from fatscale.tryout.devcluster import DevCluster, DevClusterError

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


def tcp_listeners(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that process ``pid`` listens on, IPv4 and IPv6."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            found.add((str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))),
                       int(port, 16)))
    return found


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]  # an unprivileged local user


def mariadb(*argv: str, as_nobody: bool = False) -> subprocess.CompletedProcess:
    """The MariaDB client, as root or as the unprivileged user nobody."""
    return subprocess.run([*(AS_NOBODY if as_nobody else []), shutil.which("mariadb"), "--no-defaults", "-N", "-B",
                           *argv], capture_output=True, text=True, timeout=30, cwd="/")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


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
def test_sockets_and_secrets_are_root_s_alone(cluster):
    root, run_dir, munge_dir = cluster.root, cluster.root / "run", cluster.root / "munge"
    # spool/NODE (slurmstepd's sockets) is slurmd's: it makes it 0755
    private_dirs = [root, run_dir, munge_dir, root / "db", root / "spool"]
    assert {d: (oct(mode(d)), d.stat().st_uid) for d in private_dirs} == {d: ("0o700", os.geteuid())
                                                                         for d in private_dirs}
    for sock in (run_dir / "munge.socket", run_dir / "mysqld.sock"):
        assert stat.S_ISSOCK(sock.lstat().st_mode)
    secrets = [*munge_dir.iterdir(), root / "slurmdbd.conf"]  # the key, and the seed after munged's first stop
    assert munge_dir / "munge.key" in secrets and {f: oct(mode(f)) for f in secrets} == {f: "0o600" for f in secrets}
    assert len((munge_dir / "munge.key").read_bytes()) == 1024
    # munged runs with --force for its socket's 0700 directory; it downgrades no other check
    warnings = [line for line in (root / "log" / "munged.log").read_text().splitlines() if "Warning:" in line]
    assert set(warnings) == {f'munged: Warning: Socket is inaccessible: execute permissions for all required on '
                             f'"{run_dir}"'}


@needs_daemons
def test_other_users_get_no_database_and_no_credentials(cluster):
    mariadbd = dict(cluster.running())["mariadbd"]
    ways_in = [*(["--protocol=tcp", "-h", host, "-P", str(port)] for host, port in tcp_listeners(mariadbd)),
               ["--socket", str(cluster.root / "run" / "mysqld.sock")]]
    for way_in in ways_in:  # as the database's root, without a password
        attempt = mariadb(*way_in, "-u", "root", "-e", "SELECT CURRENT_USER()", as_nobody=True)
        assert attempt.returncode != 0 and attempt.stdout == "", (way_in, attempt.stdout)
        assert attempt.stderr.rstrip().endswith("(13)") or "Access denied" in attempt.stderr, attempt.stderr  # EACCES
    munge_socket = cluster.root / "run" / "munge.socket"
    credential = subprocess.run([*AS_NOBODY, shutil.which("munge"), "-n", "-S", str(munge_socket)], capture_output=True,
                                text=True, timeout=30, cwd="/")
    assert credential.returncode != 0 and credential.stdout == "" and "Permission denied" in credential.stderr


@needs_daemons
def test_database_reads_and_writes_no_file_outside_its_own(cluster, tmp_path):
    dbd_conf = dict(line.split("=", 1) for line in (cluster.root / "slurmdbd.conf").read_text().splitlines()
                    if "=" in line)
    as_slurmdbd = ["--socket", str(cluster.root / "run" / "mysqld.sock"), "-u", dbd_conf["StorageUser"]]
    # LOAD_FILE reads only files that all may read (so never /etc/shadow), but as root it reaches
    # them in directories that others may not enter
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "note").write_text("not for the database")
    (private / "note").chmod(0o644)
    for path in ("/etc/shadow", private / "note"):
        read = mariadb(*as_slurmdbd, "-e", f"SELECT LOAD_FILE('{path}') IS NULL")
        assert (read.returncode, read.stdout) == (0, "1\n"), (path, read.stderr)
    outfile = tmp_path / "written-by-mariadb"
    write = mariadb(*as_slurmdbd, "-e", f"SELECT 'x' INTO OUTFILE '{outfile}'")
    assert write.returncode != 0 and "--secure-file-priv" in write.stderr and not outfile.exists()
    allowed = Path(mariadb(*as_slurmdbd, "-e", "SELECT @@secure_file_priv").stdout.strip())
    assert allowed.parent == cluster.root and mode(allowed) == 0o700 and not any(allowed.iterdir())


@needs_daemons
def test_daemons_listen_on_loopback_only(cluster):
    listening = {name: tcp_listeners(pid) for name, pid in cluster.running()}
    assert listening["munged"] == listening["mariadbd"] == set()  # unix sockets only
    # slurmd is left on every address: Slurm 22.05 cannot bind it to loopback without breaking srun
    for name in ("slurmdbd", "slurmctld"):
        assert listening[name] and all(ipaddress.ip_address(host).is_loopback for host, _ in listening[name]), \
            (name, listening[name])


@needs_daemons
def test_root_of_another_user_is_refused(tmp_path_factory):
    root = tmp_path_factory.mktemp("owner")
    os.chown(root, 65534, 65534)
    cluster = DevCluster(root)
    try:
        with pytest.raises(DevClusterError, match=rf"^{root} is owned by uid 65534, not by this cluster's user "
                                                  rf"\(uid {os.geteuid()}\); pick a directory of your own$"):
            cluster.start()
    finally:
        cluster.stop()
    assert not any(root.iterdir())


@needs_daemons
def test_start_failure_names_daemon_and_log_and_cleans_up(tmp_path_factory, monkeypatch):
    busy = socket.socket()
    busy.bind(("", 0))  # taken, but not listening: not mistaken for slurmdbd being ready
    free_ports = devcluster._free_ports

    def ports(count: int) -> list[int]:  # the second one is slurmdbd's, which exits at once if it is taken
        picked = free_ports(count)
        picked[1] = busy.getsockname()[1]
        return picked

    monkeypatch.setattr(devcluster, "_free_ports", ports)
    cluster = DevCluster(tmp_path_factory.mktemp("failing"), nodes=1)
    with pytest.raises(DevClusterError) as failure:
        cluster.start()
    busy.close()
    message = str(failure.value)
    assert "\n" not in message and message.startswith("slurmdbd exited at start")
    assert message.endswith(f"see {cluster.root / 'log' / 'slurmdbd.log'}: slurmdbd: fatal: slurm_init_msg_engine_port "
                            f"error Address already in use")
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
        assert oct(mode(root)) == "0o700"
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
