"""fatscale's GPU checks, one after another on a CUDA node with fatscale installed.

    python -m benchmarks.gpu --out DIR [--checks env,train,...] [--budget-s S] [--models fat_b0 fat_b3]
        [--images JPEG_DIR] [--redo] [--device cuda|cpu] [--tiny]

Each check (benchmarks/gpu/check_<name>.py; the list and each one's time limit: benchmarks/gpu/plan.py)
runs in its own process, in the plan's order, and is stopped at its limit. Its results go to
DIR/results.jsonl as they are produced, its output to DIR/logs/<name>.log and to this console;
DIR/summary.txt is rewritten after each check and on every exit: the end, an error, Ctrl-C,
SIGTERM, SIGHUP. A check that ran to its end is not run again with the same DIR (--redo runs
it again); one stopped at its limit or by a signal is: run the same command again to go on.
No check starts whose limit exceeds what is left of --budget-s; the summary names what is left
and the command that runs it. If fatscale's requirements are not met (the env check), no other
check runs. --device cpu --tiny: every check at tiny sizes on the CPU, the dry run of the tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.gpu import plan, summary
from benchmarks.gpu import results as R
from benchmarks.gpu.common import DEFAULT_MODELS, MODELS, REPO

STOP_GRACE_S = 5  # after SIGTERM, before SIGKILL
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_names(text: str) -> list[str]:
    known = [step.name for step in plan.CHECKS]
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in known:
            raise argparse.ArgumentTypeError(f"unknown check {name!r} (checks: {', '.join(known)})")
    return [name for name in known if name in names]  # the plan's order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where results, logs and the summary go")
    parser.add_argument("--checks", type=check_names, default=[s.name for s in plan.CHECKS],
                        help="comma-separated, from: " + ", ".join(s.name for s in plan.CHECKS) + " (default: all)")
    parser.add_argument("--budget-s", type=float, default=plan.INVOCATION_LIMIT_S - plan.INVOCATION_OVERHEAD_S,
                        help="seconds this command may take: a check starts only if its limit fits in what is left "
                             f"(default {plan.INVOCATION_LIMIT_S - plan.INVOCATION_OVERHEAD_S})")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--images", type=Path, help="a folder of JPEGs for dali and datawait (default: synthetic ones)")
    parser.add_argument("--redo", action="store_true", help="run the checks done in an earlier run again")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (with --device cpu: the dry run)")
    args = parser.parse_args(argv)
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images {args.images}: no such folder")
    return args


def command_for(args: argparse.Namespace, checks: list[str]) -> str:
    """The command that runs ``checks`` with this run's options."""
    words = ["python -m benchmarks.gpu", f"--out {args.out}", f"--checks {','.join(checks)}"]
    if args.models != list(DEFAULT_MODELS):
        words.append(f"--models {' '.join(args.models)}")
    if args.images is not None:
        words.append(f"--images {args.images}")
    if args.device != "cuda":
        words.append(f"--device {args.device}")
    if args.tiny:
        words.append("--tiny")
    return " ".join(words)


def child_env(tiny: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if tiny:  # one thread: OpenMP's spinning threads make small CPU steps erratic on a shared machine
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.limits = plan.limits()
        self.states: dict[str, str] = {}
        self.child: subprocess.Popen | None = None

    def run_check(self, name: str, limit: float) -> str:
        """Run one check to its end (done: exit 0; failed: another) or its limit (cut); returns its state line."""
        a = self.args
        command = [sys.executable, "-m", f"benchmarks.gpu.check_{name}", "--out", str(self.out), "--device", a.device,
                   "--models", *a.models, "--limit-s", str(limit)] + (["--tiny"] if a.tiny else [])
        if a.images is not None:
            command += ["--images", str(a.images)]
        R.append(self.out / R.RUNS, dict(check=name, event="start", limit_s=limit, time=time.time()))
        print(f"suite: == {name} (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        with open(self.out / "logs" / f"{name}.log", "a") as log:  # an earlier run's lines stay above
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
            self.child = subprocess.Popen(command, cwd=REPO, env=child_env(a.tiny), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
            copier = threading.Thread(target=copy_lines, args=(self.child.stdout, log), daemon=True)
            copier.start()
            try:
                code = self.child.wait(timeout=limit)
                outcome = "done" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                self.stop_child()
                code, outcome = None, "cut"
                R.Results(self.out, name)(f"{name}_cut", False, f"stopped at its limit, {limit:.0f} s; its results "
                                          f"so far are kept (log: logs/{name}.log)")
            copier.join(timeout=5)
            self.child = None
        seconds = time.monotonic() - start
        R.append(self.out / R.RUNS, dict(check=name, event="end", outcome=outcome, exit=code, seconds=seconds,
                                         limit_s=limit, time=time.time()))
        print(f"suite: == {name}: {outcome} in {seconds:.0f} s", flush=True)
        return f"{outcome} in {seconds:.0f} s (limit {limit:.0f} s)"

    def stop_child(self) -> None:
        """SIGTERM to the check's process group (its own children too), SIGKILL if it lingers."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def requirements_unmet(self) -> bool:
        record = R.latest(self.out).get("requirements")
        return record is not None and record["status"] == "FAIL"

    def run(self) -> int:
        args, start = self.args, time.monotonic()
        finished = {} if args.redo else R.finished_checks(self.out)
        failed = False
        for name in args.checks:
            limit = self.limits[name]
            if name in finished:
                self.states[name] = f"done in an earlier run ({finished[name]['outcome']}): skipped; --redo runs it again"
            elif name != "env" and self.requirements_unmet():
                self.states[name] = "not run: fatscale's requirements are not met (see the env check's results)"
            elif time.monotonic() - start + limit > args.budget_s:
                self.states[name] = f"left: its limit, {limit} s, exceeds what is left of --budget-s {args.budget_s:g}"
            else:
                self.states[name] = "running"
                self.summarize()  # what runs, should this command be killed outright
                self.states[name] = self.run_check(name, limit)
                failed |= not self.states[name].startswith("done")
            self.summarize()
        return 1 if failed or self.left() else 0

    def left(self) -> list[str]:
        return [name for name, state in self.states.items() if not state.startswith(("done", "failed"))]

    def summarize(self) -> str:
        left = self.left()
        note = f"left: {', '.join(left)}; to run them: {command_for(self.args, left)}" if left else None
        return summary.write(self.out, self.states, note)


def copy_lines(stream, log) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    runner = Runner(args)

    def stop(signum, _frame):
        raise Stopped(signum)

    handlers = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    status = 1
    try:
        status = runner.run()
    except Stopped as e:
        print(f"suite: {e}: stopping", flush=True)
        status = 128 + e.signum
    finally:
        for sig in SIGNALS:  # a second signal must not cut the summary short
            signal.signal(sig, signal.SIG_IGN)
        runner.stop_child()
        for name in args.checks:
            if runner.states.get(name) == "running":
                R.append(args.out / R.RUNS, dict(check=name, event="end", outcome="stopped", time=time.time()))
                runner.states[name] = "stopped by a signal: not done, runs again with the same command"
            runner.states.setdefault(name, "not started")
        print(runner.summarize(), end="", flush=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return status

