"""The GPU session's preparation (benchmarks/gpu/), dry-run on CPU: argument handling, parts cut and
put back together, installation into a target folder, the requirement check, and every check
script end to end at tiny sizes through run.sh. No network: the wheels here are made here."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))
import packing  # noqa: E402

PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux2014_x86_64", "--only-binary=:all:"]


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def make_wheel(directory: Path, name: str, version: str = "1.0", requires: list[str] = (),
               files: dict[str, str | bytes] | None = None) -> Path:
    """A real (pure Python) wheel, written by hand: METADATA, WHEEL, RECORD, the modules."""
    module = name.replace("-", "_")
    files = files if files is not None else {f"{module}/__init__.py": f"VALUE = {version!r}\n"}
    info = f"{module}-{version}.dist-info"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
                       + [f"Requires-Dist: {r}\n" for r in requires])
    contents = dict(files)
    contents[f"{info}/METADATA"] = metadata
    contents[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in contents.items():
        data = text if isinstance(text, bytes) else text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in contents.items():
            z.writestr(path, text)
    return wheel


def install_target(wheels: list[Path], target: Path) -> None:
    """What prepare.sh does with each stage: pip --target for CPython 3.12, offline."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-compile", "--no-index", *PLATFORM, "--target", str(target), *map(str, wheels)],
                   check=True, capture_output=True, text=True)


def tar_xz(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:xz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return out


def jpeg_folder(folder: Path, count: int, size: tuple[int, int] = (96, 72)) -> Path:
    """Distinct real JPEGs named like the ImageNet sample (wnid_name.JPEG)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)  # a coarse pattern per image
        image = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
        image.save(folder / f"n{i:08d}_img{i}.JPEG", quality=92)
    return folder


def run_sh(*args: str, root: Path, parts: Path, env: dict | None = None, timeout: float = 900):
    environment = dict(os.environ, FATSCALE_GPU_ROOT=str(root), GPUWHEELS=str(parts), OUT=str(root / "out"),
                       DEVICE="cpu", TINY="1", PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(GPU / "run.sh"), *args], env=environment, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture
def fake_parts(tmp_path) -> tuple[Path, dict]:
    """Parts like prepare.sh's: an early and a late stage (real wheels installed with --target),
    JPEGs, an optional extra; cut small so that each payload spans parts."""
    need("tar")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payload = tmp_path / "payload"
    payload.mkdir()
    early = [make_wheel(wheels, "probe-early", "1.0", files={"probe_early/__init__.py": "VALUE = 'early'\n" + "#" * 3000})]
    # late is large and incompressible, like DALI's libraries: it spans the first two parts
    late = [make_wheel(wheels, "probe-late", "2.0", files={"probe_late/__init__.py": "VALUE = 'late'\n",
                                                           "probe_late/blob.bin": os.urandom(150_000)})]
    install_target(early, tmp_path / "stage" / "early")
    install_target(late, tmp_path / "stage" / "late")
    install_target([make_wheel(wheels, "probe-extra")], tmp_path / "stage" / "extra")
    images = jpeg_folder(tmp_path / "img" / "images", 40)
    with tarfile.open(payload / "images.tar", "w") as tar:
        tar.add(images, arcname="images")
    payloads = [("early", tar_xz(tmp_path / "stage" / "early", payload / "early.tar.xz"), "site", False),
                ("late", tar_xz(tmp_path / "stage" / "late", payload / "late.tar.xz"), "site", False),
                ("images", payload / "images.tar", "data", False),
                ("extra", tar_xz(tmp_path / "stage" / "extra", payload / "extra.tar.xz"), "site", True)]
    required = sum(p.stat().st_size for _, p, _, optional in payloads if not optional)
    part_bytes = -(-required // 3)  # 3 required parts, then the rest of extra in an optional 4th
    manifest = packing.pack(payloads, part_bytes, tmp_path / "parts")
    return tmp_path / "parts", manifest


# ---------------------------------------------------------------- scripts and arguments


def test_scripts_parse_and_arguments_are_checked(tmp_path):
    need("bash")
    for script in ("prepare.sh", "run.sh"):
        assert subprocess.run(["bash", "-n", str(GPU / script)]).returncode == 0
    root, parts = tmp_path / "root", tmp_path / "parts"
    usage = run_sh(root=root, parts=parts)
    assert usage.returncode == 2 and "run.sh pNN" in usage.stderr + usage.stdout
    assert run_sh("p07", root=root, parts=parts).returncode == 2  # not carried
    assert "carry it" in run_sh("p07", root=root, parts=parts).stdout
    assert run_sh("bogus", root=root, parts=parts).returncode == 2
    assert run_sh("-", root=root, parts=parts).returncode == 2  # '-' needs check names
    status = run_sh("status", root=root, parts=parts)
    assert status.returncode == 0 and '"missing_required": []' in status.stdout
    # what a device call runs fits the tool's 2,000-character command line
    assert len("bash benchmarks/gpu/run.sh p01") < 2000


# ---------------------------------------------------------------- parts


def test_parts_are_the_split_of_the_payloads_and_receive_extracts_them(tmp_path, fake_parts):
    need("split", "cat")
    parts, manifest = fake_parts
    assert [p["name"] for p in manifest["parts"]] == ["p01", "p02", "p03", "p04"]
    # The parts are exactly `split -b` of the payloads' concatenation, and put back together
    # they are the payloads, checksums and all.
    stream = tmp_path / "stream"
    with open(stream, "wb") as out:
        for entry in manifest["payloads"]:
            out.write((tmp_path / "payload" / entry["file"]).read_bytes())
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    subprocess.run(["split", "-b", str(manifest["part_bytes"]), "-d", str(stream), str(pieces / "x")], check=True)
    assert [p.read_bytes() for p in sorted(pieces.iterdir())] == \
        [(parts / p["name"] / packing.PART_FILE).read_bytes() for p in manifest["parts"]]
    joined = subprocess.run(["cat"] + [str(parts / p["name"] / packing.PART_FILE) for p in manifest["parts"]],
                            check=True, capture_output=True).stdout
    for entry in manifest["payloads"]:
        piece = joined[entry["offset"]:entry["offset"] + entry["bytes"]]
        assert hashlib.sha256(piece).hexdigest() == entry["sha256"]
    assert [p["required"] for p in manifest["parts"]] == [True, True, True, False]

    store, root = tmp_path / "store", tmp_path / "root"
    order = ["p03", "p01", "p02"]  # any order; each payload is installed once all its bytes are here
    states = [packing.receive(store, root, parts / name) for name in order]
    assert states[0]["ready"] == [] and states[0]["missing_required"] == ["p01", "p02"]
    first_complete = next(i for i, s in enumerate(states) if "early" in s["ready"])
    assert states[-1]["missing_required"] == [] and states[-1]["ready"] == ["early", "late", "images"]
    assert states[-1]["waiting"] == ["extra"] and first_complete <= 2
    code = "import probe_early, probe_late; print(probe_early.VALUE, probe_late.VALUE)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(root / "site")),
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["early", "late"]
    assert len(list((root / "data" / "images").glob("*.JPEG"))) == 40
    assert (root / "site" / "probe_late-2.0.dist-info" / "METADATA").is_file()  # installed, not just unpacked
    again = packing.receive(store, root, None)  # nothing new: nothing extracted twice
    assert again["ready"] == ["early", "late", "images"]
    final = packing.receive(store, root, parts / "p04")
    assert final["ready"] == ["early", "late", "images", "extra"] and final["missing"] == []


def test_a_damaged_part_is_refused_and_a_new_build_replaces_the_old(tmp_path, fake_parts):
    parts, manifest = fake_parts
    store, root = tmp_path / "store", tmp_path / "root"
    damaged = tmp_path / "damaged" / "p02"
    shutil.copytree(parts / "p02", damaged)
    data = bytearray((damaged / packing.PART_FILE).read_bytes())
    data[100] ^= 0xFF
    (damaged / packing.PART_FILE).write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="damaged"):
        packing.receive(store, root, damaged)
    packing.receive(store, root, parts / "p01")
    other = json.loads((parts / "p02" / packing.MANIFEST).read_text())
    other["build"] = "another"
    newer = tmp_path / "newer" / "p02"
    shutil.copytree(parts / "p02", newer)
    (newer / packing.MANIFEST).write_text(json.dumps(other))
    state = packing.receive(store, root, newer)
    assert state["build"] == "another" and state["present"] == ["p02"]  # p01 of the old build is gone


def test_payload_order_and_part_size_are_checked(tmp_path):
    a = tmp_path / "a.tar"
    a.write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="optional payloads must come after"):
        packing.pack([("x", a, "site", True), ("y", a, "site", False)], 4, tmp_path / "out")
    with pytest.raises(ValueError):
        packing.pack([("x", a, "site", False)], 0, tmp_path / "out")


# ---------------------------------------------------------------- requirements, pruning


def test_closure_finds_what_neither_the_parts_nor_the_device_have(tmp_path):
    device = tmp_path / "device.txt"
    device.write_text("# the device\ntorch\nTyping_Extensions\n")
    skips = tmp_path / "wheels.txt"
    skips.write_text("early a==1\nskip gone  not needed at run time\n")
    wheels = [
        make_wheel(tmp_path, "a", requires=["b>=1", "torch", "typing-extensions", "gone",
                                            "missing-one", "tests-only; extra == 'test'", "win; sys_platform == 'win32'",
                                            "old; python_version < '3.10'"]),
        make_wheel(tmp_path, "b", requires=["a"]),
    ]
    unmet, notes = packing.closure(wheels, packing.read_names(device), packing.read_skips(skips))
    assert unmet == ["a -> missing-one"]
    assert notes == ["a -> gone: skipped (not needed at run time)"]
    bad = tmp_path / "bad.txt"
    bad.write_text("skip nameonly\n")
    with pytest.raises(SystemExit, match="needs a reason"):
        packing.read_skips(bad)


def test_the_repository_lists_are_consistent():
    """wheels.txt's packages are all absent from the device, pinned, and in a known stage."""
    device = packing.read_names(GPU / "device_packages.txt")
    assert {"torch", "timm", "numpy", "pillow", "pyyaml", "safetensors", "psutil", "nvidia-ml-py"} <= device
    stages = {}
    for line in (GPU / "wheels.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] != "skip":
            assert fields[0] in ("early", "late", "extra") and "==" in fields[1], line
            stages[packing.normalize(fields[1].split("==")[0])] = fields[0]
    assert not set(stages) & device
    assert stages["deepspeed"] == "early" and stages["pydantic"] == "early"  # the first call's DeepSpeed step
    assert stages["nvidia-dali-cuda130"] == "late"


def test_prune_keeps_only_what_python_3_12_loads(tmp_path):
    site = tmp_path / "site"
    (site / "pkg" / "include" / "x").mkdir(parents=True)
    keep = ["pkg/a.cpython-312-x86_64-linux-gnu.so", "pkg/b.abi3.so", "pkg/libfoo.so.1", "pkg/__init__.py",
            "pkg/notinclude.h"]
    drop = ["pkg/a.cpython-311-x86_64-linux-gnu.so", "pkg/a.cpython-313t-x86_64-linux-gnu.so",
            "pkg/a.cpython-312t-x86_64-linux-gnu.so", "pkg/include/x/y.h", "pkg/include/z.hpp"]
    for name in keep + drop:
        (site / name).write_bytes(b"0" * 10)
    assert packing.prune(site) == 10 * len(drop)
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()) == sorted(keep)


# ---------------------------------------------------------------- check scripts' pieces


def test_the_dali_placeholder_lets_the_trainer_import_without_dali(tmp_path):
    """The first device call has DeepSpeed but no DALI yet: fatscale.train must still import."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nvidia.dali' or name.startswith('nvidia.dali.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from common import dali_placeholder\n"
            "assert dali_placeholder()\n"
            "from fatscale.train import components, trainer\n"
            "from fatscale.config import load_recipe\n"
            "r = load_recipe(sys.argv[2], check_shards=False)\n"
            "print(components.deepspeed_config(r, 1)['torch_autocast'], r.model.name)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "-c", code, str(GPU), str(REPO / "recipes" / "fat_b0_300ep.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "{'enabled': True, 'dtype': 'bfloat16'} fat_b0" in done.stdout


def test_summarize_reads_the_benchmarks_output(tmp_path):
    env = dict(os.environ, FATSCALE_GPU_RESULTS=str(tmp_path / "results.jsonl"))
    speed = tmp_path / "speed.log"
    # the lines benchmarks/model_speed.py and loader_speed.py print (their f-strings)
    speed.write_text("device=cuda torch=2.11.0 ...\n"
                     "fat_b0 train  release attention, eager (baseline)          2000.0 img/s  x1.00  peak 9.10 GiB\n"
                     "fat_b0 train  fatscale SDPA, eager                          3000.0 img/s  x1.50  peak 8.00 GiB\n"
                     "fat_b0 train  fatscale SDPA, torch.compile                  5000.0 img/s  x2.50  peak 6.00 GiB\n"
                     "fat_b0 infer  fatscale SDPA, torch.compile                 15000.0 img/s  x3.00\n")
    loader = tmp_path / "loader.log"
    loader.write_text("2240 images, batch 128, ...\n"
                      "baseline (webdataset + PIL + timm, DataLoader)   1500.0 img/s\n"
                      "baseline, nearest RandAugment warps              1700.0 img/s\n"
                      "fatscale (DALI TrainLoader)                      6000.0 img/s   x4.00 (x3.53 against nearest warps)\n")
    for command in (["model-speed", str(speed)], ["loader-speed", str(loader)], ["report"]):
        done = subprocess.run([sys.executable, str(GPU / "summarize.py"), *command], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "speed_fat_b0_train_compiled" in done.stdout and "5000 img/s" in done.stdout
    assert "x1.20: loader 6000 img/s / FAT-B0 compiled training 5000 img/s (keeps up)" in done.stdout
    assert "6 passed, 0 failed, 0 skipped" in done.stdout
    empty = tmp_path / "empty.log"
    empty.write_text("Traceback ...\n")
    assert subprocess.run([sys.executable, str(GPU / "summarize.py"), "model-speed", str(empty)], env=env,
                          capture_output=True).returncode == 1


# ---------------------------------------------------------------- the whole session, on CPU


@pytest.mark.slow
def test_the_device_session_dry_runs_on_cpu(tmp_path, fake_parts):
    """run.sh as the device calls it, p01 then p02, p03 (the last required part): the parts are
    stored and installed, and every check runs at tiny sizes on CPU operators, gloo and CPU
    torch: the DeepSpeed step, checkpoint round trip and SyncBatchNorm (skipped without a GPU),
    the background compile, DALI decoding and label alignment, the demo to a top-1 in MLflow,
    the model and loader benchmarks, the data-wait run."""
    need("bash", "timeout", "setsid", "tar")
    parts, _ = fake_parts
    root = tmp_path / "root"
    first = run_sh("p01", root=root, parts=parts)
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-6000:]
    assert "GPUCHECK env PASS" in log and "GPUCHECK train_step PASS" in log and "GPUCHECK checkpoint PASS" in log
    assert "GPUCHECK syncbn_convert SKIP" in log and "GPUCHECK site_requirements PASS" in log
    assert "precompile: started in the background" in log
    assert "parts still to send: p02, p03" in log and "GPUCHECK decode_auto" not in log and "== e2e" not in log
    second = run_sh("p02", root=root, parts=parts)  # late complete: the demo runs, not yet DALI's checks
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    assert "GPUCHECK e2e_demo PASS" in log and "GPUCHECK decode_auto" not in log
    third = run_sh("p03", root=root, parts=parts)
    assert third.returncode == 0, (third.stdout + third.stderr)[-8000:]
    log = "\n".join(r.stdout + r.stderr for r in (first, second, third))  # speed runs in p02's call or p03's
    for line in ("GPUCHECK decode_auto PASS", "GPUCHECK val_decode PASS", "GPUCHECK val_labels PASS",
                 "GPUCHECK train_labels PASS", "GPUCHECK speed_fat_b0_train_eager PASS",
                 "GPUCHECK loader_speed PASS", "GPUCHECK data_wait PASS"):
        assert line in log, line
    assert "== resolution: exit 0" in log and "fat_b0 fast recipe: 300 epochs" in log  # the projection printed
    summary = (root / "out" / "summary.txt").read_text()
    assert "precompile" in summary and " 0 failed" in summary, summary
    assert sorted(p.name for p in (root / "out").iterdir()) == ["logs.tar.gz", "results.jsonl", "run.log", "summary.txt"]
    # a rerun of one check, with no part
    again = run_sh("-", "dali", root=root, parts=parts)
    assert again.returncode == 0 and "GPUCHECK train_labels PASS" in again.stdout
