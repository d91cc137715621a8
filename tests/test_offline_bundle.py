"""The offline install bundle (install/): what it holds, its parts, and its installation with no
network, refused when a part is missing or damaged or a requirement is unmet. Offline: the
wheels are made here (small pure-Python packages) and pip is kept off any index."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "install"))
import offline_bundle as B  # noqa: E402
import verify_requirements as V  # noqa: E402

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11) or not all(map(shutil.which, ("tar", "xz", "sha256sum"))),
                                reason="offline_bundle.py needs Python >= 3.11 (tomllib); the bundle, tar, xz and sha256sum")


def make_wheel(directory: Path, name: str, version: str, requires: list[str] = (), payload: int = 0) -> Path:
    """A pure-Python wheel written by hand; ``payload`` random bytes make it big (and incompressible)."""
    module = name.replace("-", "_")
    files = {f"{module}/__init__.py": f"VALUE = {version!r}\n".encode(), f"{module}/blob.bin": os.urandom(payload)}
    info = f"{module}-{version}.dist-info"
    files[f"{info}/METADATA"] = ("Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for path, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join(record + [f"{info}/RECORD,,"]) + "\n").encode()
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A project needing alpha (-> beta -> gamma; beta's extra x -> delta), pinned (1.0 by its
    constraints; the node has 2.0) and nodepkg (the node's); the wheels where offline_bundle finds
    the wheels it built (here, the index too), a target node's package list, and nodepkg installed
    as the node has it."""
    root = tmp_path_factory.mktemp("project")
    built = root / "out" / "built"
    built.mkdir(parents=True)
    make_wheel(built, "alpha", "1.0", ["beta>=1", "nodepkg>=2", "win-only; sys_platform == 'win32'"], payload=6000)
    make_wheel(built, "beta", "1.0", ["gamma", "delta; extra == 'x'"], payload=6000)
    make_wheel(built, "gamma", "1.0")
    make_wheel(built, "delta", "1.0")
    make_wheel(built, "pinned", "1.0")
    make_wheel(built, "pinned", "2.0")
    nodepkg = make_wheel(built, "nodepkg", "2.0")
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\ndependencies = ["alpha>=1", "pinned", "nodepkg>=2"]\n')
    (root / "constraints.txt").write_text("# tested\npinned==1.0\n")
    (root / "node.txt").write_text("nodepkg==2.0\npinned==2.0\n-e git+https://example.org/x#egg=x\n")
    node_site = root / "node-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(node_site),
                    str(nodepkg)], check=True)
    return dict(root=root, node_site=node_site)


def build(project: dict, out: Path, *args: str) -> subprocess.CompletedProcess:
    if out != project["root"] / "out":
        shutil.copytree(project["root"] / "out" / "built", out / "built")
    env = dict(os.environ, PIP_NO_INDEX="1")  # offline: the wheels in OUT/built only
    return subprocess.run([sys.executable, str(REPO / "install" / "offline_bundle.py"), "--out", str(out),
                           "--python", PYTHON, "--pyproject", str(project["root"] / "pyproject.toml"),
                           "--constraints", str(project["root"] / "constraints.txt"),
                           "--against", str(project["root"] / "node.txt"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def install(bundle: Path, target: Path, pythonpath: Path | None) -> subprocess.CompletedProcess:
    """install_bundle.sh with no network at all where unshare allows it (else pip's --no-index)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = ["bash", str(REPO / "install" / "install_bundle.sh"), str(bundle), "--target", str(target),
               "--python", sys.executable]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        command = ["unshare", "-rn"] + command
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def manifest(bundle: Path) -> dict[str, list[list[str]]]:
    records: dict[str, list[list[str]]] = {}
    for line in (bundle / "MANIFEST").read_text().splitlines():
        if line and not line.startswith("#"):
            kind, *rest = line.split()
            records.setdefault(kind, []).append(rest)
    return records


def imports(target: Path, node_site: Path) -> list[str]:
    code = "import alpha, beta, gamma, pinned, nodepkg; print(alpha.VALUE, pinned.VALUE, nodepkg.VALUE)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{node_site}")).stdout.split()


@pytest.fixture(scope="module")
def tree_bundle(project) -> Path:
    done = build(project, project["root"] / "out", "--pack", "tree", "--split-mib", "0.004")
    assert done.returncode == 0, done.stdout + done.stderr
    return project["root"] / "out" / "bundle"


def test_the_bundle_holds_what_the_node_lacks_in_checked_parts(tree_bundle):
    records = manifest(tree_bundle)
    assert sorted(records["dist"]) == [["alpha", "1.0"], ["beta", "1.0"], ["gamma", "1.0"], ["pinned", "1.0"]]
    assert records["provided"] == [["nodepkg"]]  # the node's pinned 2.0 is not the tested 1.0: bundled
    assert records["format"] == [["tree"]] and records["python"] == [[PYTHON]]
    parts = records["part"]
    assert len(parts) >= 2 and [name for name, _, _ in parts] == [f"part-{i:02d}" for i in range(1, len(parts) + 1)]
    for name, size, digest in parts:
        data = (tree_bundle / name).read_bytes()
        assert len(data) == int(size) <= 0.004 * 2**20 and hashlib.sha256(data).hexdigest() == digest
    assert sorted(p.name for p in tree_bundle.iterdir()) == ["MANIFEST"] + [name for name, _, _ in parts]


def test_the_tree_installs_offline_and_every_requirement_is_checked(tree_bundle, project, tmp_path):
    target = tmp_path / "site"
    done = install(tree_bundle, target, project["node_site"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every requirement met" in done.stdout and f"export PYTHONPATH={target}" in done.stdout
    assert imports(target, project["node_site"]) == ["1.0", "1.0", "2.0"]
    assert not (target / "delta").exists()  # beta's extra, not asked for

    unmet = install(tree_bundle, tmp_path / "site2", None)  # the node without nodepkg
    assert unmet.returncode == 1
    assert "unmet: alpha: nodepkg>=2: not installed" in unmet.stdout
    assert unmet.stderr.strip().splitlines()[-1].startswith("install_bundle: some requirements are not met")


@pytest.mark.parametrize("damage", ["missing", "flipped", "short"])
def test_a_missing_or_damaged_part_is_refused_before_anything_is_installed(tree_bundle, project, tmp_path, damage):
    bundle = tmp_path / "bundle"
    shutil.copytree(tree_bundle, bundle)
    part = bundle / "part-02"
    if damage == "missing":
        part.unlink()
    else:
        data = bytearray(part.read_bytes())
        if damage == "flipped":
            data[100] ^= 0xFF
        else:
            del data[-1]
        part.write_bytes(bytes(data))
    done = install(bundle, tmp_path / "site", project["node_site"])
    assert done.returncode == 1
    expected = "missing" if damage == "missing" else "damaged"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"install_bundle: {part} is {expected}"), done.stderr
    assert not (tmp_path / "site").exists() and not (tmp_path / "site.partial").exists()


def test_a_wheels_bundle_installs_with_pip_offline_and_omitted_packages_pass_the_check(project, tmp_path):
    done = build(project, tmp_path / "out", "--pack", "wheels", "--omit", "gamma")
    assert done.returncode == 0, done.stdout + done.stderr
    bundle = tmp_path / "out" / "bundle"
    records = manifest(bundle)
    assert [name for name, _, _ in records["part"]] == ["bundle.tar"] and records["omitted"] == [["gamma"]]
    assert sorted(name for name, _ in records["dist"]) == ["alpha", "beta", "pinned"]
    target = tmp_path / "site"
    installed = install(bundle, target, project["node_site"])
    assert installed.returncode == 0, installed.stdout + installed.stderr  # beta's gamma: omitted, passed over
    code = "import alpha, beta, pinned; print(alpha.VALUE, pinned.VALUE); import gamma"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(target)))
    assert done.stdout.split() == ["1.0", "1.0"] and "No module named 'gamma'" in done.stderr


# ---------------------------------------------------------------- the pieces


def test_target_tags_and_markers():
    target = B.Target("3.12", "manylinux_2_28_x86_64")
    args = target.pip_args()
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert platforms[0] == "manylinux_2_28_x86_64" and platforms[-4:] == [
        "manylinux_2_5_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert ["--python-version", "3.12"] == args[1:3] and target.markers()["platform_machine"] == "x86_64"


def test_what_the_node_provides_and_what_is_bundled():
    P = B.Package
    packages = {"a": P("a", "1", ("b>=2", "c[x]", "w; sys_platform == 'win32'")), "b": P("b", "2", ("d",)),
                "c": P("c", "1", ("e; extra == 'x'",)), "d": P("d", "1", ()), "e": P("e", "1", ()), "w": P("w", "1", ()),
                "t": P("t", "3", ())}
    node = {"b": "2", "t": "1", "d": None}
    provided = B.node_provides(packages, ["a", "t"], ["x"], node, pins={"t": "3"})
    assert provided == {"x", "b", "d"}  # t: the node's 1 is not the pinned 3
    markers = B.Target("3.12", "manylinux_2_28_x86_64").markers()
    assert B.bundled(packages, ["a", "t"], provided, markers) == ["a", "c", "e", "t"]  # not b's d; w is Windows'
    assert B.node_provides(packages, ["a"], [], {"b": "1"}, {}) == set()  # the node's b 1 fails a's b>=2
    assert B.node_provides(packages, ["a", "t>=4"], [], {"t": "3"}, {}) == set()  # nor does t 3 the root's t>=4


def test_node_package_lists_and_pins_are_read(tmp_path):
    listing = tmp_path / "node.txt"
    listing.write_text("# pip freeze\nTorch==2.11.0\nnumpy\ntimm @ file:///x\n-e git+x#egg=y\n")
    assert B.read_node_packages(listing) == {"torch": "2.11.0", "numpy": None, "timm": None}
    listing.write_text("numpy>=1\n")
    with pytest.raises(SystemExit, match=r"--against .*node.txt:1: expected NAME or NAME==VERSION"):
        B.read_node_packages(listing)
    pins = tmp_path / "c.txt"
    pins.write_text("torch==2.13.0  # tested\nfoo>=1\nDeep_Speed==0.19.8\n")
    assert B.read_pins(pins) == {"torch": "2.13.0", "deep-speed": "0.19.8"}


def test_prune_keeps_what_the_target_python_loads(tmp_path):
    keep = ["p/a.cpython-312-x86_64-linux-gnu.so", "p/b.abi3.so", "p/libfoo.so.1", "p/__init__.py", "p/x.h"]
    drop = ["p/a.cpython-311-x86_64-linux-gnu.so", "p/a.cpython-313t-x86_64-linux-gnu.so", "p/include/y.h",
            "p/include/z/w.hpp", "nvidia/lib/bin/tool"]
    for name in keep + drop:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"0" * 10)
    assert B.prune(tmp_path, "3.12") == 10 * len(drop)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(keep)


def test_requirements_are_checked_with_alternatives_and_markers():
    versions = {"mlflow-skinny": "3.17.2", "timm": "0.9.16", "torch": "2.11.0"}
    assert V.unmet("fatscale", ["mlflow>=3.17,<3.18", "torch>=2.4", "pywin32; sys_platform == 'win32'"], versions) == []
    assert V.unmet("fatscale", ["timm>=1.0.20,<1.1", "webdataset"], versions) == [
        "fatscale: timm>=1.0.20,<1.1: timm 0.9.16 installed", "fatscale: webdataset: not installed"]
    assert V.unmet("fatscale", ["webdataset"], versions, ignore=frozenset({"webdataset"})) == []
