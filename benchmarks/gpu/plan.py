"""The timing plan of the GPU checks: each step's time limit, and how the steps fit a short slot
on one H100 or H200 (80 GB or more).

A slot: the GPU node starts (MACHINE_START_S: a scheduler's allocation, or a cloud machine's boot),
the offline bundle is installed (INSTALL), the checks run, and there is room left to run the last
step once more (after a fix, say), all within BUDGET_S. The steps can also be run as several
commands (INVOCATIONS) of at most INVOCATION_LIMIT_S each, a job step's or a session's limit per
command: each command's limits sum below its own, with INVOCATION_OVERHEAD_S left for the suite's
start and summary. The suite stops each check at its limit (benchmarks/gpu/suite.py reads them
from here) and starts no check whose limit exceeds what is left of its --budget-s;
tests/test_gpu_checks.py asserts that the plan fits and that the suite uses these limits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    what: str


BUDGET_S = 12 * 60
MACHINE_START_S = 120
INVOCATION_LIMIT_S = 540
INVOCATION_OVERHEAD_S = 20

INSTALL = Step("install", 40, "bash install/install_bundle.sh BUNDLE: check the parts, unpack ~190 MiB of xz, verify")
# In the order they run: by the value of what they measure (env first: it is quick and tells what
# the others ran on).
CHECKS = (
    Step("env", 15, "card, driver, versions; fatscale's requirements met"),
    Step("train", 250, "the trainer's step on FAT-B0 and B3: eager vs compiled images/s, memory, host syncs, "
                       "compile seconds, the two GroupNorms"),
    Step("dali", 60, "DALI mixed decode: labels, restore across a size change, memory, a corrupt JPEG, images/s"),
    Step("datawait", 75, "the data-wait share of a compiled FAT-B0 run through launch/local.py"),
    Step("speed", 30, "benchmarks/model_speed.py: release attention vs fatscale's, train and inference"),
    Step("resolution", 30, "benchmarks/resolution_speed.py: images/s at 160/192/224 px, the fast recipes' GPU-hours"),
    Step("determinism", 30, "train.deterministic: three steps twice, bitwise equal or not"),
    Step("syncbn", 30, "SyncBatchNorm's cost: two ranks sharing the GPU over gloo, plain vs converted"),
)
INVOCATIONS = (("install", "env", "train", "dali"), ("datawait", "speed", "resolution", "determinism", "syncbn"))


def limits() -> dict[str, int]:
    """Each step's limit in seconds, the install's included."""
    return {step.name: step.limit_s for step in (INSTALL, *CHECKS)}


def total_s() -> int:
    """The slot: the start, every step, and the last step once more."""
    return MACHINE_START_S + sum(limits().values()) + CHECKS[-1].limit_s


def table() -> str:
    """The plan as a Markdown table (benchmarks/gpu/README.md holds a copy)."""
    rows = [f"| step | limit (s) | command (each at most {INVOCATION_LIMIT_S} s) | what |", "|---|---|---|---|",
            f"| machine start | {MACHINE_START_S} | | the node's allocation or boot (estimate) |"]
    command = {name: i + 1 for i, names in enumerate(INVOCATIONS) for name in names}
    for step in (INSTALL, *CHECKS):
        rows.append(f"| {step.name} | {step.limit_s} | {command[step.name]} | {step.what} |")
    rows.append(f"| rerun of {CHECKS[-1].name} | {CHECKS[-1].limit_s} | | room to run the last step again |")
    rows.append(f"| **total** | **{total_s()}** | | budget {BUDGET_S} s (12 minutes) |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
