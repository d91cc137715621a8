"""What the GPU check scripts share: result lines, the results file, a placeholder for DALI.

Every check prints one line per result, ``GPUCHECK <name> PASS|FAIL|SKIP <figure>``, and appends
it as JSON to $FATSCALE_GPU_RESULTS (default /tmp/fatscale/results.jsonl), where run.sh and
summarize.py read it. Each script takes ``--device cpu`` and small sizes so that the tests run it
here, end to end, in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("FATSCALE_GPU_RESULTS", "/tmp/fatscale/results.jsonl"))


def result(name: str, status: str | bool, figure: str = "", **data) -> bool:
    """Print and record one result; status True/False means PASS/FAIL. Returns whether it passed."""
    if isinstance(status, bool):
        status = "PASS" if status else "FAIL"
    line = f"GPUCHECK {name} {status} {figure}".rstrip()
    print(line, flush=True)
    try:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(dict(name=name, status=status, figure=figure, time=time.time(), **data)) + "\n")
    except OSError as e:  # a read-only place must not hide the printed line
        print(f"common: could not record the result in {RESULTS}: {e}", file=sys.stderr)
    return status != "FAIL"


def read_results(path: Path = RESULTS) -> dict[str, dict]:
    """The latest record of each result name."""
    latest: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            latest[record["name"]] = record
    return latest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_env(device: str) -> None:
    """The environment torchrun would give a world of one (fatscale.train.distributed.init_distributed reads it)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class _Anything:
    """Stands for any DALI object: attributes and calls give itself; as a bare decorator it
    returns the function unchanged. Nothing real runs."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _Anything):
            return args[0]
        return self


ANYTHING = _Anything()


class _Placeholder(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return ANYTHING


def dali_placeholder() -> bool:
    """Before importing fatscale's trainer without DALI (the first device call, before the DALI
    parts arrive): fatscale.config and fatscale.train import fatscale.data.loader, which imports
    DALI at module level. Installs placeholder ``nvidia.dali`` modules when DALI is missing, so that
    the trainer's model, optimizer, DeepSpeed and checkpoint code can run; anything that would build
    a DALI pipeline must not be called. Returns True when the placeholder was installed."""
    try:
        if importlib.util.find_spec("nvidia.dali") is not None:
            return False
    except (ImportError, ValueError):
        pass
    names = ["nvidia", "nvidia.dali", "nvidia.dali.fn", "nvidia.dali.types", "nvidia.dali.math",
             "nvidia.dali.plugin", "nvidia.dali.plugin.pytorch", "nvidia.dali.auto_aug",
             "nvidia.dali.auto_aug.augmentations", "nvidia.dali.auto_aug.core", "nvidia.dali.data_node"]
    try:  # the real nvidia namespace (torch's CUDA libraries live there on the device) stays
        importlib.import_module("nvidia")
    except ImportError:
        sys.modules["nvidia"] = types.ModuleType("nvidia")
        sys.modules["nvidia"].__path__ = []
    for name in names[1:]:
        module = _Placeholder(name)
        module.__path__ = []  # a package, so submodules resolve to the entries above
        module.__dict__["__fatscale_placeholder__"] = True
        sys.modules[name] = module
    for name in names[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    return True


def run_launcher(command: list[str], work: Path, timeout: float, log_name: str, tail: int) -> tuple[object, str, float]:
    """Run a launcher command from ``work`` with this checkout importable: (exit code or "timeout",
    its output, seconds). The output is also kept in ``work/log_name`` and its tail printed."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    (work / log_name).write_text(output)
    print(output[-tail:], flush=True)
    return code, output, seconds
