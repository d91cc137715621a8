"""What the check scripts share: their command line, the result writer, a failure recorded as a
result, and the environment torchrun would give a world of one."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks.gpu.results import Results

REPO = Path(__file__).resolve().parents[2]
MODELS = ("fat_b0", "fat_b1", "fat_b2", "fat_b3")
DEFAULT_MODELS = ("fat_b0", "fat_b3")


def check_main(name: str, doc: str, body: Callable[[argparse.Namespace, Results], None]) -> None:
    """Parse the check's command line and run ``body(args, results)``; an exception becomes a FAIL
    result named ``<check>_error`` (and exit status 1), so that the summary shows it."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.gpu.check_{name}", description=doc.split("\n\n")[0],
                                     epilog="\n\n".join(doc.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results go to OUT/results.jsonl, work files to OUT/work")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the dry run on a CPU")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--images", type=Path, help="a folder of JPEGs (default: synthetic ImageNet-sized ones)")
    parser.add_argument("--limit-s", type=float, default=600, help="the suite's time limit of this check: parts that "
                        "run other programs end before it (default 600)")
    args = parser.parse_args()
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images {args.images}: no such folder")
    args.work = args.out / "work" / name
    args.work.mkdir(parents=True, exist_ok=True)
    results = Results(args.out, name)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            results(f"{name}_error", False, f"--device cuda, but torch {torch.__version__} (built for CUDA "
                    f"{torch.version.cuda}) sees no GPU")
            sys.exit(1)
    with attempt(results, f"{name}_error") as outcome:
        body(args, results)
    sys.exit(0 if outcome.ok else 1)


@contextlib.contextmanager
def attempt(results: Results, name: str):
    """Run a part of a check: an exception becomes a FAIL result ``name`` (its first line; the
    traceback goes to the log) and the check goes on with its next part."""
    outcome = argparse.Namespace(ok=True)
    try:
        yield outcome
    except Exception as e:  # noqa: BLE001  (any failure is a result)
        traceback.print_exc()
        outcome.ok = False
        results(name, False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")


def run_program(command: list[str], log: Path, timeout: float) -> tuple[int | str, str]:
    """Run another program from the checkout's root, its output going to ``log`` as it comes (kept
    if this check is stopped), its last 40 lines printed; stopped after ``timeout`` s. Returns
    (exit code or "timeout", output)."""
    import subprocess

    with open(log, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text()
    print("\n".join(text.splitlines()[-40:]), flush=True)
    return code, text


def run_benchmark(args: argparse.Namespace, results: Results, script: str, options: list[str]) -> str:
    """benchmarks/<script> on the check's device, ending before the check's limit; its output (also
    in the check's work folder) returned; a failed run is a FAIL result ``<check>_run``."""
    log = args.work / f"{Path(script).stem}.log"
    command = [sys.executable, str(REPO / "benchmarks" / script), "--device", args.device, *options]
    code, text = run_program(command, log, timeout=max(args.limit_s - 5, 5))
    if code != 0:
        results(f"{results.check}_run", False, f"benchmarks/{script}: exit {code}; log {log}")
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_env(device: str) -> None:
    """The environment torchrun gives a world of one (fatscale.train.distributed.init_distributed reads it)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30
