"""Hostile input for data_prep/make_shards.py, run as real processes (the CLI a long job runs).

A seeded fuzz tree of broken files among real JPEGs, hand-made malformed shards for
``--verify``, and a real out-of-memory failure under ``RLIMIT_AS``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from fatscale.data import shard_format
from fatscale.data.manifest import ShardInfo, load_manifest, write_manifest
from fatscale.prep import make_shards
from fatscale.prep.state import STATE_DIR
from test_make_shards import HOSTILE_13, WNIDS, flip, jpeg_bytes, read_samples, scan_start, write

REPO = Path(__file__).resolve().parents[1]


def make_shards_cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python data_prep/make_shards.py ARGS`` (``prefix``: python code run before it, as -c)."""
    cmd = [sys.executable, *prefix] if prefix else [sys.executable, "data_prep/make_shards.py"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*cmd, *args, "--quiet"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def assert_no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


# --- the fuzz tree ---------------------------------------------------------------------------


def real_jpegs(rng: random.Random, n: int) -> list[bytes]:
    """Distinct JPEGs from Pillow: mostly baseline, some with restart markers, progressive or gray."""
    out = []
    for i in range(n):
        w, h = rng.randrange(24, 97), rng.randrange(24, 97)
        kw = {"quality": rng.choice([60, 75, 90, 95])}
        if i % 10 == 3:
            kw["progressive"] = True
        if i % 10 == 7:
            kw["restart_marker_blocks"] = 2  # DRI + RSTn markers in the scan
        out.append(jpeg_bytes(w, h, mode="L" if i % 10 == 5 else "RGB", seed=1000 + i, **kw))
    return out


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_sof_size(jpg: bytes, w: int, h: int) -> bytes:
    sof = max(jpg.find(b"\xff\xc0"), jpg.find(b"\xff\xc2"))  # baseline or progressive: one is there
    return jpg[:sof + 5] + struct.pack(">HH", h, w) + jpg[sof + 9:]


def segments(jpg: bytes) -> list[bytes]:
    """The header segments, SOS included."""
    out, i = [], 2
    while not out or out[-1][1] != 0xDA:
        out.append(jpg[i:i + 2 + int.from_bytes(jpg[i + 2:i + 4], "big")])
        i += len(out[-1])
    return out


def hostile(rng: random.Random, jpg: bytes) -> tuple[str, bytes]:
    """One hostile file made from a real JPEG: (kind, bytes)."""
    start = scan_start(jpg)
    markers = [0xD8, 0xD9, 0xDA, 0xC0, 0xC4, 0xDB, 0xDD, 0xE0, 0xE1, 0xFE, 0xD0, 0x01, 0x00, 0xFF]
    with_length = [0xDA, 0xC0, 0xC4, 0xDB, 0xDD, 0xE0, 0xE1, 0xFE]
    kind = rng.choice(["truncated", "header bit flip", "scan bit flip", "bit flips", "bare markers",
                       "repeated segment", "garbage after SOI", "zero-length segment", "absurd size",
                       "not an image", "PNG with absurd size", "marker in the scan"])
    if kind == "truncated":
        return kind, jpg[:rng.randrange(1, len(jpg))]
    if kind == "header bit flip":
        return kind, flip(jpg, rng.randrange(2, start), rng.randrange(8))
    if kind == "scan bit flip":
        return kind, flip(jpg, rng.randrange(start, len(jpg)), rng.randrange(8))
    if kind == "bit flips":
        for _ in range(rng.randrange(2, 20)):
            jpg = flip(jpg, rng.randrange(len(jpg)), rng.randrange(8))
        return kind, jpg
    if kind == "bare markers":
        return kind, b"\xff\xd8" + b"".join(bytes([0xFF, rng.choice(markers)]) for _ in range(rng.randrange(1, 40)))
    if kind == "repeated segment":  # a second frame header, scan header, table...
        seg = rng.choice(segments(jpg))
        i = jpg.index(seg)
        return kind, jpg[:i] + seg * rng.randrange(2, 5) + jpg[i + len(seg):]
    if kind == "garbage after SOI":
        return kind, jpg[:2] + rng.randbytes(rng.randrange(1, 200)) + jpg[2:]
    if kind == "zero-length segment":
        return kind, jpg[:2] + bytes([0xFF, rng.choice(with_length)]) + b"\x00" * rng.randrange(0, 3) + jpg[2:]
    if kind == "absurd size":
        return kind, with_sof_size(jpg, *rng.choice([(65535, 65535), (65535, 1), (1, 65535), (0, 48), (64, 0),
                                                     (65500, 65500), (40000, 40000)]))
    if kind == "not an image":
        return kind, rng.choice([b"", b"<html>404 Not Found</html>\n" * rng.randrange(1, 50),
                                 rng.randbytes(rng.randrange(1, 5000)), HOSTILE_13, b"\xff\xd8", b"\xff\xd8\xff"])
    if kind == "PNG with absurd size":
        ihdr = struct.pack(">IIBBBBB", rng.choice([2**31 - 1, 100_000, 1]), rng.choice([2**31 - 1, 100_000]),
                           8, 2, 0, 0, 0)
        return kind, b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    # a marker where the scan should hold only stuffed FF 00 and restart markers
    i = rng.randrange(start, len(jpg) - 2)
    return kind, jpg[:i] + bytes([0xFF, rng.choice(markers)]) + jpg[i:]


def test_hostile_files_never_crash_a_run_and_are_each_kept_or_listed(tmp_path):
    rng = random.Random(20261123)
    reals = real_jpegs(rng, 40)
    src = tmp_path / "src"
    expected_label: dict[str, int] = {}  # source path (as in the manifest) -> label
    real_paths, kinds = set(), {}
    for i, data in enumerate(reals):
        label = i % len(WNIDS)
        rel = f"{WNIDS[label]}/real_{i:03d}.JPEG"
        write(src / "train" / rel, data)
        expected_label[rel] = label
        real_paths.add(rel)
    for i in range(300):
        kind, data = hostile(rng, rng.choice(reals))
        label = rng.randrange(len(WNIDS))
        rel = f"{WNIDS[label]}/hostile_{i:03d}.JPEG"
        write(src / "train" / rel, data)
        expected_label[rel], kinds[rel] = label, kind
    assert len(set(kinds.values())) == 12
    out = tmp_path / "out"
    r = make_shards_cli("--src", str(src), "--out", str(out), "--workers", "2", "--samples-per-shard", "60")
    assert_no_traceback(r)
    assert r.returncode == 0, r.stderr[-3000:]

    m = load_manifest(out)
    samples = read_samples(out, "train")
    kept = [s["meta"]["source"] for s in samples]
    skipped = {k.path.removeprefix("train/"): k.reason for k in m.splits["train"].skipped}
    assert len(kept) == len(set(kept)) and not set(kept) & set(skipped)  # each file once
    assert set(kept) | set(skipped) == set(expected_label)  # none lost
    assert real_paths <= set(kept)
    for s in samples:  # labels are the folders', hostile files that decode included
        assert s["label"] == expected_label[s["meta"]["source"]]
    assert all(reason.strip() for reason in skipped.values())
    assert 50 < len(skipped) < 300  # most hostile files are skipped, some bit flips survive
    assert f"{len(skipped)} skipped" in r.stdout

    r = make_shards_cli("--verify", str(out))  # every kept sample decodes as a baseline RGB JPEG
    assert_no_traceback(r)
    assert r.returncode == 0 and "verify: OK" in r.stdout, r.stdout[-3000:]


# --- --verify on malformed shards ------------------------------------------------------------


def member(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.size = kind, link, len(data) if data is not None else 0
    return ti, data


def tar_bytes(members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_verify_reports_each_malformed_shard_in_one_line(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        write(src / "train" / WNIDS[0] / f"{i}.JPEG", jpeg_bytes(seed=i))
    out = tmp_path / "out"
    make_shards(src, out, workers=1, progress=False, log=None)
    good = read_samples(out, "train")[0]
    keys = itertools.count(90_000_000)  # unique in the split

    def sample(cls=good["cls"], jpg=good["jpg"], meta=good["json"], parts=("cls", "jpg", "json")) -> list:
        key = f"{next(keys):08d}_x"
        return [member(f"{key}.{ext}", {"cls": cls, "jpg": jpg, "json": meta}[ext]) for ext in parts]

    linked, doubled, a, b = sample(), sample(), sample(), sample()
    absent, directory, fifo = object(), object(), object()

    def case(tar, count, line, index=None):
        """tar: bytes, None (no file) or directory; index: bytes, None (the tar's own), absent or fifo."""
        return tar, count, line, index

    cases = {  # what the one line about the shard says
        "directory": case(tar_bytes(sample() + [member("d", kind=tarfile.DIRTYPE)]), 1, "member d is a directory"),
        "fifo": case(tar_bytes(sample() + [member("90000099_f.jpg", kind=tarfile.FIFOTYPE)]), 1, "is a FIFO"),
        "char device": case(tar_bytes(sample() + [member("c.jpg", kind=tarfile.CHRTYPE)]), 1,
                            "member c.jpg is a character device"),
        "block device": case(tar_bytes(sample() + [member("b.jpg", kind=tarfile.BLKTYPE)]), 1,
                             "member b.jpg is a block device"),
        "dangling symlink": case(tar_bytes(sample() + [member("s.jpg", kind=tarfile.SYMTYPE, link="nowhere")]), 1,
                                 "member s.jpg is a symbolic link"),
        "dangling hardlink": case(tar_bytes(sample() + [member("h.jpg", kind=tarfile.LNKTYPE, link="nowhere")]), 1,
                                  "member h.jpg is a hard link"),
        "symlink to a member": case(tar_bytes(linked + [member("l.jpg", kind=tarfile.SYMTYPE,
                                                               link=linked[1][0].name)]),
                                    1, "member l.jpg is a symbolic link"),
        "truncated in a member": case(tar_bytes(sample())[:3 * 512 + 100], 1, "not a readable tar"),  # in the jpg
        "truncated in a header": case(tar_bytes(sample())[:100], 1, "not a readable tar"),
        "not a tar": case(b"<html>404 Not Found</html>\n" * 100, 1, "not a readable tar"),
        "empty": case(b"", 1, "not a readable tar"),
        "non-UTF-8 member name": case(tar_bytes(sample() + [member(os.fsdecode(b"\xff\xfe.jpg"), b"x")]), 1,
                                      "member \\udcff\\udcfe.jpg is not named <key>.cls/.jpg/.json"),
        "absurd member name": case(tar_bytes(sample() + [member("x" * 5000 + ".jpg", b"x")]), 1, "member xxxxxxxxxx"),
        "no cls": case(tar_bytes(sample(parts=("jpg", "json"))), 1, "has ['jpg', 'json'], expected cls, jpg, json"),
        "no json": case(tar_bytes(sample(parts=("cls", "jpg"))), 1, "has ['cls', 'jpg'], expected cls, jpg, json"),
        "json not an object": case(tar_bytes(sample(meta=b"[1, 2]")), 1, "json is not an object"),
        "json nested too deep": case(tar_bytes(sample(meta=b"[" * 100_000)), 1, "json does not parse"),
        "member twice": case(tar_bytes(doubled + doubled[1:2]), 1, f"member {doubled[1][0].name} appears twice"),
        "members apart": case(tar_bytes(a[:1] + b + a[1:]), 2,
                              f"sample {a[0][0].name[:-4]}: its members are not adjacent"),
        "missing shard": case(None, 1, ": missing"),
        "shard is a directory": case(directory, 1, "not a regular file"),
        "index disagrees": case(tar_bytes(sample()), 1, "does not match the tar", b"v1.2 1\ncls 512 1 x.cls\n"),
        "index not UTF-8": case(tar_bytes(sample()), 1, "does not match the tar", b"\xff\xfe\n"),
        "index missing": case(tar_bytes(sample()), 1, "missing", absent),
        "index is a FIFO": case(tar_bytes(sample()), 1, "is not a regular file", fifo),  # no hang
    }
    m = load_manifest(out)
    split = m.splits["train"]
    expect = {}
    for i, (name, (tar, count, line, index)) in enumerate(cases.items()):
        path, idx = f"train-{100 + i:06d}.tar", f"train-{100 + i:06d}.idx"
        if tar is directory:
            (out / path).mkdir()
        elif tar is not None:
            write(out / path, tar)
        if index is None:
            try:
                index = shard_format.index_from_tar(out / path).encode("utf-8", "surrogateescape")
            except (tarfile.TarError, OSError):
                index = b"v1.2 0\n"
        if index is fifo:
            os.mkfifo(out / idx)
        elif index is not absent:
            write(out / idx, index)
        data = tar if isinstance(tar, bytes) else b""
        split.shards.append(ShardInfo(path, idx, count, len(data), hashlib.sha256(data).hexdigest()))
        expect[path] = (name, line)
    split.num_samples = sum(sh.num_samples for sh in split.shards)
    split.num_source_files = split.num_samples + len(split.skipped)
    write_manifest(out, m)

    r = make_shards_cli("--verify", str(out), "--workers", "2")
    assert_no_traceback(r)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[-1].startswith(f"make_shards: verify: FAILED, {len(expect)} problem(s)"), r.stdout
    for path, (name, line) in expect.items():
        mine = [ln for ln in lines if f" train/{path}: " in ln]
        assert len(mine) == 1 and line in mine[0], (name, mine)
    assert len(lines) == len(expect) + 1  # the good shards: no line
    assert all(len(ln) < 300 for ln in lines)


# --- out of memory ---------------------------------------------------------------------------

# make_shards under an address-space limit just above what it has mapped once imported: small
# images fit, a 6000x4000 PNG (72 MB decoded) or a 256 MB file does not: real MemoryErrors
OOM_PREFIX = """
import resource, sys
sys.path.insert(0, ".")
import fatscale.prep.cli as S, tqdm, PIL.Image, timm.data  # timm: the class names of wnids
PIL.Image.init()
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (40 << 20), resource.RLIM_INFINITY))
S.main(sys.argv[1:])
"""


@pytest.mark.parametrize("where", ["decoding", "reading"])
def test_out_of_memory_stops_the_run_naming_the_file_and_a_rerun_retries_it(tmp_path, where):
    src = tmp_path / "src"
    for i in range(6):
        write(src / "train" / WNIDS[i % 3] / f"{i}.JPEG", jpeg_bytes(40, 30, seed=i))
    if where == "decoding":
        big = src / "train" / WNIDS[1] / "big.png"
        Image.new("RGB", (6000, 4000), (30, 90, 150)).save(big)
    else:
        big = src / "train" / WNIDS[1] / "big.JPEG"
        with open(big, "wb") as f:
            f.truncate(256 << 20)  # sparse: no disk, but reading it takes the memory
    out = tmp_path / "out"
    args = ("--src", str(src), "--out", str(out), "--workers", "1", "--samples-per-shard", "2")
    r = make_shards_cli(*args, prefix=("-c", OOM_PREFIX))
    assert_no_traceback(r)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"make_shards: error: {big}: out of memory"), r.stderr
    assert "run the same command again to resume" in r.stderr
    assert not (out / "manifest.json").exists()
    records = [json.loads(p.read_text()) for p in (out / STATE_DIR).glob("*-*.json")]
    assert not any(k["path"].endswith(big.name) for rec in records for k in rec["skipped"])

    r = make_shards_cli(*args)  # no limit: the resume retries the file
    assert r.returncode == 0, r.stderr
    m = load_manifest(out)
    rel = f"{WNIDS[1]}/{big.name}"
    if where == "decoding":  # kept
        assert m.splits["train"].skipped == [] and m.splits["train"].num_samples == 7
        (s,) = [s for s in read_samples(out, "train") if s["meta"]["source"] == rel]
        assert (s["meta"]["width"], s["meta"]["height"]) == (6000, 4000)
    else:  # 256 MB of zeros: now listed with what is wrong with it
        assert [(k.path, k.reason) for k in m.splits["train"].skipped] == [
            (f"train/{rel}", "cannot decode (not an image format Pillow knows)")]


# files make_shards writes limited to 16 kB: EFBIG (SIGXFSZ ignored), as a full disk gives ENOSPC
FSIZE_PREFIX = """
import resource, signal, sys
sys.path.insert(0, ".")
import fatscale.prep.cli as S
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))
S.main(sys.argv[1:])
"""


def test_a_full_disk_stops_the_run_naming_the_shard_and_a_rerun_finishes(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        write(src / "train" / WNIDS[i % 3] / f"{i}.JPEG", jpeg_bytes(96, 96, seed=i))  # ~10 kB each
    out = tmp_path / "out"
    args = ("--src", str(src), "--out", str(out), "--workers", "1", "--samples-per-shard", "3")
    r = make_shards_cli(*args, prefix=("-c", FSIZE_PREFIX))
    assert_no_traceback(r)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (f"make_shards: error: cannot write train-000000 in {out}: File too large; "
                        f"run the same command again to resume\n")
    assert not list((out / STATE_DIR).glob("train-*.json")) and not list(out.glob("*.tar"))
    r = make_shards_cli(*args)
    assert r.returncode == 0, r.stderr
    assert load_manifest(out).splits["train"].num_samples == 6
