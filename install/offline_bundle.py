"""Build an offline install bundle: fatscale's dependencies for the Python and platform of a GPU
node without internet access, in as few bytes as the node needs.

    python install/offline_bundle.py --out DIR [--python 3.12] [--platform manylinux_2_28_x86_64]
        [--without NAME ...] [--against PACKAGES.txt] [--omit NAME ...] [--mlflow-skinny]
        [--pack wheels|tree] [--split-mib N]

Here, with internet access, pip resolves fatscale's dependencies (pyproject.toml, at the versions
of constraints.txt) for the target, what the node provides is left out, the rest is downloaded
into DIR/wheels/<target>/, and DIR/bundle/ is written: what goes to the node.
  --pack wheels  bundle.tar: the wheels; the node installs them with pip, offline
  --pack tree    bundle.tar.xz: the wheels installed here for the target (pip --target), without
                 the files that Python cannot load, compressed with xz (about a third fewer bytes
                 than the wheels); the node unpacks it into a folder for PYTHONPATH
  --split-mib N  the archive cut into part-01, part-02, ... of at most N MiB
DIR/bundle/MANIFEST lists the parts (size, sha256) and the packages. On the node:
bash install/install_bundle.sh DIR/bundle [--target T] (install/README.md).

What the node provides is left out, and what only it needs: --without NAME (torch and
torchvision: a node's own CUDA build) and --against FILE (the node's `pip freeze`, or one name a
line). A version constraints.txt pins is bundled unless the node has exactly it (the node's timm,
say, may be another). --omit NAME leaves out a package a requirement names but fatscale never
loads (nvidia-libnvcomp-cu13: DALI opens nvcomp for its inflate operator only, never for JPEGs;
gitpython, uvicorn, google-auth: MLflow's git tags, server, Databricks login); the install's
check passes over it. --mlflow-skinny bundles MLflow's tracking client and store (mlflow-skinny,
sqlalchemy, alembic, cryptography) instead of mlflow, whose server and UI need pandas, pyarrow,
scipy, scikit-learn, matplotlib, Flask and more. DeepSpeed publishes only a source archive: its
wheel is built here as pure Python (DS_BUILD_OPS=0: its ops compile just in time where they are
used; this needs torch in the Python running this script).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_requirements import normalize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
# What mlflow adds to mlflow-skinny for its sqlite store (its model registry's tables import
# cryptography), with mlflow's own bounds.
SKINNY_MLFLOW = ["sqlalchemy>=1.4.0,<3", "alembic!=1.10.0,<2", "cryptography>=43.0.0,<51"]
HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inl")


def fail(message: str) -> None:
    sys.exit(f"offline_bundle: {message}")


@dataclass(frozen=True)
class Target:
    python: str  # "3.12"
    platform: str  # "manylinux_2_28_x86_64"

    @property
    def arch(self) -> str:
        return re.fullmatch(r"manylinux_2_\d+_(\w+)", self.platform).group(1)

    def pip_args(self) -> list[str]:
        """pip's options for wheels of this target: every manylinux tag the node's glibc accepts
        (pip matches each --platform exactly), older ones included."""
        glibc = int(re.fullmatch(r"manylinux_2_(\d+)_\w+", self.platform).group(1))
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(glibc, 4, -1)]
        tags += [f"{legacy}_{self.arch}" for legacy, minor in (("manylinux2014", 17), ("manylinux2010", 12),
                                                              ("manylinux1", 5)) if minor <= glibc]
        args = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp"]
        for tag in tags:
            args += ["--platform", tag]
        return args

    def markers(self) -> dict[str, str]:
        """The environment markers of the node's interpreter."""
        return {"python_version": self.python, "python_full_version": f"{self.python}.0", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "implementation_version": f"{self.python}.0",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": self.arch, "os_name": "posix",
                "platform_release": "", "platform_version": "", "extra": ""}


@dataclass(frozen=True)
class Package:
    name: str  # as published
    version: str
    requires: tuple[str, ...]


def run_pip(*args: str, env: dict | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        fail(f"pip {args[0]} failed (its output above)")


# ---------------------------------------------------------------- what the bundle holds


def root_requirements(pyproject: Path, mlflow_skinny: bool) -> list[str]:
    import tomllib

    from packaging.requirements import Requirement

    roots = []
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        req = Requirement(line)
        if mlflow_skinny and normalize(req.name) == "mlflow":
            roots += [f"mlflow-skinny{req.specifier}", *SKINNY_MLFLOW]
        else:
            roots.append(line)
    return roots


def read_pins(constraints: Path) -> dict[str, str]:
    """name -> version of each ``name==version`` line of constraints.txt."""
    pins = {}
    for line in constraints.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)\s*(#.*)?", line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def read_node_packages(path: Path) -> dict[str, str | None]:
    """name -> version (None where the line names no version) of a `pip freeze` or a list of names."""
    packages = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # pip freeze's -e / --index-url lines
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+)|@\s*\S.*)?", line)
        if match is None:
            fail(f"--against {path}:{number}: expected NAME or NAME==VERSION, got {line!r}")
        packages[normalize(match.group(1))] = match.group(2)
    return packages


def deepspeed_wheel(version: str, cache: Path) -> Path:
    """DeepSpeed's pure-Python wheel, built from its sdist once (its setup.py imports torch)."""
    built = sorted(cache.glob(f"deepspeed-{version}-py3-none-any.whl"))
    if built:
        return built[0]
    print(f"offline_bundle: building the deepspeed {version} wheel from its source archive", flush=True)
    run_pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(cache), f"deepspeed=={version}",
            env=dict(os.environ, DS_BUILD_OPS="0"))
    built = sorted(cache.glob(f"deepspeed-{version}-*.whl"))
    if not built or not built[0].name.endswith("-py3-none-any.whl"):
        fail(f"the deepspeed {version} wheel built in {cache} is not pure Python (py3-none-any): {built}")
    return built[0]


def resolve(roots: list[str], target: Target, constraints: Path, links: Path) -> dict[str, Package]:
    """pip's resolution for the target (metadata only, nothing installed): normalized name -> package."""
    with tempfile.TemporaryDirectory(prefix="offline-bundle-") as tmp:
        report = Path(tmp) / "report.json"
        run_pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
                str(Path(tmp) / "unused"), "--find-links", str(links), "-c", str(constraints), *target.pip_args(), *roots)
        items = json.loads(report.read_text())["install"]
    return {normalize(i["metadata"]["name"]): Package(i["metadata"]["name"], i["metadata"]["version"],
                                                      tuple(i["metadata"].get("requires_dist", [])))
            for i in items}


def node_provides(packages: dict[str, Package], roots: list[str], without: list[str], node: dict[str, str | None],
                  pins: dict[str, str]) -> set[str]:
    """The names the node's own packages stand for: --without always; --against unless constraints.txt
    pins another version than the node's, or the node's version fails a requirement on it."""
    from packaging.requirements import Requirement

    wanted: dict[str, list] = {}
    for line in [*roots, *(line for package in packages.values() for line in package.requires)]:
        req = Requirement(line)
        wanted.setdefault(normalize(req.name), []).append(req.specifier)
    provided = {normalize(name) for name in without}
    for name, version in node.items():
        if name in pins and pins[name] != version:
            continue
        if version is not None and not all(spec.contains(version, prereleases=True) for spec in wanted.get(name, [])):
            continue
        provided.add(name)
    return provided


def bundled(packages: dict[str, Package], roots: list[str], excluded: set[str], markers: dict[str, str]) -> list[str]:
    """The names reachable from the roots without passing through an excluded package (extras followed)."""
    from packaging.requirements import Requirement

    keep: set[str] = set()
    todo = [(Requirement(line), ()) for line in roots]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({**markers, "extra": e}) for e in ("", *parent_extras)):
            continue
        name = normalize(req.name)
        if name in excluded or name not in packages:
            continue
        extras = tuple(sorted(req.extras))
        if (name, extras) in keep:
            continue
        keep.add((name, extras))
        todo += [(Requirement(line), extras) for line in packages[name].requires]
    return sorted({name for name, _ in keep})


# ---------------------------------------------------------------- download, pack, split


def download(packages: list[Package], target: Target, links: Path, wheels: Path) -> list[Path]:
    """The wheels of ``packages`` in ``wheels``, a cache for this target: pip skips the files already
    there, and other builds' wheels stay."""
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"offline_bundle: downloading {len(packages)} wheels into {wheels}", flush=True)
    run_pip("download", "-q", "--no-deps", "-d", str(wheels), "--find-links", str(links), *target.pip_args(),
            *[f"{p.name}=={p.version}" for p in packages])
    wanted = {(normalize(p.name), p.version) for p in packages}
    files = [w for w in sorted(wheels.glob("*.whl")) if (normalize(w.name.split("-")[0]), w.name.split("-")[1]) in wanted]
    if len(files) != len(packages):
        fail(f"expected {len(packages)} wheels in {wheels}, found {len(files)}")
    return files


def prune(tree: Path, python: str) -> int:
    """Delete what the target Python never loads: extension modules of other CPython versions, C/C++
    headers, the command-line programs of NVIDIA's library packages (nvidia/*/bin: nvcomp's
    nvlzcat); returns the bytes freed."""
    keep_abi = python.replace(".", "")
    other_abi = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")
    freed = 0
    for path in sorted(tree.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        match = other_abi.search(path.name)
        parts = path.relative_to(tree).parts
        header = path.suffix in HEADER_SUFFIXES and "include" in parts
        program = parts[0] == "nvidia" and len(parts) > 3 and parts[2] == "bin"
        if (match is not None and match.group(1) != keep_abi) or header or program:
            freed += path.stat().st_size
            path.unlink()
    return freed


def tar(source: Path, members: list[str], archive: Path, compress: bool) -> None:
    """A reproducible tar of ``members`` of ``source``, through xz -6 on every core when compress."""
    for tool in ("tar", "xz") if compress else ("tar",):
        if shutil.which(tool) is None:
            fail(f"needs {tool}")
    partial = archive.with_name(archive.name + ".partial")
    command = ["tar", "-C", str(source), "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-cf", "-", *members]
    with open(partial, "wb") as out:
        if compress:
            tarring = subprocess.Popen(command, stdout=subprocess.PIPE)
            xz = subprocess.run(["xz", "-6", "-T0", "-c"], stdin=tarring.stdout, stdout=out)
            tarring.stdout.close()
            ok = tarring.wait() == 0 and xz.returncode == 0
        else:
            ok = subprocess.run(command, stdout=out).returncode == 0
    if not ok:
        fail(f"packing {source} into {archive} failed")
    partial.replace(archive)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def split(archive: Path, part_bytes: int | None) -> list[Path]:
    """The archive itself, or its bytes cut into part-01, part-02, ... of at most part_bytes."""
    for stale in archive.parent.glob("part-*"):
        stale.unlink()
    if part_bytes is None:
        return [archive]
    parts = []
    with open(archive, "rb") as f:
        while block := f.read(part_bytes):
            parts.append(archive.parent / f"part-{len(parts) + 1:02d}")
            parts[-1].write_bytes(block)
    archive.unlink()
    return parts


def write_manifest(bundle: Path, pack: str, target: Target, parts: list[Path], packages: list[Package],
                   provided: set[str], omitted: set[str]) -> None:
    """MANIFEST, read by install_bundle.sh: one record a line."""
    lines = ["# fatscale offline bundle: bash install/install_bundle.sh THIS_FOLDER [--target DIR]",
             f"format {pack}", f"python {target.python}", f"platform {target.platform}"]
    lines += [f"part {p.name} {p.stat().st_size} {sha256(p)}" for p in parts]
    lines += [f"dist {p.name} {p.version}" for p in packages]
    lines += [f"provided {name}" for name in sorted(provided)]
    lines += [f"omitted {name}" for name in sorted(omitted)]
    (bundle / "MANIFEST").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--out", type=Path, required=True, help="working folder; the bundle is OUT/bundle")
    parser.add_argument("--python", default="3.12", help="the node's Python, MAJOR.MINOR")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="manylinux_2_<glibc minor>_<arch> of the node (`ldd --version` gives the glibc)")
    parser.add_argument("--without", nargs="*", default=[], metavar="NAME", help="packages the node provides")
    parser.add_argument("--against", type=Path, help="the node's packages: `pip freeze` output or one name a line")
    parser.add_argument("--omit", nargs="*", default=[], metavar="NAME", help="packages fatscale never loads")
    parser.add_argument("--mlflow-skinny", action="store_true", help="MLflow's client and store instead of mlflow")
    parser.add_argument("--pack", choices=["wheels", "tree"], default="wheels")
    parser.add_argument("--split-mib", type=float, help="cut the archive into parts of at most this many MiB")
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml", help=argparse.SUPPRESS)
    parser.add_argument("--constraints", type=Path, default=REPO / "constraints.txt", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        parser.error(f"--python {args.python}: expected MAJOR.MINOR, e.g. 3.12")
    if not re.fullmatch(r"manylinux_2_\d+_\w+", args.platform):
        parser.error(f"--platform {args.platform}: expected manylinux_2_N_ARCH, e.g. manylinux_2_28_x86_64")
    if args.split_mib is not None and args.split_mib <= 0:
        parser.error(f"--split-mib {args.split_mib}: must be positive")
    for flag, path in (("--against", args.against), ("--pyproject", args.pyproject), ("--constraints", args.constraints)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if sys.version_info < (3, 11):
        fail("needs Python >= 3.11 here (tomllib); the node's may be older")

    target = Target(args.python, args.platform)
    links = args.out / "built"  # wheels made here (deepspeed), offered to pip beside the index
    links.mkdir(parents=True, exist_ok=True)
    pins = read_pins(args.constraints)
    roots = root_requirements(args.pyproject, args.mlflow_skinny)
    if "deepspeed" in pins:
        deepspeed_wheel(pins["deepspeed"], links)
    print("offline_bundle: resolving fatscale's dependencies for CPython "
          f"{target.python} on {target.platform}", flush=True)
    resolved = resolve(roots, target, args.constraints, links)
    node = read_node_packages(args.against) if args.against else {}
    provided = node_provides(resolved, roots, args.without, node, pins)
    omitted = {normalize(name) for name in args.omit}
    packages = [resolved[name] for name in bundled(resolved, roots, provided | omitted, target.markers())]
    wheels = download(packages, target, links, args.out / "wheels" / f"cp{target.python.replace('.', '')}-{target.platform}")
    wheel_bytes = sum(w.stat().st_size for w in wheels)

    bundle = args.out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    if args.pack == "tree":
        tree = args.out / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        run_pip("install", "-q", "--no-deps", "--no-index", "--no-compile", "--target", str(tree), *target.pip_args(),
                *map(str, wheels))
        freed = prune(tree, target.python)
        installed = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
        print(f"offline_bundle: installed {installed / MIB:.1f} MiB ({freed / MIB:.1f} MiB pruned); "
              "compressing with xz", flush=True)
        archive = bundle / "bundle.tar.xz"
        tar(tree, ["."], archive, compress=True)
    else:
        archive = bundle / "bundle.tar"
        tar(wheels[0].parent, [w.name for w in wheels], archive, compress=False)
    archive_bytes = archive.stat().st_size
    parts = split(archive, None if args.split_mib is None else int(args.split_mib * MIB))
    write_manifest(bundle, args.pack, target, parts, packages, provided, omitted)

    largest = sorted(wheels, key=lambda w: -w.stat().st_size)[:5]
    print(f"offline_bundle: {len(packages)} packages, wheels {wheel_bytes / MIB:.1f} MiB (largest: "
          + ", ".join(f"{w.name.split('-')[0]} {w.stat().st_size / MIB:.1f}" for w in largest) + ")")
    print(f"offline_bundle: left out, the node's: {', '.join(sorted(provided & set(resolved))) or 'nothing'}"
          + (f"; omitted: {', '.join(sorted(omitted))}" if omitted else ""))
    print(f"offline_bundle: {bundle}: {archive.name} {archive_bytes / MIB:.1f} MiB"
          + (f" in {len(parts)} parts of at most {args.split_mib:g} MiB" if args.split_mib else "")
          + f"; on the node: bash install/install_bundle.sh {bundle.name}")


if __name__ == "__main__":
    main()
