"""A Python environment here that sees only what the GPU machine will have: its own packages
(device_packages.txt) plus the carried ones (wheels.txt), taken from this environment.

    python benchmarks/gpu/emulate_device.py DEST        # -> DEST/bin/python

DEST is a virtual environment without pip whose site-packages holds one symbolic link per file of
each allowed distribution installed here (so namespace folders such as nvidia/ or google/ hold
only the allowed distributions' files). Running the GPU checks' CPU fallbacks with DEST/bin/python
(and PYTHONPATH=the checkout, as on the device) shows a requirement that the carried set misses:
it fails to import here as it would there. Versions are this environment's, not the device's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from packing import normalize, read_names  # noqa: E402


def carried_names(wheels_txt: Path) -> set[str]:
    names = set()
    for line in wheels_txt.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] in ("early", "late"):
            names.add(normalize(fields[1].split("==")[0]))
    return names


def build(dest: Path, allowed: set[str], exclude: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Make the environment; returns (distributions linked, allowed names not installed here)."""
    if not (dest / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    purelib = Path(subprocess.run([str(dest / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"]).resolve()
    linked, seen = [], set()
    for dist in importlib.metadata.distributions():
        name = normalize(dist.metadata["Name"])
        if name not in allowed or name in exclude or name in seen or dist.files is None:
            continue
        root = Path(dist.locate_file("")).resolve()
        if root != here:  # editable installs (fatscale itself) and the like: not carried
            continue
        seen.add(name)
        linked.append(name)
        for file in dist.files:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue
            source = root / file
            target = purelib / file
            if not source.exists() or target.exists() or target.is_symlink():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    return sorted(linked), sorted(allowed - seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--device", type=Path, default=HERE / "device_packages.txt")
    parser.add_argument("--wheels", type=Path, default=HERE / "wheels.txt")
    parser.add_argument("--exclude", nargs="*", default=[], help="leave these out (to see what needs them)")
    args = parser.parse_args()
    allowed = read_names(args.device) | carried_names(args.wheels)
    linked, absent = build(args.dest, allowed, {normalize(n) for n in args.exclude})
    print(f"emulate_device: {len(linked)} distributions linked into {args.dest}")
    print(f"emulate_device: not installed here (so absent there too in this view): {' '.join(absent)}")


if __name__ == "__main__":
    main()
