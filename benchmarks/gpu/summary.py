"""OUT/summary.txt: the state of each check, every result, and the figures fatscale's GPU goals are
stated in, from those results: the 300-epoch GPU-hours of each model (goal: FAT-B0 within 16
H100-hours, ~6,700 images/s), the loader's images/s over FAT-B0's training images/s (goal: 2x),
the data-wait share of a FAT-B0 run (goal: under 5%)."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gpu import results as R

IMAGENET_TRAIN = 1_281_167
EPOCHS = 300
IMG_SIZE = 224  # the 300-epoch recipes' train size: other sizes (a dry run's) project nothing
B0_GOAL_HOURS = 16


def training_rate(latest: dict[str, dict], model: str) -> tuple[float, str] | None:
    """(images/s, which step) of the trainer's compiled step at 224 px, else its eager one."""
    for variant in ("compiled", "eager"):
        record = latest.get(f"train_{model}_{variant}")
        if record and record["status"] == "PASS" and record.get("img_size") == IMG_SIZE:
            return record["images_per_s"], variant
    return None


def goals(latest: dict[str, dict]) -> list[str]:
    device = latest.get("env", {}).get("gpu") or "this machine"
    lines = []
    for model in ("fat_b0", "fat_b1", "fat_b2", "fat_b3"):
        if (measured := training_rate(latest, model)) is None:
            continue
        rate, variant = measured
        hours = EPOCHS * IMAGENET_TRAIN / rate / 3600
        goal = f" (goal: {B0_GOAL_HOURS} H100-hours)" if model == "fat_b0" else ""
        lines.append(f"{model}: {EPOCHS} epochs of ImageNet-1K in {hours:.1f} GPU-hours on {device}{goal}, at "
                     f"{rate:.0f} img/s (the trainer's {variant} step; train epochs only, no data wait)")
    wait = latest.get("data_wait")
    if wait and "data_wait_percent" in wait:
        lines.append(f"data wait: {wait['data_wait_percent']:.1f}% of a FAT-B0 run (goal: under 5%)")
    loader = latest.get("dali_loader_speed", {}).get("images_per_s")
    if loader and (b0 := training_rate(latest, "fat_b0")):
        lines.append(f"loader: {loader:.0f} img/s, x{loader / b0[0]:.2f} of FAT-B0's {b0[1]} training images/s "
                     "(goal: 2x)")
    return lines


def write(out: Path, states: dict[str, str], left: str | None) -> str:
    """Write OUT/summary.txt (replacing it whole) and return its text."""
    latest = R.latest(out)
    lines = [f"fatscale GPU checks in {out}, {time.strftime('%Y-%m-%d %H:%M:%S')}", "", "checks:"]
    lines += [f"  {check:12} {state}" for check, state in states.items()]
    lines += ["", "results:"]
    lines += [f"  {r['status']:4}  {r['name']:28} {r['figure']}" for r in latest.values()]
    counts = {s: sum(r["status"] == s for r in latest.values()) for s in R.STATUSES}
    lines.append(f"  {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    if derived := goals(latest):
        lines += ["", "against the goals:"] + [f"  {line}" for line in derived]
    if left:
        lines += ["", left]
    text = "\n".join(lines) + "\n"
    partial = out / ".summary.txt.partial"
    partial.write_text(text)
    partial.replace(out / "summary.txt")
    return text
