"""data_prep/make_shards.py: ImageNet trees to WebDataset shards (fatscale.prep).

Most tests build tiny synthetic ImageFolder trees with Pillow in tmp_path; the ones marked
``real`` use ../shared/data/imagenet-sample when it is there and skip otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fatscale.data import shard_format
from fatscale.prep import RunStopped, cli, encode, make, make_shards, verify, verify_shards
from fatscale.prep.build import WorkerDied, run_tasks
from fatscale.prep.encode import EncodeOptions
from fatscale.prep.jpeg import inspect_jpeg
from fatscale.prep.labels import class_names_for
from fatscale.prep.plan import PlannedSample, ShardTask, cut_shards
from fatscale.prep.state import STATE_DIR
from fatscale.data.manifest import ManifestError, load_manifest

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "imagenet-sample"
WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark


# --- helpers ---------------------------------------------------------------------------------


def jpeg_bytes(w=40, h=30, mode="RGB", seed=0, fmt="JPEG", **save) -> bytes:
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, ch) if ch > 1 else (h, w), dtype=np.uint8)
    im = Image.fromarray(arr, mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tree(root: Path, per_class=4, val_per_class=2, classes=WNIDS) -> Path:
    """root/train/<wnid>/<wnid>_<i>.JPEG and root/val/<wnid>/..., distinct random RGB JPEGs."""
    seed = 0
    for c in classes:
        for i in range(per_class):
            seed += 1
            write(root / "train" / c / f"{c}_{i}.JPEG", jpeg_bytes(32 + i, 24 + i, seed=seed))
        for i in range(val_per_class):
            seed += 1
            write(root / "val" / c / f"ILSVRC2012_val_{c}_{i}.JPEG", jpeg_bytes(30, 20 + i, seed=seed))
    return root


def run(src, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    return make_shards(src, out, **kw)


def read_samples(out: Path, split: str) -> list[dict]:
    """Samples of every shard of ``split`` in manifest order, read with tarfile."""
    m = load_manifest(out)
    samples = []
    for sh in m.splits[split].shards:
        with tarfile.open(out / sh.path) as tf:
            cur: dict = {}
            for mem in tf:
                key, _, ext = mem.name.partition(".")
                if cur and cur["key"] != key:
                    samples.append(cur)
                    cur = {}
                cur["key"] = key
                cur["shard"] = sh.path
                cur[ext] = tf.extractfile(mem).read()
            if cur:
                samples.append(cur)
    for s in samples:
        s["label"] = int(s["cls"].decode("ascii"))
        s["meta"] = json.loads(s["json"])
    return samples


def file_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.is_file()}


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--quiet", "--workers", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_shards: error: "), err
    return err.strip()


# --- the round trip --------------------------------------------------------------------------


def test_pass_through_round_trip_labels_manifest(tmp_path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    m = run(src, out, samples_per_shard=5)
    assert m.classes == WNIDS
    assert m.class_names[0].startswith("tench") and m.class_names[1].startswith("goldfish")

    disk = load_manifest(out)
    assert disk.to_dict() == m.to_dict()
    for split, n in (("train", 12), ("val", 6)):
        info = disk.splits[split]
        assert info.num_samples == n and info.num_source_files == n and info.skipped == []
        assert [sh.num_samples for sh in info.shards] == ([5, 5, 2] if split == "train" else [5, 1])
        for i, sh in enumerate(info.shards):
            assert sh.path == f"{split}-{i:06d}.tar" and sh.index == f"{split}-{i:06d}.idx"
            data = (out / sh.path).read_bytes()
            assert len(data) == sh.bytes and hashlib.sha256(data).hexdigest() == sh.sha256
        samples = read_samples(out, split)
        assert len(samples) == n and len({s["key"] for s in samples}) == n
        for s in samples:
            assert "." not in s["key"]
            meta = s["meta"]
            assert set(meta) == {"wnid", "source", "width", "height", "changes"}
            assert m.classes[s["label"]] == meta["wnid"] == meta["source"].split("/")[0]
            orig = (src / split / meta["source"]).read_bytes()
            assert s["jpg"] == orig and meta["changes"] == []  # untouched pass-through
            with Image.open(io.BytesIO(s["jpg"])) as im:
                assert im.mode == "RGB" and im.size == (meta["width"], meta["height"])
    # val keeps the sorted order, train is the seeded shuffle of it
    val_sources = [s["meta"]["source"] for s in read_samples(out, "val")]
    assert val_sources == sorted(val_sources)
    train_sources = [s["meta"]["source"] for s in read_samples(out, "train")]
    expect = sorted(train_sources)
    random.Random(0).shuffle(expect)
    assert train_sources == expect != sorted(train_sources)
    assert not (out / "train-000003.tar").exists()


def test_shuffle_mixes_classes_and_follows_the_seed(tmp_path):
    src = make_tree(tmp_path / "src", per_class=8, val_per_class=0, classes=[f"c{i}" for i in range(4)])
    a = run(src, tmp_path / "a", samples_per_shard=8, seed=0)
    b = run(src, tmp_path / "b", samples_per_shard=8, seed=1)
    run(src, tmp_path / "a2", samples_per_shard=8, seed=0)
    by_shard: dict[str, set] = {}
    for s in read_samples(tmp_path / "a", "train"):
        by_shard.setdefault(s["shard"], set()).add(s["label"])
    assert len(by_shard) == 4 and all(len(labels) >= 2 for labels in by_shard.values())
    assert [s.sha256 for s in a.splits["train"].shards] != [s.sha256 for s in b.splits["train"].shards]
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "a2")
    assert a.class_names == ["c0", "c1", "c2", "c3"]  # not wnids: names are the folder names


def test_shard_size_bound_is_greedy_and_respected(tmp_path):
    src = make_tree(tmp_path / "src", per_class=6, val_per_class=0)
    sizes = sorted(p.stat().st_size for p in (src / "train").rglob("*.JPEG"))
    bound = 4 * shard_format.sample_tar_bytes(sizes[-1])  # 4 to 6 samples per shard
    m = run(src, tmp_path / "out", shard_size_mb=bound / 1e6)
    shards = m.splits["train"].shards
    assert len(shards) >= 3 and sum(s.num_samples for s in shards) == 18
    samples = read_samples(tmp_path / "out", "train")
    est = [shard_format.sample_tar_bytes(len(s["jpg"]), len(s["json"])) for s in samples]
    i = 0
    for k, sh in enumerate(shards):
        in_shard = sum(est[i:i + sh.num_samples])
        assert in_shard <= bound
        if k + 1 < len(shards):  # greedy: the next sample would not have fitted
            assert in_shard + est[i + sh.num_samples] > bound
        # the manifest's byte count is the tar's exact layout: samples + end blocks + padding
        assert sh.bytes == in_shard + len(shard_format._tar_end(in_shard)) and sh.bytes % shard_format.TAR_RECORD == 0
        i += sh.num_samples


def test_cut_shards():
    assert cut_shards([5, 5, 5, 5, 5], 10, None) == [range(0, 2), range(2, 4), range(4, 5)]
    assert cut_shards([20, 1, 1], 10, None) == [range(0, 1), range(1, 3)]  # oversize sample alone
    assert cut_shards([1] * 7, None, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert cut_shards([4] * 6, 10, 2) == [range(0, 2), range(2, 4), range(4, 6)]


# --- real-world quirks -----------------------------------------------------------------------


def _quirk_tree(root: Path) -> dict[str, str]:
    """One file per quirk in train/<wnid>/; returns file name -> expected change."""
    c = WNIDS[0]
    d = root / "train" / c
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "plain.JPEG": (jpeg_bytes(seed=1), None),
        "lower.jpg": (jpeg_bytes(seed=2), None),
        "mixed.Jpeg": (jpeg_bytes(seed=3), None),
        "gray.JPEG": (jpeg_bytes(mode="L", seed=4), "grayscale JPEG"),
        "cmyk.JPEG": (jpeg_bytes(mode="CMYK", seed=5), "CMYK JPEG"),
        "progressive.JPEG": (jpeg_bytes(seed=6, progressive=True), "progressive JPEG"),
        "png_named.JPEG": (jpeg_bytes(seed=7, fmt="PNG"), "PNG file"),
        "alpha.png": (jpeg_bytes(mode="RGBA", seed=8, fmt="PNG"), "PNG file"),
        "rotated.JPEG": (jpeg_bytes(48, 24, seed=9, exif=exif.tobytes()), "EXIF orientation reset"),
    }
    for name, (data, _) in files.items():
        write(d / name, data)
    write(root / "train" / WNIDS[1] / "other.JPEG", jpeg_bytes(seed=10))
    return {name: why for name, (_, why) in files.items()}


def test_quirks_become_baseline_rgb_jpegs(tmp_path):
    expected = _quirk_tree(tmp_path / "src")
    m = run(tmp_path / "src", tmp_path / "out")
    samples = {s["meta"]["source"].split("/")[-1]: s for s in read_samples(tmp_path / "out", "train")}
    assert set(samples) == set(expected) | {"other.JPEG"}
    assert m.splits["train"].skipped == []
    for name, why in expected.items():
        s = samples[name]
        info = inspect_jpeg(s["jpg"])
        assert info is not None and info.fast_path_blocker() is None, (name, info)
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive")
            im.load()
            assert im.size == (s["meta"]["width"], s["meta"]["height"])  # no resize here
        orig = (tmp_path / "src" / "train" / WNIDS[0] / name).read_bytes()
        assert s["meta"]["changes"] == ([why] if why else []), name
        if why is None:
            assert s["jpg"] == orig
    # the orientation fix touches two bytes and no pixel
    rot, orig = samples["rotated.JPEG"]["jpg"], (tmp_path / "src/train" / WNIDS[0] / "rotated.JPEG").read_bytes()
    assert len(rot) == len(orig) and sum(a != b for a, b in zip(rot, orig)) == 1
    with Image.open(io.BytesIO(rot)) as im:
        assert im.getexif().get(0x0112) == 1 and im.size == (48, 24)
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(io.BytesIO(orig))))
    # gray stays gray, CMYK converts like Pillow's own conversion (within JPEG loss)
    g = np.asarray(Image.open(io.BytesIO(samples["gray.JPEG"]["jpg"]))).astype(int)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 2
    assert m.splits["train"].changes == {"CMYK JPEG": 1, "EXIF orientation reset": 1, "PNG file": 2,
                                         "grayscale JPEG": 1, "progressive JPEG": 1}


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 12), 40000, np.uint16)).save(buf, "PNG")
    write(src / "train" / "a" / "deep.png", buf.getvalue())
    run(src, tmp_path / "out")
    (s,) = read_samples(tmp_path / "out", "train")
    px = np.asarray(Image.open(io.BytesIO(s["jpg"])))
    assert px.shape == (10, 12, 3) and abs(px.mean() - 40000 / 257) < 2


def test_undecodable_files_are_skipped_with_reasons(tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=1)
    d = src / "train" / WNIDS[0]
    good = jpeg_bytes(200, 150, seed=3)
    write(d / "truncated.JPEG", good[: len(good) * 2 // 3])
    write(d / "garbage.JPEG", b"this is not an image at all" * 10)
    write(d / "empty.JPEG", b"")
    write(d / "README.txt", b"hello")
    (d / "dangling.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    write(src / "train" / "stray.JPEG", good)  # not inside a class folder
    m = make_shards(src, tmp_path / "out", workers=1, progress=False)
    reasons = {k.path: k.reason for k in m.splits["train"].skipped}
    p = f"train/{WNIDS[0]}/"
    assert set(reasons) == {p + "truncated.JPEG", p + "garbage.JPEG", p + "empty.JPEG", p + "README.txt",
                            p + "dangling.JPEG", "train/stray.JPEG"}
    assert "truncated" in reasons[p + "truncated.JPEG"] and "cannot decode" in reasons[p + "truncated.JPEG"]
    assert "cannot decode" in reasons[p + "garbage.JPEG"]
    assert reasons[p + "empty.JPEG"] == "empty file"
    assert reasons[p + "README.txt"] == "not an image file (extension .txt)"
    assert reasons[p + "dangling.JPEG"] == "broken symlink"
    assert reasons["train/stray.JPEG"] == "not inside a class folder"
    t = m.splits["train"]
    assert t.num_samples == 6 and t.num_source_files == 12 == t.num_samples + len(t.skipped)
    assert sum(1 for _ in read_samples(tmp_path / "out", "train")) == 6
    out = capsys.readouterr().out  # the summary lists them
    assert "6 skipped" in out and f"skipped {p}truncated.JPEG: truncated" in out


def test_shard_whose_files_are_all_bad_is_left_out(tmp_path):
    src = tmp_path / "src"
    write(src / "train" / "a" / "0.jpg", jpeg_bytes(seed=1))
    write(src / "train" / "a" / "1.jpg", b"broken")
    write(src / "train" / "b" / "2.jpg", jpeg_bytes(seed=2))
    m = run(src, tmp_path / "out", samples_per_shard=1, seed=0)
    assert m.splits["train"].num_samples == 2 and len(m.splits["train"].shards) == 2
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 2
    assert [k.path for k in m.splits["train"].skipped] == ["train/a/1.jpg"]
    assert verify_shards(tmp_path / "out", workers=1, progress=False, log=None) == []
    again = run(src, tmp_path / "out", samples_per_shard=1, seed=0)  # resume: nothing to redo
    assert again.to_dict() == m.to_dict()


def test_huge_images_are_downscaled_or_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "MAX_PIXELS", 1000)
    monkeypatch.setattr(encode, "HARD_MAX_PIXELS", 5000)
    src = tmp_path / "src"
    write(src / "train" / "a" / "big.JPEG", jpeg_bytes(64, 48, seed=1))  # 3072 px
    write(src / "train" / "a" / "huge.png", jpeg_bytes(100, 80, seed=2, fmt="PNG"))  # 8000 px
    write(src / "train" / "a" / "small.JPEG", jpeg_bytes(30, 20, seed=3))
    m = run(src, tmp_path / "out")
    s = {x["meta"]["source"]: x for x in read_samples(tmp_path / "out", "train")}
    with Image.open(io.BytesIO(s["a/big.JPEG"]["jpg"])) as im:
        assert im.width * im.height <= 1000 and abs(im.width / im.height - 64 / 48) < 0.1
    assert s["a/big.JPEG"]["meta"]["changes"] == ["huge image downscaled"]
    assert (s["a/big.JPEG"]["meta"]["width"], s["a/big.JPEG"]["meta"]["height"]) == (64, 48)
    assert s["a/small.JPEG"]["meta"]["changes"] == []
    assert [(k.path, k.reason) for k in m.splits["train"].skipped] == [
        ("train/a/huge.png", "image too large (100x80 pixels)")]


# --- hostile bytes, and failures that are not the file's ------------------------------------

HOSTILE_13 = b"\xff\xd8\xff" + b"\xff" * 10  # SOI, then fill bytes up to the end


def flip(data: bytes, i: int, bit: int) -> bytes:
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


def scan_start(jpg: bytes) -> int:
    """Offset of the entropy-coded data: just after the SOS segment."""
    sos = jpg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpg[sos + 2:sos + 4], "big")


def test_inspect_jpeg_never_raises_and_broken_headers_never_pass():
    good = jpeg_bytes(64, 48, seed=1)
    assert inspect_jpeg(good).fast_path_blocker() is None
    hostile = [
        HOSTILE_13, b"\xff\xd8\xff", b"\xff\xd8\xff\xc4", b"\xff\xd8\xff\xc0\x00",
        b"\xff\xd8" + b"\xff\xe0\x00\x00" * 3,  # zero-length segments
        b"\xff\xd8" + b"\xff\xd0" * 50,  # bare markers up to the end
        b"\xff\xd8\xff\xd8\xff\xd9", b"\xff\xd8\xff\x00\x00\x10" + bytes(100),
        good[:2] + b"garbage" + good[2:],
        good.replace(b"\xff\xda\x00\x0c", b"\xff\xda\x00\x02", 1),  # SOS without its header
        good.replace(b"\xff\xc0\x00\x11", b"\xff\xc0\x00\x0b", 1),  # SOF shorter than its components
    ]
    hostile += [good[:i] for i in range(3, len(good))]  # every truncation
    for data in hostile:
        info = inspect_jpeg(data)
        assert info is None or info.fast_path_blocker() is not None, data[:40]


def test_bytes_that_pass_through_untouched_decode():
    """Pass-through bytes are not decoded (without --decode-check), so the marker check must
    refuse whatever Pillow or libjpeg would: every bit of the headers flipped, bits of the scan
    flipped, a marker inside the scan, any marker before the headers. Flips of values
    (quantization, pixels) still pass."""
    good = jpeg_bytes(64, 48, seed=1, quality=90)
    start = scan_start(good)
    rng = random.Random(0)
    variants = [flip(good, i, b) for i in range(start) for b in range(8)]
    variants += [flip(good, rng.randrange(start, len(good) - 2), rng.randrange(8)) for _ in range(300)]
    stuffed = [i for i in range(start, len(good) - 2) if good[i:i + 2] == b"\xff\x00"]
    variants += [good[:i + 1] + bytes([m]) + good[i + 2:] for i in stuffed for m in (0xC4, 0xDB, 0xD8, 0xDA)]
    variants += [good[:2] + bytes([0xFF, m]) + good[2:] for m in range(256)]  # any marker after SOI
    passed = 0
    for v in variants:
        info = inspect_jpeg(v)
        if info is not None and info.fast_path_blocker() is None:
            passed += 1
            with Image.open(io.BytesIO(v)) as im:
                im.load()
    assert passed > 300


def test_the_13_byte_file_is_skipped_with_its_reason(tmp_path):
    src = make_tree(tmp_path / "src", per_class=1, val_per_class=0)
    write(src / "train" / WNIDS[0] / "x.JPEG", HOSTILE_13)
    m = run(src, tmp_path / "out")
    ((path, reason),) = [(k.path, k.reason) for k in m.splits["train"].skipped]
    assert path == f"train/{WNIDS[0]}/x.JPEG"
    assert reason.startswith("truncated JPEG") and "cannot decode" in reason
    assert m.splits["train"].num_samples == 3


BYTES_FAULTS = {  # what parsers and Pillow raise on bad bytes, by the name a skip reason gives
    "IndexError": IndexError("index out of range"), "ValueError": ValueError("bad value"),
    "struct.error": struct.error("unpack requires a buffer of 4 bytes"), "SyntaxError": SyntaxError("broken PNG file"),
    "ZeroDivisionError": ZeroDivisionError("division by zero"),
    "PIL.Image.DecompressionBombError": Image.DecompressionBombError("too many pixels"),
}


@pytest.mark.parametrize("mode", [{}, {"max_side": 20, "shard_size_mb": 1}], ids=["pass-through", "re-encode"])
@pytest.mark.parametrize("name", BYTES_FAULTS)
def test_any_failure_caused_by_a_files_bytes_skips_that_file(tmp_path, monkeypatch, name, mode):
    """The per-file boundary, for failures no parser fix foresaw (also during calibration)."""
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=0)
    bad = write(src / "train" / WNIDS[1] / "bad.JPEG", jpeg_bytes(seed=99)).read_bytes()
    inspect = inspect_jpeg

    def failing_inspect(data):
        if data == bad:
            raise BYTES_FAULTS[name]
        return inspect(data)

    monkeypatch.setattr(encode, "inspect_jpeg", failing_inspect)
    m = run(src, tmp_path / "out", **mode)
    assert [(k.path, k.reason) for k in m.splits["train"].skipped] == [
        (f"train/{WNIDS[1]}/bad.JPEG", f"cannot decode ({name}: {BYTES_FAULTS[name]})")]
    assert m.splits["train"].num_samples == 6


@pytest.mark.parametrize("fault", ["vanished", "OSError"])
def test_a_failure_that_is_not_the_files_stops_the_run_and_a_rerun_retries_the_file(
        tmp_path, monkeypatch, capsys, fault):
    """Reading the file fails, or the OS fails the decoder (an errno); out of memory, for real,
    is in test_shards_fuzz.py."""
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=0)
    victim = write(src / "train" / WNIDS[1] / "victim.png", jpeg_bytes(77, 55, seed=5, fmt="PNG"))
    data, rel = victim.read_bytes(), f"train/{WNIDS[1]}/victim.png"
    if fault == "vanished":  # a real read error: the file goes away between the scan and the read
        scan = make.scan_source

        def scan_then_remove(*a, **kw):
            found = scan(*a, **kw)
            victim.unlink()
            return found

        monkeypatch.setattr(make, "scan_source", scan_then_remove)
    else:
        load = ImageFile.ImageFile.load

        def failing_load(im):
            if im.size == (77, 55):
                raise OSError(errno.EIO, "Input/output error")
            return load(im)

        monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)
    out = tmp_path / "out"
    argv = ["--src", str(src), "--out", str(out), "--quiet", "--workers", "1", "--samples-per-shard", "2"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_shards: error: "), err
    assert str(victim) in err and "run the same command again" in err
    assert not (out / "manifest.json").exists()
    records = [json.loads(p.read_text()) for p in (out / STATE_DIR).glob("*-*.json")]
    assert all(k["path"] != rel for r in records for k in r["skipped"])  # not recorded as done
    monkeypatch.undo()
    victim.write_bytes(data)
    m = run(src, out, samples_per_shard=2)  # the resume retries it
    assert m.splits["train"].skipped == [] and m.splits["train"].num_samples == 7
    assert any(s["meta"]["source"] == rel.partition("/")[2] for s in read_samples(out, "train"))


def test_file_names_that_are_not_utf8(tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=1, val_per_class=0)
    d = os.fsencode(src / "train" / WNIDS[0])
    for name, data in ((b"caf\xe9.JPEG", jpeg_bytes(seed=50)), (b"\xff.JPEG", b"not an image")):
        with open(d + b"/" + name, "wb") as f:
            f.write(data)
    out = tmp_path / "out"
    cli.main(["--src", str(src), "--out", str(out), "--quiet", "--workers", "1"])
    assert f"skipped train/{WNIDS[0]}/\\udcff.JPEG: cannot decode" in capsys.readouterr().out
    m = load_manifest(out)
    assert [os.fsencode(k.path) for k in m.splits["train"].skipped] == [f"train/{WNIDS[0]}/".encode() + b"\xff.JPEG"]
    sources = [os.fsencode(s["meta"]["source"]) for s in read_samples(out, "train")]
    assert sources.count(WNIDS[0].encode() + b"/caf\xe9.JPEG") == 1 and len(sources) == 4
    assert verify_shards(out, workers=1, progress=False, log=None) == []


def test_symlinked_trees(tmp_path):
    real = make_tree(tmp_path / "real", per_class=2, val_per_class=0)
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "train" / WNIDS[0]).symlink_to(real / "train" / WNIDS[0])  # a linked class folder
    (src / "train" / WNIDS[1]).mkdir()
    for f in (real / "train" / WNIDS[1]).iterdir():  # linked files under other names
        (src / "train" / WNIDS[1] / ("link_" + f.name)).symlink_to(f)
    linked_root = tmp_path / "linked_root"
    linked_root.symlink_to(src)  # and the source root itself is a link
    m = run(linked_root, tmp_path / "out")
    sources = sorted(s["meta"]["source"] for s in read_samples(tmp_path / "out", "train"))
    assert sources == sorted([f"{WNIDS[0]}/{WNIDS[0]}_{i}.JPEG" for i in range(2)]
                             + [f"{WNIDS[1]}/link_{WNIDS[1]}_{i}.JPEG" for i in range(2)])
    assert m.classes == WNIDS[:2]


# --- flat val with a labels file -------------------------------------------------------------


def _flat_val(root: Path) -> dict[str, str]:
    make_tree(root, per_class=1, val_per_class=0)
    truth = {}
    for i in range(6):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        write(root / "val" / name, jpeg_bytes(seed=100 + i))
        truth[name] = WNIDS[(i * 2) % 3]
    return truth


def test_flat_val_with_kaggle_csv(tmp_path):
    truth = _flat_val(tmp_path / "src")
    lines = ["ImageId,PredictionString"] + [
        f"{Path(n).stem},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in reversed(list(truth.items()))]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    m = run(tmp_path / "src", tmp_path / "out", val_labels=tmp_path / "LOC_val_solution.csv")
    samples = read_samples(tmp_path / "out", "val")
    assert [s["meta"]["source"] for s in samples] == sorted(truth)  # stable order
    for s in samples:
        assert m.classes[s["label"]] == truth[s["meta"]["source"]] == s["meta"]["wnid"]


def test_flat_val_with_plain_list_of_wnids_and_indices(tmp_path):
    truth = _flat_val(tmp_path / "src")
    rows = [f"{n} {w if i % 2 else WNIDS.index(w)}" for i, (n, w) in enumerate(truth.items())]
    (tmp_path / "labels.txt").write_text("# file label\n" + "\n".join(rows) + "\n")
    run(tmp_path / "src", tmp_path / "out", val_labels=tmp_path / "labels.txt", splits=["val"])
    samples = read_samples(tmp_path / "out", "val")
    assert len(samples) == 6
    assert all(WNIDS[s["label"]] == truth[s["meta"]["source"]] for s in samples)
    assert not list((tmp_path / "out").glob("train-*"))


@pytest.mark.parametrize("case", ["missing_label", "no_file", "unknown_wnid", "bad_index", "malformed",
                                  "conflict", "no_labels_flag"])
def test_labels_file_mismatch_is_a_one_line_error(tmp_path, capsys, case):
    truth = _flat_val(tmp_path / "src")
    rows = [f"{n} {w}" for n, w in truth.items()]
    expect = {
        "missing_label": "no label for val/ILSVRC2012_val_00000006.JPEG",
        "no_file": "line 7: 'ILSVRC2012_val_00000099.JPEG' matches no file in",
        "unknown_wnid": "line 1: unknown class 'n99999999'",
        "bad_index": "line 1: class index 3 out of range 0..2",
        "malformed": "line 2: expected 'FILENAME LABEL'",
        "conflict": "line 7: 'ILSVRC2012_val_00000001.JPEG' is labelled",
        "no_labels_flag": "holds 6 images but no class folders; pass --val-labels FILE",
    }[case]
    if case == "missing_label":
        rows = rows[:-1]
    elif case == "no_file":
        rows.append("ILSVRC2012_val_00000099.JPEG n01440764")
    elif case == "unknown_wnid":
        rows[0] = rows[0].split()[0] + " n99999999"
    elif case == "bad_index":
        rows[0] = rows[0].split()[0] + " 3"
    elif case == "malformed":
        rows[1] = rows[1] + " extra"
    elif case == "conflict":
        rows.append(rows[0].split()[0] + (" n01484850" if truth[rows[0].split()[0]] != "n01484850" else " n01440764"))
    (tmp_path / "labels.txt").write_text("\n".join(rows) + "\n")
    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    if case != "no_labels_flag":
        argv += ["--val-labels", str(tmp_path / "labels.txt")]
    err = cli_error(argv, capsys)
    assert expect in err, err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out


# --- one-line errors -------------------------------------------------------------------------


def test_source_errors_are_one_line(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    err = cli_error(["--src", str(tmp_path / "missing")] + out, capsys)
    assert err == f"make_shards: error: source {tmp_path / 'missing'} does not exist"
    (tmp_path / "bare").mkdir()
    assert "has no train/ or val/ directory" in cli_error(["--src", str(tmp_path / "bare")] + out, capsys)
    (tmp_path / "empty" / "train" / WNIDS[0]).mkdir(parents=True)
    err = cli_error(["--src", str(tmp_path / "empty")] + out, capsys)
    assert err == f"make_shards: error: {tmp_path / 'empty' / 'train'} contains no image files"
    write(tmp_path / "flat" / "train" / "x.JPEG", jpeg_bytes())
    assert "has no class folders" in cli_error(["--src", str(tmp_path / "flat")] + out, capsys)
    make_tree(tmp_path / "ok", per_class=1, val_per_class=0)
    err = cli_error(["--src", str(tmp_path / "ok"), "--quality", "101"] + out, capsys)
    assert err == "make_shards: error: --quality must be in 1..100, got 101"
    err = cli_error(["--src", str(tmp_path / "ok"), "--splits", "test"] + out, capsys)
    assert "split 'test' not found" in err
    write(tmp_path / "ok" / "val" / "zebra" / "z.JPEG", jpeg_bytes())
    assert "class folder val/zebra is not a class of train/" in cli_error(["--src", str(tmp_path / "ok")] + out, capsys)


def test_out_dir_made_with_other_arguments_is_refused(tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=0)
    out = tmp_path / "out"
    run(src, out, seed=0)
    err = cli_error(["--src", str(src), "--out", str(out), "--seed", "1"], capsys)
    assert "holds shards made with other arguments (--seed 0 -> 1)" in err
    write(src / "train" / WNIDS[0] / "new.JPEG", jpeg_bytes(seed=77))
    err = cli_error(["--src", str(src), "--out", str(out)], capsys)
    assert "the files or labels of train changed (6 -> 7 files)" in err
    foreign = tmp_path / "foreign"
    write(foreign / "train-000000.tar", b"\0" * 1024)
    err = cli_error(["--src", str(src), "--out", str(foreign)], capsys)
    assert "already holds train-000000.tar not made by make_shards" in err
    assert "is inside the source split" in cli_error(["--src", str(src), "--out", str(src / "train" / "x")], capsys)
    write(tmp_path / "file_out", b"x")
    assert "exists and is not a directory" in cli_error(["--src", str(src), "--out", str(tmp_path / "file_out")], capsys)
    err = cli_error(["--src", str(src), "--out", str(tmp_path / "file_out" / "x")], capsys)
    assert f"--out {tmp_path / 'file_out' / 'x'}: cannot create it (Not a directory: " in err


def test_a_second_run_on_the_same_out_is_refused_while_one_runs(tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=1, val_per_class=0)
    out = tmp_path / "out"
    run(src, out)
    with open(out / STATE_DIR / "lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        err = cli_error(["--src", str(src), "--out", str(out)], capsys)
    assert "another make_shards is writing to" in err


# --- resume ----------------------------------------------------------------------------------


def test_resume_after_a_crash_is_byte_identical(tmp_path):
    src = make_tree(tmp_path / "src", per_class=6, val_per_class=3)
    kw = dict(samples_per_shard=2, seed=3)
    ref = tmp_path / "ref"
    run(src, ref, **kw)
    assert len(list(ref.glob("*.tar"))) == 9 + 5

    class Crash(RuntimeError):
        pass

    calls = []

    def crash_after_three(record):
        calls.append(record["name"])
        if len(calls) == 3:
            raise Crash

    out = tmp_path / "out"
    with pytest.raises(Crash):
        run(src, out, workers=2, on_shard=crash_after_three, **kw)  # the parent plus one child process
    assert not (out / "manifest.json").exists()
    committed = [json.loads(p.read_text()) for p in (out / STATE_DIR).glob("*-*.json")]
    done = {r["path"]: (out / r["path"]).stat() for r in committed}
    done = {name: (st.st_ino, st.st_mtime_ns) for name, st in done.items()}
    assert 3 <= len(done) < 14
    # and what a hard kill leaves: a temporary file, a shard without its record, a short shard
    write(out / ".train-000007.tar.99999.tmp", b"partial")
    kept_name = sorted(done)[0]
    with open(out / kept_name, "r+b") as f:
        f.truncate(1024)  # a kept shard whose size no longer matches its record: redone
    del done[kept_name]

    logs = []
    m = run(src, out, workers=2, log=logs.append, **kw)
    assert file_digests(out) == file_digests(ref)  # tars, indexes and manifest
    assert not list(out.glob(".*.tmp"))
    for name, stamp in done.items():  # complete shards were kept, not rewritten
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, name
    assert f"kept {len(done)} from an earlier run" in logs[0]
    assert m.splits["train"].num_samples == 18 and m.splits["val"].num_samples == 9
    # a state record lost: that shard is rewritten, with the same bytes
    (out / STATE_DIR / "val-000001.json").unlink()
    (out / "val-000002.idx").unlink()
    run(src, out, workers=1, log=logs.append, **kw)
    assert any("wrote 2 shard(s), kept 12" in line for line in logs[-4:])
    assert file_digests(out) == file_digests(ref)
    # a record of another plan (e.g. a calibration that came out differently) is not trusted
    rec_path = out / STATE_DIR / "train-000004.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps(rec | {"digest": "0" * 64}))
    before = (out / "train-000004.tar").stat().st_ino
    run(src, out, workers=1, log=logs.append, **kw)
    assert any("wrote 1 shard(s), kept 13" in line for line in logs[-4:])
    assert (out / "train-000004.tar").stat().st_ino != before
    assert file_digests(out) == file_digests(ref)


def test_a_dead_worker_is_reported_not_waited_for(tmp_path):
    import multiprocessing as mp
    import signal
    import threading
    import time

    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    fifo = tmp_path / "fifo.JPEG"  # the scan skips FIFOs; a hand-made task does not
    os.mkfifo(fifo)
    good = write(tmp_path / "good.JPEG", jpeg_bytes())

    def task(i, path):
        return ShardTask("train", i, str(out), [PlannedSample(f"{i:08d}_x", "a/x.JPEG", str(path), 0)],
                         {0: "a"}, EncodeOptions(), f"d{i}")

    tasks = [task(0, fifo)] + [task(i, good) for i in range(1, 4)]  # the child gets shard 0 first
    killed = []

    def kill_child():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            for child in mp.active_children():
                time.sleep(1.0)  # let it block on the FIFO
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
                break
            time.sleep(0.05)

    th = threading.Thread(target=kill_child, daemon=True)
    th.start()
    t = time.monotonic()
    with pytest.raises(WorkerDied, match=r"a worker process died \(exit code -9\)") as e:
        run_tasks(tasks, workers=2, n_todo=4, progress=False, records={})
    assert f"while processing {fifo};" in str(e.value)  # the file it died on
    assert killed and time.monotonic() - t < 30
    # the child held shards 0 and 1; this process built the others meanwhile
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000002.tar", "train-000003.tar"]


def test_fifos_and_other_special_files_are_skipped(tmp_path):
    src = make_tree(tmp_path / "src", per_class=1, val_per_class=0)
    os.mkfifo(src / "train" / WNIDS[0] / "pipe.JPEG")
    m = run(src, tmp_path / "out")
    assert [(k.path, k.reason) for k in m.splits["train"].skipped] == [
        (f"train/{WNIDS[0]}/pipe.JPEG", "not a regular file")]


# --- formats: TarWriter, wds2idx, DALI, webdataset -------------------------------------------


def test_tar_header_is_tarfiles():
    rng = random.Random(0)
    for _ in range(200):
        name = "".join(rng.choice("abcXYZ019_-") for _ in range(rng.randint(1, 100)))
        size = rng.choice([0, 1, 511, 512, 513, rng.randint(0, 8**11 - 1)])
        assert shard_format._tar_header(name, size) == shard_format._tarfile_header(name, size)
    with pytest.raises(ValueError):
        shard_format._tar_header("x" * 101, 5)


def test_shards_are_byte_identical_to_webdataset_tarwriter(tmp_path):
    import webdataset as wds

    _quirk_tree(tmp_path / "src")
    m = run(tmp_path / "src", tmp_path / "out")
    ours = tmp_path / "out" / m.splits["train"].shards[0].path
    theirs = tmp_path / "tarwriter.tar"
    with wds.TarWriter(str(theirs), encoder=False, mtime=0) as w:
        for s in read_samples(tmp_path / "out", "train"):
            w.write({"__key__": s["key"], "cls": s["cls"], "jpg": s["jpg"], "json": s["json"]})
    assert ours.read_bytes() == theirs.read_bytes()


def test_index_files_equal_dalis_wds2idx(tmp_path):
    import shutil
    import wds2idx  # ships with DALI

    _quirk_tree(tmp_path / "src")
    m = run(tmp_path / "src", tmp_path / "out", samples_per_shard=4)
    assert len(m.splits["train"].shards) == 3
    for sh in m.splits["train"].shards:
        tar = tmp_path / "out" / sh.path
        ref = tmp_path / (sh.path + ".wds2idx")
        with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as ic:
            ic.create_index()
        ours = (tmp_path / "out" / sh.index).read_text()
        assert ours == ref.read_text()
        assert ours == shard_format.index_from_tar(tar)
        assert ours.startswith(f"v1.2 {sh.num_samples}\n")
    if shutil.which("wds2idx"):  # and the command-line tool itself
        sh = m.splits["train"].shards[0]
        subprocess.run(["wds2idx", str(tmp_path / "out" / sh.path), str(tmp_path / "cli.idx")],
                       check=True, capture_output=True)
        assert (tmp_path / "cli.idx").read_text() == (tmp_path / "out" / sh.index).read_text()


def test_dali_webdataset_reader_reads_the_shards_on_cpu(tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    _quirk_tree(tmp_path / "src")
    m = run(tmp_path / "src", tmp_path / "out", samples_per_shard=4)
    expected = read_samples(tmp_path / "out", "train")
    n = len(expected)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, cls, meta = fn.readers.webdataset(
            paths=m.shard_paths("train", tmp_path / "out"), index_paths=m.index_paths("train", tmp_path / "out"),
            ext=["jpg", "cls", "json"], missing_component_behavior="error", name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, meta

    p = pipe()
    p.build()
    images, cls, meta = p.run()
    for i, s in enumerate(expected):
        assert np.array(cls[i]).tobytes().decode("ascii") == str(s["label"])  # raw ASCII bytes
        assert json.loads(np.array(meta[i]).tobytes()) == s["meta"]
        img = np.array(images[i])
        pil = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        # same shape as Pillow (the EXIF-rotated file included: DALI would turn it otherwise)
        assert img.shape == pil.shape, s["meta"]["source"]
        assert np.abs(img.astype(int) - pil.astype(int)).mean() < 2.0


def test_webdataset_library_reads_the_shards(tmp_path):
    import webdataset as wds

    src = make_tree(tmp_path / "src", per_class=3, val_per_class=0)
    m = run(src, tmp_path / "out", samples_per_shard=4)
    urls = m.shard_paths("train", tmp_path / "out")
    got = [(cls, meta["wnid"], img.size) for img, cls, meta in
           wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json")]
    assert len(got) == 9
    assert all(m.classes[cls] == wnid for cls, wnid, _ in got)
    assert {wnid for _, wnid, _ in got} == set(WNIDS)


# --- re-encode mode --------------------------------------------------------------------------


def test_reencode_mode_max_side_quality_and_count_plan(tmp_path):
    src = tmp_path / "src"
    for i in range(10):
        write(src / "train" / WNIDS[i % 2] / f"{i}.JPEG", jpeg_bytes(80 + i, 50, seed=i, quality=95))
    write(src / "train" / WNIDS[0] / "small.JPEG", jpeg_bytes(20, 10, seed=50))
    m = run(src, tmp_path / "out", max_side=32, quality=70, shard_size_mb=0.012)
    plan = m.params["plan"]["train"]
    per = plan["samples_per_shard"]
    assert per == int(12000 // plan["calibrated_bytes_per_sample"]) >= 2
    assert [s.num_samples for s in m.splits["train"].shards][:-1] == [per] * (len(m.splits["train"].shards) - 1)
    for s in read_samples(tmp_path / "out", "train"):
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert max(im.size) <= 32 and im.mode == "RGB"
            w, h = s["meta"]["width"], s["meta"]["height"]
            if max(w, h) > 32:
                assert max(im.size) == 32 and s["meta"]["changes"] == ["resized to --max-side"]
            else:  # --quality re-encodes everything
                assert im.size == (w, h) and s["meta"]["changes"] == ["re-encoded at --quality"]
    m2 = run(src, tmp_path / "out2", max_side=32, quality=70, shard_size_mb=0.012)
    assert file_digests(tmp_path / "out") == file_digests(tmp_path / "out2")
    assert m2.splits["train"].changes == {"re-encoded at --quality": 1, "resized to --max-side": 10}


def test_max_side_alone_passes_small_images_through(tmp_path):
    src = tmp_path / "src"
    small, big = jpeg_bytes(30, 20, seed=1), jpeg_bytes(90, 60, seed=2)
    write(src / "train" / "a" / "small.JPEG", small)
    write(src / "train" / "a" / "big.JPEG", big)
    run(src, tmp_path / "out", max_side=45)
    s = {x["meta"]["source"]: x for x in read_samples(tmp_path / "out", "train")}
    assert s["a/small.JPEG"]["jpg"] == small
    assert Image.open(io.BytesIO(s["a/big.JPEG"]["jpg"])).size == (45, 30)


# --- verify ----------------------------------------------------------------------------------


def test_verify_passes_and_catches_corruption(tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=1)
    out = tmp_path / "out"
    m = run(src, out, samples_per_shard=3)
    assert verify_shards(out, workers=2, progress=False, log=None) == []
    with pytest.raises(SystemExit) as e:
        cli.main(["--verify", str(out), "--quiet", "--workers", "1"])
    assert e.value.code == 0 and "verify: OK, 3 shards, 9 samples" in capsys.readouterr().out

    sh = m.splits["train"].shards[1]
    data = bytearray((out / sh.path).read_bytes())
    idx = (out / sh.index).read_text().splitlines()[1].split()
    jpg_off = int(idx[idx.index("jpg") + 1])
    data[jpg_off: jpg_off + 2] = b"\0\0"  # break the JPEG's SOI marker
    (out / sh.path).write_bytes(bytes(data))
    write(out / "train-000099.tar", b"")
    problems = verify_shards(out, workers=1, progress=False, log=None)
    assert any(p.startswith(f"train/{sh.path}: sha256 is ") for p in problems)
    assert any(f"train/{sh.path}: sample" in p and "not a baseline RGB JPEG (not a JPEG)" in p for p in problems)
    assert "train-000099.tar: not listed in manifest.json" in problems
    with pytest.raises(SystemExit) as e:
        cli.main(["--verify", str(out), "--quiet", "--workers", "1"])
    assert e.value.code == 1

    mj = json.loads((out / "manifest.json").read_text())
    mj["splits"]["val"]["num_samples"] = 4
    (out / "manifest.json").write_text(json.dumps(mj))
    with pytest.raises(ManifestError, match=r"splits.val: num_samples is 4 but its shards hold 3"):
        load_manifest(out)
    err = cli_error(["--verify", str(out)], capsys)
    assert "num_samples is 4 but its shards hold 3" in err


def test_verify_catches_wrong_labels_and_counts(tmp_path):
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=0)
    out = tmp_path / "out"
    m = run(src, out)
    sh = m.splits["train"].shards[0]
    samples = read_samples(out, "train")
    # rewrite the shard with a wrong label on the first sample and one sample missing
    w = shard_format.ShardWriter(out / sh.path)
    for i, s in enumerate(samples[:-1]):
        cls = (b"2" if s["label"] != 2 else b"1") if i == 0 else s["cls"]
        w.write(s["key"], [("cls", cls), ("jpg", s["jpg"]), ("json", s["json"])])
    w.finish()
    (out / sh.index).write_text(shard_format.index_from_tar(out / sh.path))
    problems = verify_shards(out, workers=1, progress=False, log=None)
    assert any(f"sample {samples[0]['key']}: label" in p and "json says wnid" in p for p in problems)
    assert any(p.endswith("holds 5 samples, manifest says 6") for p in problems)


def test_verify_reports_an_unforeseen_failure_in_one_line_and_stops_on_memory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(make_tree(tmp_path / "src", per_class=1, val_per_class=0), out)
    monkeypatch.setattr(verify, "inspect_jpeg", lambda data: data[len(data)])  # the IndexError
    assert verify_shards(out, workers=1, progress=False, log=None) == [
        "train/train-000000.tar: cannot be checked (IndexError: index out of range)"]

    def out_of_memory(data):
        raise MemoryError

    monkeypatch.setattr(verify, "inspect_jpeg", out_of_memory)
    with pytest.raises(RunStopped, match=r"^--verify .*train-000000\.tar: out of memory; run --verify again$"):
        verify_shards(out, workers=1, progress=False, log=None)


def _die(job):
    os.kill(os.getpid(), 9)  # SIGKILL, as the OOM killer sends


def test_verify_reports_a_dead_worker_in_one_line(tmp_path, monkeypatch):
    import multiprocessing

    out = tmp_path / "out"
    run(make_tree(tmp_path / "src", per_class=1, val_per_class=0), out, samples_per_shard=1)
    monkeypatch.setattr(verify, "mp_context", lambda: multiprocessing.get_context("fork"))  # workers see the patch:
    monkeypatch.setattr(verify, "_verify_shard", _die)  # a worker killed on its first shard
    with pytest.raises(RunStopped, match=r"^a --verify worker process died \(killed, out of memory...\); "
                                           r"run --verify again$"):
        verify_shards(out, workers=2, progress=False, log=None)


# --- CLI shell and real ImageNet files -------------------------------------------------------


def test_cli_script_from_repo_root(tmp_path):
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=1)
    cmd = [sys.executable, "data_prep/make_shards.py", "--src", str(src), "--out", str(tmp_path / "out"),
           "--workers", "2", "--samples-per-shard", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "train: 6 samples in 3 shards" in r.stdout and "val: 3 samples in 2 shards" in r.stdout
    assert "img/s" in r.stderr  # the progress bar
    r = subprocess.run(cmd[:3] + [str(tmp_path / "nope")] + cmd[4:], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr == f"make_shards: error: source {tmp_path / 'nope'} does not exist\n"


def test_class_names_come_from_timms_public_imagenet_info(monkeypatch):
    from timm.data import ImageNetInfo

    names = class_names_for(["n01440764", "n02123045", "n99999999", "not_a_wnid"])
    assert names[0] == "tench, Tinca tinca" and names[1].startswith("tabby")
    assert names[2:] == ["n99999999", "not_a_wnid"]  # unknown to timm: the folder's name
    info = ImageNetInfo()
    assert class_names_for(info.label_names()) == info.label_descriptions()
    # timm's API, not its data files: what it answers is what the manifest gets
    monkeypatch.setattr(ImageNetInfo, "label_name_to_description", lambda self, label, detailed=False: label.upper())
    assert class_names_for(["n01440764"]) == ["N01440764"]


@pytest.fixture
def real_tree(tmp_path):
    if not REAL.is_dir():
        pytest.skip(f"{REAL} not present")
    files = sorted(REAL.glob("*.JPEG"))
    if len(files) < 1000:
        pytest.skip("imagenet-sample is incomplete")
    root = tmp_path / "imagenet"
    for f in files[:120]:  # train/<wnid>/<file>, symlinks: nothing is copied
        d = root / "train" / f.name.split("_")[0]
        d.mkdir(parents=True)
        (d / f.name).symlink_to(f)
    labels = []
    for i, f in enumerate(files[:120:4]):  # and a flat ILSVRC-style val/ with a labels file
        (root / "val").mkdir(exist_ok=True)
        (root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").symlink_to(f)
        labels.append(f"ILSVRC2012_val_{i + 1:08d}.JPEG {f.name.split('_')[0]}")
    (tmp_path / "val_labels.txt").write_text("\n".join(labels) + "\n")
    return root, files[:120], tmp_path / "val_labels.txt"


def test_real_imagenet_files(real_tree, tmp_path):
    root, files, labels = real_tree
    out = tmp_path / "out"
    m = run(root, out, val_labels=labels, workers=2, shard_size_mb=4)
    assert m.classes == sorted(f.name.split("_")[0] for f in files)
    synsets = (Path(importlib.util.find_spec("timm").submodule_search_locations[0])
               / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert m.classes == synsets[:120]  # the order every ImageNet checkpoint uses
    assert m.class_names[0] == "tench, Tinca tinca"
    assert m.splits["train"].num_samples == 120 and m.splits["val"].num_samples == 30
    assert len(m.splits["train"].shards) >= 3
    by_name = {f.name: f for f in files}
    n_passed = 0
    for s in read_samples(out, "train"):
        orig = by_name[s["meta"]["source"].split("/")[1]].read_bytes()
        assert inspect_jpeg(s["jpg"]).fast_path_blocker() is None
        if s["meta"]["changes"] == []:
            assert s["jpg"] == orig
            n_passed += 1
        else:
            assert s["meta"]["changes"] in (["grayscale JPEG"], ["EXIF orientation reset"], ["CMYK JPEG"])
    assert n_passed >= 110
    assert verify_shards(out, workers=1, progress=False, log=None) == []
