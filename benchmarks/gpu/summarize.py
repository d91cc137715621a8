"""Turn the benchmarks' own output into result lines, and all results into one table.

    python summarize.py model-speed LOG     # benchmarks/model_speed.py's output -> results
    python summarize.py loader-speed LOG    # benchmarks/loader_speed.py's output -> results
    python summarize.py report [--out FILE] # every result so far, the loader / FAT-B0 ratio

The ratio: the DALI train loader's images/s (loader_speed.py, --device cuda) over FAT-B0's
torch.compile'd training images/s (model_speed.py, bf16, batch 128, 224 px): above 1, the
loader keeps up with one GPU training FAT-B0 at full speed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_results, result  # noqa: E402

SPEED = re.compile(r"^(fat_b\d) (train|infer)\s+(.+?)\s+([\d.]+) img/s\s+x([\d.]+|nan)(?:\s+peak ([\d.]+) GiB)?", re.M)
VARIANTS = {"release attention, eager (baseline)": "release", "fatscale SDPA, eager": "eager",
            "fatscale SDPA, torch.compile": "compiled"}
LOADER = re.compile(r"^fatscale \(DALI TrainLoader\)\s+([\d.]+) img/s\s+x([\d.]+) \(x([\d.]+) against nearest warps\)", re.M)
BASELINE = re.compile(r"^baseline \(webdataset \+ PIL \+ timm, DataLoader\)\s+([\d.]+) img/s", re.M)


def model_speed(text: str) -> int:
    rows = SPEED.findall(text)
    for name, mode, label, rate, ratio, peak in rows:
        variant = VARIANTS.get(label.strip(), label.strip())
        memory = f", peak {peak} GiB" if peak else ""
        result(f"speed_{name}_{mode}_{variant}", "PASS", f"{float(rate):.0f} img/s, x{ratio} vs release{memory}",
               images_per_s=float(rate), ratio=float(ratio), peak_gib=float(peak) if peak else None)
    if not rows:
        result("model_speed", False, "no figures in model_speed.py's output")
    return len(rows)


def loader_speed(text: str) -> bool:
    match, base = LOADER.search(text), BASELINE.search(text)
    if not match:
        return result("loader_speed", False, "no DALI figure in loader_speed.py's output")
    rate = float(match.group(1))
    return result("loader_speed", "PASS", f"DALI TrainLoader {rate:.0f} img/s, x{match.group(2)} vs webdataset+PIL"
                  + (f" ({float(base.group(1)):.0f} img/s)" if base else "") + f", x{match.group(3)} vs nearest warps",
                  images_per_s=rate)


def report(out: Path | None) -> int:
    results = read_results()
    loader = results.get("loader_speed", {}).get("images_per_s")
    b0 = results.get("speed_fat_b0_train_compiled", {}).get("images_per_s")
    if loader and b0:
        result("loader_vs_b0", "PASS", f"x{loader / b0:.2f}: loader {loader:.0f} img/s / FAT-B0 compiled training "
               f"{b0:.0f} img/s ({'keeps up' if loader >= b0 else 'the loader is the bottleneck'})", ratio=loader / b0)
        results = read_results()
    lines = [f"{r['status']:4}  {r['name']:34} {r['figure']}" for r in results.values()]
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.write_text(text)
    print(text, end="")
    return counts["FAIL"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("model-speed", "loader-speed"):
        sub.add_parser(name).add_argument("log", type=Path)
    sub.add_parser("report").add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.command == "model-speed":
        sys.exit(0 if model_speed(args.log.read_text()) else 1)
    if args.command == "loader-speed":
        sys.exit(0 if loader_speed(args.log.read_text()) else 1)
    sys.exit(1 if report(args.out) else 0)


if __name__ == "__main__":
    main()
