"""A throw-away, real, multi-node Slurm cluster on this one machine, talking over loopback.

It lets a user try the Slurm launcher without a cluster, and lets the test suite run real
``sbatch``/``srun``/submitit jobs (multi-node, requeue, accounting) against real daemons:

    python launch/devcluster.py start [--dir DIR] [--nodes N] [--cpus-per-node C]
    export SLURM_CONF=DIR/slurm.conf          # printed by start
    python launch/devcluster.py status|stop [--dir DIR]

or, in Python, ``with DevCluster(root, nodes=2) as cluster:`` with ``cluster.env`` in the
clients' environment. Everything lives under ``root``: configs, munge key and socket, the MariaDB
datadir, Slurm state and spool, one log per daemon (``root/log/<daemon>.log``, its stderr) and
our pid files (``root/pids/<daemon>.pid``).

Design (docs/slurm.md, "Trying it without a cluster", has the user's view):

* The daemons are Debian's (slurm-wlm 22.05, munge, MariaDB 10.11), run in the foreground so
  that their PIDs are ours, started in this order: munged (a random key of its own), MariaDB
  (private datadir), slurmdbd (accounting: ``sacct``, and therefore submitit's job states, need
  it), slurmctld, and one slurmd per node (``slurmd -N NODE``; Debian builds Slurm with
  MULTIPLE_SLURMD). Nodes are named after their own loopback address (127.0.0.11, 127.0.0.12,
  ...) so that node names resolve (the first one becomes MASTER_ADDR), and each slurmd has its
  own port. All ports are picked free at start, so several clusters coexist on one machine.
* The cluster is root's alone. ``root`` and every directory in it that holds a socket or a
  secret are 0700 (slurmd makes spool/NODE 0755, below the 0700 spool), the munge key and
  slurmdbd.conf 0600 from their creation: no other local user reaches munged (so none gets a
  credential for this cluster) or MariaDB. MariaDB has no TCP port: slurmdbd talks to it
  through its socket, as root (unix_socket authentication, no password), and secure-file-priv
  confines LOAD_FILE and INTO OUTFILE to the empty ``db-files``. slurmctld and slurmdbd listen
  on 127.0.0.1 only (see _as_localhost). Each slurmd listens on every address, as do srun's
  sockets: Slurm 22.05 cannot bind them elsewhere without breaking srun (see _write_configs);
  they answer only requests signed with this cluster's munge key.
* ``cred_expire=5`` (the minimum) and 1 s scheduler intervals let a requeued job start again
  within seconds instead of after the default 120 s credential lifetime.
* A second start in the same directory reuses what the first left (database, job history,
  munge key) with fresh ports. ``stop()`` first kills and cancels the jobs still in the cluster
  (their processes belong to slurmstepd, which outlives slurmd), then stops the daemons in
  reverse order: SIGTERM, SIGKILL after a bound. It only signals a PID from its pid files whose
  process still runs the expected binary with this cluster's ``SLURM_CONF`` in its
  environment, so a stale pid file that names someone else's process by now is left alone.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
INSTALL_HINT = f"apt-get install --no-install-recommends {PACKAGES}"
CLUSTER_NAME = "devcluster"
PARTITION = "debug"
CONF_HEADER = "# fatscale dev cluster, written by fatscale/tryout/devcluster.py at every start\n"
DAEMON_ORDER = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # start order
START_TIMEOUT_S = 60.0  # per step; MariaDB's first initialisation is the slow one
STOP_TIMEOUT_S = 15.0  # per daemon, from SIGTERM to SIGKILL and from SIGKILL to giving up
JOBS_GONE_TIMEOUT_S = 15.0
MAX_UNIX_SOCKET_PATH = 107  # sockaddr_un.sun_path minus the terminating NUL
MAX_JOB_ID, BATCH_STEP_ID = 67_043_328, 4_294_967_291  # Slurm's defaults
DEFAULT_DIR = ".devcluster"


class DevClusterError(Exception):
    """A dev cluster could not be started or stopped; the message is one line naming the daemon,
    binary or directory at fault and, for a daemon, its log file and last log line."""


def _binary(name: str) -> str:
    """Absolute path of a daemon or client binary (sbin is often missing from PATH)."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
    if path is None:
        raise DevClusterError(f"{name} not found; install Slurm, munge and MariaDB with: {INSTALL_HINT}")
    return path


def _free_ports(count: int) -> list[int]:
    """Distinct ports that are free on every address right now."""
    sockets = []
    try:
        for _ in range(count):  # all held open at once, so that none repeats
            s = socket.socket()
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _write_private(path: Path, data: bytes) -> None:
    """Replaces ``path`` with a file that only its owner may read, from its creation on."""
    new = path.with_name(f".{path.name}.new")
    new.unlink(missing_ok=True)  # a killed start's
    with open(os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
    new.replace(path)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _as_localhost(unshare: str, argv: list[str]) -> list[str]:
    """``argv`` with "localhost" for host name, in a UTS namespace of its own (one process: exec
    follows exec). With CommunicationParameters=NoCtldInAddrAny (slurmctld) or NoInAddrAny
    (slurmdbd) Slurm 22.05 binds to the address of its host name, not to a configured one, and
    to every address without them. Needs CAP_SYS_ADMIN, which a container may withhold from root."""
    set_name = "import os, socket, sys; socket.sethostname('localhost'); os.execv(sys.argv[1], sys.argv[1:])"
    return [unshare, "--uts", "--", sys.executable, "-I", "-c", set_name, *argv]


def _kind(daemon: str) -> str:
    """The binary a daemon runs: "slurmd-127.0.0.11" -> "slurmd"."""
    return daemon.split("-", 1)[0]


class DevCluster:
    """A Slurm cluster of ``nodes`` nodes on loopback with all its files under ``root``; see the
    module docstring. ``start()`` returns once every node is idle and accounting answers."""

    def __init__(self, root: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 2,
                 memory_mb_per_node: int = 4000):
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be between 1 and 200, not {nodes}")
        if cpus_per_node < 1 or memory_mb_per_node < 1:
            raise ValueError("cpus_per_node and memory_mb_per_node must be positive")
        self.root = Path(root).resolve()
        self.cpus_per_node, self.memory_mb_per_node = cpus_per_node, memory_mb_per_node
        self.node_names = [f"127.0.0.{11 + i}" for i in range(nodes)]
        self.partition = PARTITION
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._run, self._log, self._pids = self.root / "run", self.root / "log", self.root / "pids"
        self._popen: dict[str, subprocess.Popen] = {}  # the daemons this object started

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts every daemon; on failure stops what it started and raises DevClusterError."""
        if os.geteuid() != 0:
            raise DevClusterError("the dev cluster's daemons run as root (slurmd starts every job as its user); "
                                  "start it as root")
        running = self.running()
        if running:
            name, pid = running[0]
            raise DevClusterError(f"a dev cluster already runs in {self.root} ({name} pid {pid}); stop it first")
        binaries = {name: _binary(name) for name in ("munged", "mariadb-install-db", "mariadbd", "slurmdbd",
                                                     "slurmctld", "slurmd", "sinfo", "sacctmgr", "unshare")}
        self._prepare_root()
        try:
            self._start(binaries)
        except BaseException:
            self.stop()
            raise

    def _prepare_root(self) -> None:
        # the longest unix socket under root: slurmstepd's, <spool>/<node>_<job id>.<batch step id>
        node = self.node_names[-1]
        stepd = self.root / "spool" / node / f"{node}_{'9' * len(str(MAX_JOB_ID))}.{BATCH_STEP_ID}"
        if len(str(stepd)) > MAX_UNIX_SOCKET_PATH:
            raise DevClusterError(f"{self.root} is too long a path for the unix sockets under it (at most "
                                  f"{MAX_UNIX_SOCKET_PATH - len(str(stepd)) + len(str(self.root))} characters); "
                                  f"pick a shorter directory")
        if self.root.exists() and not self._holds_devcluster() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise DevClusterError(f"{self.root} exists and holds no dev cluster; pick a new or empty directory")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = self.root.stat().st_uid
        if owner != os.geteuid():
            raise DevClusterError(f"{self.root} is owned by uid {owner}, not by this cluster's user "
                                  f"(uid {os.geteuid()}); pick a directory of your own")
        # Only the cluster's user may enter any of it: it holds the sockets (munged's, MariaDB's,
        # slurmstepd's) and the munge key. chmod: clusters made by older versions had 0755 ones.
        for d in (self.root, self._run, self._log, self._pids, self.root / "state", self.root / "munge",
                  self.root / "db", self.root / "db-files", self.root / "spool"):
            d.mkdir(mode=0o700, exist_ok=True)
            d.chmod(0o700)
        for node in self.node_names:  # slurmd logs an error when it has to make its own (it makes them 0755)
            (self.root / "spool" / node).mkdir(exist_ok=True)
        for path in self._pids.glob("*.pid"):  # stale: nothing of this cluster runs
            path.unlink()
        for sock in ("munge.socket", "mysqld.sock"):  # a killed daemon's: they signal readiness
            (self._run / sock).unlink(missing_ok=True)

    def _holds_devcluster(self) -> bool:
        try:
            with self.conf.open() as f:
                return f.readline() == CONF_HEADER
        except OSError:
            return False

    def _start(self, binaries: dict[str, str]) -> None:
        ctld_port, dbd_port, *node_ports = _free_ports(2 + len(self.node_names))
        munge_dir, munge_socket, db_socket = self.root / "munge", self._run / "munge.socket", self._run / "mysqld.sock"
        key = munge_dir / "munge.key"
        if not key.exists():
            _write_private(key, secrets.token_bytes(1024))
        self._write_configs(ctld_port, dbd_port, node_ports, munge_socket)

        # --force: munged refuses a socket in a directory that not every user may enter ("Socket is
        # inaccessible"), as it means to serve them all; this one serves root alone. No other check
        # of munged's fails here (that is its only warning; a test checks), so no other is relaxed.
        self._spawn("munged", [binaries["munged"], "--foreground", "--force", f"--key-file={key}",
                               f"--socket={munge_socket}", f"--pid-file={self._run / 'munged.pid'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"])
        self._wait("munged", munge_socket.exists)

        datadir = self.root / "db"
        # slurmdbd logs an error below these values; the buffer pool is only reserved, not used
        mariadb_args = ["--no-defaults", "--user=root", f"--datadir={datadir}", "--skip-name-resolve",
                        "--skip-log-bin", "--innodb-buffer-pool-size=1G", "--innodb-lock-wait-timeout=900"]
        if not (datadir / "mysql").is_dir():  # root@localhost: unix_socket authentication, the Unix root only
            self._run_once("mariadb-install-db", [binaries["mariadb-install-db"], *mariadb_args, "--skip-test-db"])
        # No TCP: slurmdbd comes through the socket. The server runs as root: LOAD_FILE and
        # INTO OUTFILE may use only an empty directory.
        self._spawn("mariadbd", [binaries["mariadbd"], *mariadb_args, "--skip-networking",
                                 f"--secure-file-priv={self.root / 'db-files'}", f"--socket={db_socket}",
                                 f"--pid-file={self._run / 'mariadbd.pid'}"])
        self._wait("mariadbd", db_socket.exists)

        # libmariadb takes the socket for StorageHost=localhost from MYSQL_UNIX_PORT; slurmdbd.conf
        # has no setting for it
        self._spawn("slurmdbd", _as_localhost(binaries["unshare"], [binaries["slurmdbd"], "-D"]),
                    env={"MYSQL_UNIX_PORT": str(db_socket)})
        self._wait("slurmdbd", lambda: _port_open(dbd_port))
        self._spawn("slurmctld", _as_localhost(binaries["unshare"],
                                               [binaries["slurmctld"], "-D", "-f", str(self.conf)]))
        for node in self.node_names:
            self._spawn(f"slurmd-{node}", [binaries["slurmd"], "-D", "-f", str(self.conf), "-N", node])
        self._wait("slurmctld", lambda: self._nodes_idle(binaries["sinfo"]))
        self._wait("slurmdbd", lambda: self._cluster_registered(binaries["sacctmgr"]))

    def _write_configs(self, ctld_port: int, dbd_port: int, node_ports: list[int], munge_socket: Path) -> None:
        auth = f"AuthInfo=socket={munge_socket},cred_expire=5"
        (self.root / "plugstack.conf").write_text("")
        nodes = "".join(
            f"NodeName={node} NodeAddr={node} Port={port} CPUs={self.cpus_per_node} Sockets=1 "
            f"CoresPerSocket={self.cpus_per_node} ThreadsPerCore=1 RealMemory={self.memory_mb_per_node}\n"
            for node, port in zip(self.node_names, node_ports, strict=True))
        # AccountingStoragePass names the munge socket that slurmctld and the clients use to talk
        # to slurmdbd; without it they try the system's socket. A random FirstJobId keeps job ids
        # apart between clusters: submitit caches job states process-wide by job id alone.
        # MailProg: there is no mail here (Slurm logs an error at start without one).
        # NoCtldInAddrAny: slurmctld listens on 127.0.0.1 (see _as_localhost). slurmd stays on every
        # address: NoInAddrAny binds it to its host name's address, not to its NodeAddr, and a host
        # name of its own (as slurmctld's) reaches its jobs, whose srun then binds there too and
        # hangs, as its tasks call back to 127.0.0.1, the address srun came from.
        self.conf.write_text(CONF_HEADER + f"""\
ClusterName={CLUSTER_NAME}
CommunicationParameters=NoCtldInAddrAny
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
{auth}
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool' / '%n'}
SlurmctldPidFile={self._run / 'slurmctld.pid'}
SlurmdPidFile={self._run / 'slurmd-%n.pid'}
PlugStackConfig={self.root / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
# each task bound to the CPUs Slurm gives it, as on a real cluster (the tests check what a rank sees)
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
FirstJobId={secrets.randbelow(9_000_000) + 1_000_000}
MailProg=/bin/true
JobRequeue=1
SchedulerParameters=bf_interval=1,sched_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
AccountingStoragePass={munge_socket}
{nodes}PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # slurmdbd refuses a config that others can read. NoInAddrAny: slurmdbd listens on
        # 127.0.0.1 (see _as_localhost); it reads no slurm.conf.
        _write_private(self.root / "slurmdbd.conf", (CONF_HEADER + f"""\
DbdHost=localhost
DbdPort={dbd_port}
CommunicationParameters=NoInAddrAny
SlurmUser=root
{auth}
PidFile={self._run / 'slurmdbd.pid'}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
""").encode())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self._log / f"{name}.log"
        # SLURM_CONF also tells slurmdbd where slurmdbd.conf is, and marks every daemon as this
        # cluster's (see _owned); a new session keeps a terminal's Ctrl-C away from the daemons
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.root,
                                    env={**os.environ, **self.env, **(env or {})}, start_new_session=True)
        self._popen[name] = proc
        (self._pids / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _run_once(self, name: str, argv: list[str]) -> None:
        log = self._log / f"{name}.log"
        with open(log, "ab") as out:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.root,
                                    timeout=START_TIMEOUT_S)
        if result.returncode:
            raise DevClusterError(f"{name} failed (exit status {result.returncode}); see {log}: {_last_line(log)}")

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        """Polls ``ready()``; raises if any daemon started so far exits meanwhile, or on timeout."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for started, proc in self._popen.items():
                if proc.poll() is not None:
                    log = self._log / f"{started}.log"
                    raise DevClusterError(f"{started} exited at start (status {proc.returncode}); "
                                          f"see {log}: {_last_line(log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                log = self._log / f"{name}.log"
                raise DevClusterError(f"{name} not ready after {START_TIMEOUT_S:.0f} s; see {log}: {_last_line(log)}")
            time.sleep(0.05)

    def _client(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=30)

    def _nodes_idle(self, sinfo: str) -> bool:
        out = self._client(sinfo, "-h", "-N", "-o", "%N %T")
        states = dict(line.split() for line in out.stdout.splitlines()) if out.returncode == 0 else {}
        return all(states.get(node) == "idle" for node in self.node_names)

    def _cluster_registered(self, sacctmgr: str) -> bool:
        # slurmctld registers the cluster and its port with slurmdbd by itself
        out = self._client(sacctmgr, "-n", "-P", "show", "cluster", "format=Cluster,ControlPort")
        rows = [line.split("|") for line in out.stdout.splitlines()] if out.returncode == 0 else []
        return any(row[0] == CLUSTER_NAME and row[1] not in ("", "0") for row in rows)

    # --- status and stop ---------------------------------------------------------------------

    def running(self) -> list[tuple[str, int]]:
        """(daemon, pid) of this cluster's daemons that run now, in start order."""
        return [(name, pid) for name, pid in self._pid_files() if self._owned(name, pid)]

    def stop(self) -> None:
        """Ends the cluster's jobs, then stops its daemons in reverse start order. Idempotent."""
        running = self.running()
        if any(name == "slurmctld" for name, _ in running):
            self._end_jobs()
        for name, pid in reversed(running):
            self._terminate(name, pid)
        for path in self._pids.glob("*.pid"):
            path.unlink()
        self._popen.clear()

    def _pid_files(self) -> list[tuple[str, int]]:
        found = []
        for path in self._pids.glob("*.pid"):
            try:
                found.append((path.stem, int(path.read_text())))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda item: (DAEMON_ORDER.index(_kind(item[0])), item[0]))

    def _owned(self, name: str, pid: int) -> bool:
        """Whether ``pid`` still is this cluster's daemon ``name`` (a zombie is not)."""
        proc = self._popen.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, UnicodeDecodeError):
            return False
        return state != "Z" and os.path.basename(argv0) == _kind(name) and f"SLURM_CONF={self.conf}".encode() in environ

    def _end_jobs(self) -> None:
        """Kills the processes of running jobs and cancels every job, pending ones too."""
        squeue, scancel = _binary("squeue"), _binary("scancel")
        jobs = self._client(squeue, "-h", "-o", "%A").stdout.split()
        if not jobs:
            return
        self._client(scancel, "--full", "--signal=KILL", *jobs)  # no wait for KillWait after SIGTERM
        self._client(scancel, *jobs)
        deadline = time.monotonic() + JOBS_GONE_TIMEOUT_S
        while time.monotonic() < deadline:
            out = self._client(squeue, "-h", "-o", "%A")
            if out.returncode or not out.stdout.split():
                return
            time.sleep(0.1)

    def _terminate(self, name: str, pid: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self._owned(name, pid):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            else:
                return
        raise DevClusterError(f"{name} (pid {pid}) survived SIGKILL for {STOP_TIMEOUT_S:.0f} s; "
                              f"see {self._log / name}.log")


# --- command line ------------------------------------------------------------------------------


def _sinfo(cluster: DevCluster) -> str:
    return cluster._client(_binary("sinfo")).stdout.rstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="devcluster", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a cluster whose daemons keep running in the background")
    start.add_argument("--nodes", type=int, default=2)
    start.add_argument("--cpus-per-node", type=int, default=2)
    commands.add_parser("status", help="show which daemons of the cluster in DIR run")
    commands.add_parser("stop", help="stop the cluster in DIR")
    for command in commands.choices.values():
        command.add_argument("--dir", default=DEFAULT_DIR, help=f"the cluster's files (default: ./{DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = DevCluster(args.dir, nodes=args.nodes, cpus_per_node=args.cpus_per_node)
            t0 = time.monotonic()
            cluster.start()
            print(f"dev cluster up in {time.monotonic() - t0:.1f} s, logs in {cluster.root / 'log'}; "
                  f"point Slurm clients at it with:")
            print(f"export SLURM_CONF={cluster.conf}")
            print(_sinfo(cluster))
            return
        cluster = DevCluster(args.dir)
        running = cluster.running()
        if not running:
            print(f"no dev cluster runs in {cluster.root}")
        elif args.command == "status":
            for name, pid in running:
                print(f"{name:<20} pid {pid}")
            if any(name == "slurmctld" for name, _ in running):
                print(f"export SLURM_CONF={cluster.conf}")
                print(_sinfo(cluster))
        else:
            t0 = time.monotonic()
            cluster.stop()
            print(f"stopped {len(running)} daemons in {cluster.root} ({time.monotonic() - t0:.1f} s)")
    except (DevClusterError, ValueError) as e:
        sys.exit(f"devcluster: error: {e}")
