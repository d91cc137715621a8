"""The GPU checks (benchmarks/gpu/) on a CPU: the timing plan fits its slot and is the suite's, every
check dry-runs at tiny sizes, results are written as they are produced and survive a stop, a rerun
goes on where a run stopped, and the budget and the requirements stop new checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks.gpu import plan, suite  # noqa: E402
from benchmarks.gpu import results as R  # noqa: E402

DRY = ["--device", "cpu", "--tiny", "--models", "fat_b0"]
# The results each check must give in the dry run (SKIP where a GPU is needed).
EXPECTED = {
    "env": {"env": "PASS", "requirements": "PASS"},
    "train": {"train_fat_b0_eager": "PASS", "train_fat_b0_compiled": "PASS", "compile_fat_b0": "PASS",
              "norm_fat_b0": "PASS", "syncs_throughput_timer": "SKIP"},
    "dali": {"dali_labels": "PASS", "dali_restore": "PASS", "dali_rebuild": "PASS", "dali_memory": "SKIP",
             "dali_quarantine": "PASS", "dali_loader_speed": "PASS"},
    "datawait": {"data_wait": "PASS"},
    "speed": {"speed_fat_b0_train": "PASS", "speed_fat_b0_infer": "PASS"},
    "resolution": {"resolution_fat_b0": "PASS"},
    "determinism": {"determinism": "PASS"},
    "syncbn": {"syncbn": "SKIP"},
}


def start_suite(out: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--out", str(out), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def processes_naming(text: str) -> list[int]:
    """The live processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------- the plan


def test_the_plan_fits_the_slot_and_each_command():
    limits = plan.limits()
    names = [name for command in plan.INVOCATIONS for name in command]
    assert sorted(names) == sorted(limits) and len(names) == len(set(names))  # every step, once
    assert names == ["install"] + [step.name for step in plan.CHECKS]  # commands in the plan's order
    assert plan.total_s() == plan.MACHINE_START_S + sum(limits.values()) + plan.CHECKS[-1].limit_s
    assert plan.total_s() <= plan.BUDGET_S == 720
    for command in plan.INVOCATIONS:
        assert sum(limits[name] for name in command) + plan.INVOCATION_OVERHEAD_S <= plan.INVOCATION_LIMIT_S <= 540
    # one command's default budget holds every check
    assert sum(step.limit_s for step in plan.CHECKS) <= plan.INVOCATION_LIMIT_S - plan.INVOCATION_OVERHEAD_S
    assert [step.name for step in plan.CHECKS][:6] == ["env", "train", "dali", "datawait", "speed", "resolution"]


def test_the_readme_holds_the_plan_s_table():
    assert plan.table() in (REPO / "benchmarks" / "gpu" / "README.md").read_text()


def test_every_check_has_a_module_and_the_suite_refuses_an_unknown_one():
    for step in plan.CHECKS:
        assert (REPO / "benchmarks" / "gpu" / f"check_{step.name}.py").is_file(), step.name
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", "x", "--checks", "env,bogus"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown check 'bogus' (checks: env, train," in done.stderr


# ---------------------------------------------------------------- the dry run


@pytest.mark.slow  # ~2 minutes on 2 cores: every check at tiny sizes
def test_every_check_dry_runs_on_cpu_within_its_planned_limit(tmp_path):
    out = tmp_path / "out"
    done = start_suite(out, *DRY)
    output = done.communicate(timeout=600)[0]
    assert done.returncode == 0, output[-6000:]
    latest = R.latest(out)
    for check, expected in EXPECTED.items():
        got = {name: latest[name]["status"] for name in expected if name in latest}
        assert got == expected, (check, got, [r["figure"] for r in latest.values() if r["check"] == check])
        assert all(r["check"] == check for name, r in latest.items() if name in expected)
    runs = R.read(out / R.RUNS)
    assert {r["check"]: r["limit_s"] for r in runs if r["event"] == "start"} == {s.name: s.limit_s for s in plan.CHECKS}
    ends = {r["check"]: r for r in runs if r["event"] == "end"}
    assert all(ends[s.name]["outcome"] == "done" and ends[s.name]["seconds"] < s.limit_s for s in plan.CHECKS)
    summary = (out / "summary.txt").read_text()
    assert "0 failed" in summary and "left:" not in summary
    assert all((out / "logs" / f"{s.name}.log").stat().st_size > 0 for s in plan.CHECKS)
    assert "300 epochs of ImageNet-1K" not in summary  # tiny figures project nothing


# ---------------------------------------------------------------- stops, reruns, budget


def test_a_stopped_run_keeps_what_it_measured_and_a_rerun_goes_on(tmp_path):
    """SIGTERM while dali runs (after its first result): env's and dali's results so far stay, the
    summary is written, dali's processes are gone; the same command again skips env and, with a
    budget too small for dali, says what is left and how to run it."""
    out = tmp_path / "out"
    running = start_suite(out, *DRY, "--checks", "env,dali")
    wait_for(lambda: any(r["check"] == "dali" for r in R.read(out / R.RESULTS)), 180, "dali's first result")
    running.send_signal(signal.SIGTERM)
    output = running.communicate(timeout=60)[0]
    assert running.returncode == 128 + signal.SIGTERM, output[-3000:]
    latest = R.latest(out)
    assert latest["env"]["status"] == "PASS" and latest["dali_labels"]["status"] == "PASS"
    summary = (out / "summary.txt").read_text()
    assert "dali         stopped by a signal" in summary and "PASS  dali_labels" in summary
    assert "left: dali; to run them: python -m benchmarks.gpu --out" in summary
    assert processes_naming(f"benchmarks.gpu.check_dali --out {out}") == []
    assert list(R.finished_checks(out)) == ["env"]

    again = start_suite(out, *DRY, "--checks", "env,dali", "--budget-s", "20")
    output = again.communicate(timeout=60)[0]
    assert again.returncode == 1, output[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "env          done in an earlier run (done): skipped" in summary
    assert "dali         left: its limit, 60 s, exceeds what is left of --budget-s 20" in summary
    assert f"to run them: python -m benchmarks.gpu --out {out} --checks dali --models fat_b0 --device cpu --tiny" in summary
    assert [r["check"] for r in R.read(out / R.RUNS) if r["event"] == "start"] == ["env", "dali"]  # nothing new ran


def test_a_check_past_its_limit_is_cut_and_runs_again(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(plan, "limits", lambda: {"train": 2})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)
    for _ in range(2):
        assert suite.main(["--out", str(out), "--checks", "train", *DRY]) == 1
    ends = [r for r in R.read(out / R.RUNS) if r["event"] == "end"]
    assert [(r["outcome"], r["limit_s"]) for r in ends] == [("cut", 2), ("cut", 2)]
    assert R.latest(out)["train_cut"]["status"] == "FAIL"
    assert "train        cut in" in (out / "summary.txt").read_text()
    assert processes_naming(f"benchmarks.gpu.check_train --out {out}") == []


def test_unmet_requirements_stop_the_checks_after_env(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    R.Results(out, "env")("requirements", False, "fatscale: timm>=1.0.20,<1.1: timm 0.9.16 installed")
    R.append(out / R.RUNS, dict(check="env", event="end", outcome="failed"))
    done = start_suite(out, *DRY, "--checks", "env,speed")
    output = done.communicate(timeout=60)[0]
    assert done.returncode == 1, output
    summary = (out / "summary.txt").read_text()
    assert "speed        not run: fatscale's requirements are not met" in summary
    assert json.loads((out / R.RUNS).read_text().splitlines()[-1])["check"] == "env"  # speed never started
