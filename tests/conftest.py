"""Shared fixtures: real servers the tests start and stop by PID."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_world():
    """This process as the one rank of a gloo world (the launcher's variables set), for DeepSpeed
    engines built in the test process; at the end the process group goes with DeepSpeed's
    references to it (other test modules build engines too) and the variables are restored."""
    env = dict(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        import deepspeed

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    """A real `mlflow server` on a fixed port and store, so a restart serves the same runs."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.process is not None:
            return
        log_file = self.root / "server.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log_file.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not come up on port {self.port}; see {log_file}")
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)  # the server and its workers
            self.process.wait(15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
        deadline = time.monotonic() + 15  # a worker may hold the port a moment longer
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Shards of the built-in textures set (fatscale/tryout/demo_data.py): 480 train, 160 val samples, 8 classes."""
    from fatscale.prep import make_shards
    from fatscale.tryout.demo_data import make_demo_images

    root = tmp_path_factory.mktemp("demo")
    make_demo_images(root / "images", per_class=60, val_per_class=20, size=56)
    make_shards(root / "images", root / "shards", samples_per_shard=120, progress=False, log=lambda *a: None)
    return root / "shards"


def demo_recipe(tmp_path: Path, shards: Path, **sections) -> Path:
    """recipes/demo_cpu.yaml made smaller (48 px, 16 per rank: 15 steps per epoch on 2 ranks),
    writing into tmp_path/out, with ``sections`` merged in."""
    base = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
    base["output_dir"] = str(tmp_path / "out")
    base["data"].update(shards=str(shards), img_size=48)
    base["train"].update(batch_per_device=16, val_batch_per_device=40, log_every=5)
    base["tracking"]["system_metrics"] = False
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def corrupt_copy(shards: Path, dest: Path, split: str, label: int, how: str = "truncate") -> str:
    """Copy ``shards`` to ``dest`` and damage, inside its tar, the JPEG of the ``split`` sample of
    class ``label``; returns its key. ``truncate``: the tail becomes zeros (libjpeg may still
    decode a textured image so damaged, as garbage: use ``junk`` where a decoder must fail).
    ``junk``: its JFIF segment is declared 3 bytes short, leaving 3 stray bytes before the next
    marker: PIL decodes it, DALI's decoder does not."""
    shutil.copytree(shards, dest)
    for index in sorted(dest.glob(f"{split}-*.idx")):
        tar = index.with_suffix(".tar")
        with open(tar, "r+b") as f:
            for line in index.read_text().splitlines()[1:]:
                fields = line.split()
                parts = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)}
                offset, size, _ = parts["cls"]
                f.seek(offset)
                if int(f.read(size)) == label:
                    offset, size, name = parts["jpg"]
                    if how == "truncate":
                        f.seek(offset + size // 3)
                        f.write(b"\0" * (size - size // 3))
                    else:
                        f.seek(offset + 2)
                        assert f.read(4) == b"\xff\xe0\x00\x10"  # APP0 (JFIF), 16 bytes
                        f.seek(offset + 4)
                        f.write((13).to_bytes(2, "big"))
                    return name.split(".", 1)[0]
    raise AssertionError(f"no {split} sample of class {label}")


def hold_run_lock(output_dir: Path) -> subprocess.Popen:
    """Another live process holding ``output_dir``'s run lock, until the caller kills it."""
    code = "import sys, time; from fatscale.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(output_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def wait_for_first_metrics(client, experiment: str, running, timeout: float = 300) -> str:
    """The id of the run whose first train/loss reached MLflow (``running()``: the job still runs)."""
    deadline = time.monotonic() + timeout
    while True:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            return runs[0].info.run_id
        assert time.monotonic() < deadline and running(), "no metrics reached the server"
        time.sleep(0.2)
