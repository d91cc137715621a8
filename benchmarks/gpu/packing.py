"""Carry Python packages to the GPU machine in parts that fit the device tool's 64 MiB per call.

Build machine (benchmarks/gpu/prepare.sh calls these):

    python packing.py closure --device device_packages.txt --skip wheels.txt WHEEL...
        every requirement of every wheel (markers evaluated for CPython 3.12 on Linux x86_64,
        extras ignored) is carried, on the device, or skipped in wheels.txt with a reason
    python packing.py prune SITE_DIR
        removes files that only other Pythons load (extension modules for other CPython versions,
        C/C++ headers): they cannot be used by the device's Python 3.12
    python packing.py pack --part-bytes N --out DIR PAYLOAD...
        concatenates the payloads (NAME=FILE:DEST, in order) into one stream, cuts it into parts
        DIR/p01/part.bin, DIR/p02/part.bin, ... of N bytes, each with a copy of manifest.json

GPU machine (benchmarks/gpu/run.sh calls this, with the device's python3):

    python packing.py receive --store STORE --root ROOT [PART_DIR]
        copies a part into STORE (sha256 checked against the manifest), then extracts every payload
        whose bytes are all there and that is not extracted yet (tar, or tar.xz, into ROOT/DEST);
        prints one JSON line: parts present and missing, payloads ready

Payloads are tar files (the staged package folders, compressed with xz; the JPEG subset,
uncompressed). A payload spans consecutive parts; it is read straight out of the parts, so no
part is ever reassembled on disk. Standard library only (the device has no registry).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

MANIFEST = "manifest.json"
PART_FILE = "part.bin"
CHUNK = 1 << 20
# The environment of the device's interpreter (KINDS.md: Python 3.12.3, Linux x86-64), for markers.
DEVICE_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "platform_release": "", "platform_version": "",
    "implementation_version": "3.12.3", "extra": "",
}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- build machine: closure


def read_names(path: Path) -> set[str]:
    """Package names, one per line (# comments, blank lines ignored)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(line))
    return names


def read_skips(wheels_txt: Path) -> dict[str, str]:
    """``skip NAME reason...`` lines of wheels.txt: requirements deliberately not carried."""
    skips = {}
    for line in wheels_txt.read_text().splitlines():
        fields = line.split("#", 1)[0].split(None, 2)
        if fields and fields[0] == "skip":
            if len(fields) < 3:
                raise SystemExit(f"{wheels_txt}: 'skip {fields[1] if len(fields) > 1 else ''}' needs a reason")
            skips[normalize(fields[1])] = fields[2].strip()
    return skips


def wheel_metadata(wheel: Path) -> tuple[str, list[str]]:
    """(name, Requires-Dist lines) of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(name).decode("utf-8", "replace")
    header = text.split("\n\n", 1)[0]
    dist = re.search(r"^Name: *(.+)$", header, re.M).group(1).strip()
    return dist, [m.strip() for m in re.findall(r"^Requires-Dist: *(.+)$", header, re.M)]


def requirement_applies(requirement: str) -> str | None:
    """The required name if ``requirement`` applies on the device without extras, else None."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
        return None
    return normalize(req.name)


def closure(wheels: list[Path], device: set[str], skips: dict[str, str]) -> tuple[list[str], list[str]]:
    """(unmet requirements as 'wheel -> name', notes on skipped ones)."""
    carried = {normalize(wheel_metadata(w)[0]): w for w in wheels}
    unmet, notes = [], []
    for name, wheel in sorted(carried.items()):
        for line in wheel_metadata(wheel)[1]:
            needed = requirement_applies(line)
            if needed is None or needed in carried or needed in device:
                continue
            if needed in skips:
                notes.append(f"{name} -> {needed}: skipped ({skips[needed]})")
            else:
                unmet.append(f"{name} -> {line}")
    return unmet, notes


# ---------------------------------------------------------------- build machine: prune, pack

OTHER_ABI = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")


def prune(site: Path, keep_abi: str = "312") -> int:
    """Delete extension modules built for other CPython versions and C/C++ headers; bytes freed."""
    freed = 0
    for path in sorted(site.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        match = OTHER_ABI.search(path.name)
        other_abi = match is not None and match.group(1) != keep_abi
        header = path.suffix in (".h", ".hpp", ".cuh", ".inl") and "include" in path.relative_to(site).parts
        if other_abi or header:
            freed += path.stat().st_size
            path.unlink()
    return freed


def pack(payloads: list[tuple[str, Path, str, bool]], part_bytes: int, out: Path) -> dict:
    """Cut the concatenated payloads (name, file, dest folder, optional) into parts out/pNN/part.bin
    and write the manifest into each. Optional payloads must come last: the parts holding only
    them are sent only when needed."""
    if part_bytes < 1:
        raise ValueError("part size must be positive")
    flags = [optional for *_, optional in payloads]
    if flags != sorted(flags):
        raise ValueError("optional payloads must come after the required ones")
    entries, offset = [], 0
    for name, path, dest, optional in payloads:
        size = path.stat().st_size
        fmt = "tar.xz" if path.name.endswith((".tar.xz", ".txz")) else "tar"
        entries.append(dict(name=name, file=path.name, offset=offset, bytes=size, sha256=sha256_file(path),
                            format=fmt, dest=dest, optional=optional))
        offset += size
    total = offset
    count = -(-total // part_bytes)
    for stale in out.glob("p[0-9][0-9]"):
        shutil.rmtree(stale)
    parts = []
    stream = _concat([p for _, p, _, _ in payloads])
    for i in range(count):
        folder = out / f"p{i + 1:02d}"
        folder.mkdir(parents=True)
        size = min(part_bytes, total - i * part_bytes)
        digest = hashlib.sha256()
        with open(folder / PART_FILE, "wb") as f:
            left = size
            while left:
                block = stream.read(min(CHUNK, left))
                if not block:
                    raise RuntimeError("payloads changed while packing")
                f.write(block)
                digest.update(block)
                left -= len(block)
        parts.append(dict(name=folder.name, offset=i * part_bytes, bytes=size, sha256=digest.hexdigest()))
    for entry in entries:
        first, last = entry["offset"] // part_bytes, (entry["offset"] + entry["bytes"] - 1) // part_bytes
        entry["parts"] = [parts[i]["name"] for i in range(first, last + 1)]
    required = sorted({p for e in entries if not e["optional"] for p in e["parts"]})
    for part in parts:
        part["required"] = part["name"] in required
    build = hashlib.sha256(json.dumps([e["sha256"] for e in entries] + [part_bytes]).encode()).hexdigest()[:16]
    manifest = dict(version=1, build=build, part_bytes=part_bytes, total_bytes=total, parts=parts, payloads=entries)
    for part in parts:
        (out / part["name"] / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


class _concat(io.RawIOBase):
    """Read several files as one stream (the part files on the device, the payloads here)."""

    def __init__(self, paths: list[Path], skip: int = 0, length: int | None = None):
        self.paths, self.index, self.file = list(paths), 0, None
        self.left = length
        self._open()
        while skip:
            skip -= len(self._raw(min(skip, CHUNK)))

    def _open(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = open(self.paths[self.index], "rb") if self.index < len(self.paths) else None

    def _raw(self, n: int) -> bytes:
        while self.file is not None:
            block = self.file.read(n)
            if block:
                return block
            self.index += 1
            self._open()
        return b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = len(buffer) if self.left is None else min(len(buffer), self.left)
        block = self._raw(n) if n else b""
        buffer[: len(block)] = block
        if self.left is not None:
            self.left -= len(block)
        return len(block)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


# ---------------------------------------------------------------- device: receive, extract


def load_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise SystemExit(f"packing: no {MANIFEST} in {folder}")
    return json.loads(path.read_text())


def store_part(part_dir: Path, store: Path) -> dict:
    """Copy the part in part_dir into store (checked); returns its manifest."""
    manifest = load_manifest(part_dir)
    name = part_dir.name
    entry = next((p for p in manifest["parts"] if p["name"] == name), None)
    if entry is None:
        raise SystemExit(f"packing: {part_dir} is not a part of build {manifest['build']}")
    source = part_dir / PART_FILE
    if not source.is_file() or source.stat().st_size != entry["bytes"] or sha256_file(source) != entry["sha256"]:
        raise SystemExit(f"packing: {source} is damaged (size or sha256 differ from the manifest)")
    store.mkdir(parents=True, exist_ok=True)
    if (store / MANIFEST).is_file() and load_manifest(store)["build"] != manifest["build"]:
        # Parts of an older preparation: start over with this build's.
        for stale in store.iterdir():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    tmp = store / f".{name}.tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, store / f"{name}.bin")
    (store / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def present_parts(store: Path, manifest: dict) -> set[str]:
    """Parts in the store whose size matches (their sha256 was checked when they were stored)."""
    return {p["name"] for p in manifest["parts"]
            if (store / f"{p['name']}.bin").is_file() and (store / f"{p['name']}.bin").stat().st_size == p["bytes"]}


def payload_stream(store: Path, manifest: dict, payload: dict) -> io.BufferedReader:
    parts = [p for p in manifest["parts"] if p["name"] in payload["parts"]]
    skip = payload["offset"] - parts[0]["offset"]
    raw = _concat([store / f"{p['name']}.bin" for p in parts], skip=skip, length=payload["bytes"])
    return io.BufferedReader(raw, CHUNK)


class _Hashing(io.RawIOBase):
    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.stream.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n


def extract(store: Path, manifest: dict, payload: dict, root: Path) -> Path:
    """Extract one payload into root/dest (through a temporary folder, renamed when complete)."""
    dest = root / payload["dest"]
    marker = dest / f".payload-{payload['name']}-{payload['sha256'][:16]}"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    hashing = _Hashing(payload_stream(store, manifest, payload))
    mode = "r|xz" if payload["format"] == "tar.xz" else "r|"
    with tarfile.open(fileobj=io.BufferedReader(hashing, CHUNK), mode=mode) as tar:
        kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        tar.extractall(dest, **kwargs)
    while hashing.readinto(bytearray(CHUNK)):  # tar's zero padding after the end marker
        pass
    if hashing.digest.hexdigest() != payload["sha256"]:
        raise SystemExit(f"packing: payload {payload['name']} does not match its sha256")
    marker.touch()
    return dest


def receive(store: Path, root: Path, part_dir: Path | None) -> dict:
    if part_dir is not None:
        manifest = store_part(part_dir, store)
    elif (store / MANIFEST).is_file():
        manifest = load_manifest(store)
    else:
        return dict(build=None, present=[], missing=[], missing_required=[], ready=[], waiting=[])
    present = present_parts(store, manifest)
    ready, waiting = [], []
    for payload in manifest["payloads"]:
        if set(payload["parts"]) <= present:
            extract(store, manifest, payload, root)
            ready.append(payload["name"])
        else:
            waiting.append(payload["name"])
    missing = [p["name"] for p in manifest["parts"] if p["name"] not in present]
    missing_required = [p["name"] for p in manifest["parts"] if p["required"] and p["name"] not in present]
    return dict(build=manifest["build"], present=sorted(present), missing=missing, missing_required=missing_required,
                ready=ready, waiting=waiting)


def verify(site: Path, skips: dict[str, str]) -> list[str]:
    """On the device, after installing: each requirement of each distribution in ``site``, met by
    what this interpreter sees (the device's packages and the carried ones), version included."""
    from importlib import metadata

    from packaging.requirements import Requirement

    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = []
    for dist in metadata.distributions(path=[str(site)]):
        name = dist.metadata["Name"]
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed.get(normalize(req.name))
            if have is None:
                if normalize(req.name) not in skips:
                    problems.append(f"{name}: {line}: not installed")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name}: {line}: {have} installed")
    return sorted(set(problems))


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("closure", help="check that the wheels' requirements are all met")
    c.add_argument("--device", type=Path, required=True, help="names of the packages on the device")
    c.add_argument("--skip", type=Path, help="wheels.txt, for its 'skip NAME reason' lines")
    c.add_argument("wheels", type=Path, nargs="+")
    p = sub.add_parser("prune", help="remove files other Pythons need")
    p.add_argument("site", type=Path)
    k = sub.add_parser("pack", help="cut payloads into parts")
    k.add_argument("--part-bytes", type=int, required=True)
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("payloads", nargs="+", help="NAME=FILE:DEST[:optional]")
    r = sub.add_parser("receive", help="store a part, extract the payloads it completes")
    r.add_argument("--store", type=Path, required=True)
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("part", type=Path, nargs="?")
    v = sub.add_parser("verify", help="on the device: the installed packages' requirements are met")
    v.add_argument("--site", type=Path, required=True)
    v.add_argument("--skip", type=Path, help="wheels.txt, for its 'skip NAME reason' lines")
    args = parser.parse_args(argv)

    if args.command == "verify":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import result

        problems = verify(args.site, read_skips(args.skip) if args.skip else {})
        for problem in problems:
            print(f"verify: {problem}")
        count = sum(1 for _ in Path(args.site).glob("*.dist-info"))
        result("site_requirements", not problems, f"{count} carried distributions: "
               + ("every requirement met by the device's packages or the carried ones" if not problems
                  else f"{len(problems)} unmet: " + "; ".join(problems[:6])))
    elif args.command == "closure":
        unmet, notes = closure(args.wheels, read_names(args.device), read_skips(args.skip) if args.skip else {})
        for note in notes:
            print(f"closure: {note}")
        if unmet:
            print("closure: not carried and not on the device:\n  " + "\n  ".join(unmet), file=sys.stderr)
            sys.exit(1)
        print(f"closure: ok, {len(args.wheels)} wheels")
    elif args.command == "prune":
        print(f"prune: {prune(args.site) / 2**20:.1f} MiB removed from {args.site}")
    elif args.command == "pack":
        payloads = []
        for spec in args.payloads:
            name, rest = spec.split("=", 1)
            optional = rest.endswith(":optional")
            file, dest = rest.removesuffix(":optional").rsplit(":", 1)
            payloads.append((name, Path(file), dest, optional))
        manifest = pack(payloads, args.part_bytes, args.out)
        for part in manifest["parts"]:
            inside = [f"{e['name']} ({e['bytes'] / 2**20:.1f} MiB{', optional' if e['optional'] else ''})"
                      for e in manifest["payloads"] if part["name"] in e["parts"]]
            print(f"{part['name']}  {part['bytes'] / 2**20:5.1f} MiB  {'required' if part['required'] else 'optional'}  "
                  f"payloads: {', '.join(inside)}")
        required = [p for p in manifest["parts"] if p["required"]]
        print(f"build {manifest['build']}: {len(required)} required parts, {len(manifest['parts'])} in all, "
              f"{manifest['total_bytes'] / 2**20:.1f} MiB")
    elif args.command == "receive":
        print(json.dumps(receive(args.store, args.root, args.part)))


if __name__ == "__main__":
    main()
