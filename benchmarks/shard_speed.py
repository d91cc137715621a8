"""Throughput of data_prep/make_shards.py against `tar cf` of the same files, in the same run.

Builds an ImageFolder tree (train/<wnid>/*.JPEG) from real ImageNet JPEGs (by default
../shared/data/imagenet-sample: 1000 files, one per class; --repeat copies every file R times
under new names, real copies since tar would store links as links), warms the page cache, then
times, interleaved and --reps times each (the best run of each counts, as with timeit: other
load on the machine only ever slows a run down; the medians go to --json):

* ``tar cf`` of the tree (the baseline),
* the make_shards CLI in pass-through mode, end to end (interpreter, imports, scan, workers),
* ``fatscale.prep.make_shards()`` called in this process after a warm-up call: the same
  work without the start-up costs that a 1 GB tree cannot amortise but 150 GB of ImageNet does
  (its worker server is already up; each call still scans, plans and starts its workers),
* the same two in re-encode mode (--max-side, --quality) on --reencode-images images.

The projection for full ImageNet (1,281,167 train + 50,000 val images) is the CLI's fixed cost
plus the images at the in-process (steady-state) rate.

    python benchmarks/shard_speed.py --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGENET_IMAGES = 1_281_167 + 50_000


def build_tree(src: Path, dst: Path, repeat: int, limit: int | None = None) -> tuple[int, int]:
    """dst/train/<wnid>/<name>_r<k>.JPEG, copies of the first ``limit`` source JPEGs."""
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[:limit]
    if not files:
        sys.exit(f"shard_speed: no JPEGs in {src}")
    total = sum(f.stat().st_size for f in files) * repeat
    marker = dst / ".complete"
    want = f"{src} {len(files)} {repeat}"
    if marker.is_file() and marker.read_text() == want:
        return len(files) * repeat, total
    shutil.rmtree(dst, ignore_errors=True)
    for f in files:
        d = dst / "train" / f.name.split("_")[0]
        d.mkdir(parents=True, exist_ok=True)
        for k in range(repeat):
            shutil.copyfile(f, d / f"{f.stem}_r{k}{f.suffix}")
    marker.write_text(want)
    return len(files) * repeat, total


def cpu_idle(seconds: float = 2.0) -> float:
    """Fraction of CPU time idle over ``seconds`` (other load skews every timing)."""
    def snap() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return v[3] + v[4], sum(v)
    a = snap()
    time.sleep(seconds)
    b = snap()
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def warm(tree: Path) -> None:
    for p in tree.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass


def timed(cmd: list[str], cleanup: Path) -> float:
    if cleanup.is_dir():
        shutil.rmtree(cleanup)
    elif cleanup.exists():
        cleanup.unlink()
    os.sync()  # start every measurement without the previous one's dirty pages
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-sample")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fatscale_shard_speed"))
    ap.add_argument("--repeat", type=int, default=10,
                    help="copies of each source image (default 10: 10k images, 1.1 GB, which with "
                         "its shards and tar stays in the page cache)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per command (the best is reported, the median goes to --json)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size-mb", type=float, default=100,
                    help="shard size (default 100: ~11 shards, so that every worker stays busy "
                         "as on ImageNet's ~150 shards of the default 1000 MB)")
    ap.add_argument("--reencode-images", type=int, default=1000, help="images in the re-encode run")
    ap.add_argument("--max-side", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from fatscale.prep import make_shards

    ms = [sys.executable, str(REPO / "data_prep" / "make_shards.py"), "--quiet", "--workers", str(a.workers)]
    a.work.mkdir(parents=True, exist_ok=True)
    tree = a.work / "tree"
    n, nbytes = build_tree(a.src, tree, a.repeat)
    re_tree = a.work / "tree_reencode"
    n_re, bytes_re = build_tree(a.src, re_tree, 1, limit=a.reencode_images)
    print(f"tree: {n} JPEGs, {nbytes / 1e6:.0f} MB (mean {nbytes / n / 1e3:.0f} kB) in {tree}; "
          f"{a.workers} workers, --shard-size-mb {a.shard_size_mb:g}")
    for t in (tree, re_tree):
        warm(t)
    idle = cpu_idle()
    if idle < 0.9:
        print(f"warning: the CPUs are only {idle:.0%} idle; other load will skew these timings")

    out_tar, out_dir = a.work / "tree.tar", a.work / "shards"
    re_opts = ["--max-side", str(a.max_side), "--quality", str(a.quality)]

    def cli(src: Path, extra: list[str]) -> list[str]:
        return ms + ["--src", str(src), "--out", str(out_dir), "--shard-size-mb", str(a.shard_size_mb)] + extra

    def api(src: Path, reencode: bool) -> float:
        kw = dict(max_side=a.max_side, quality=a.quality) if reencode else {}
        shutil.rmtree(out_dir, ignore_errors=True)
        os.sync()
        t = time.perf_counter()
        make_shards(src, out_dir, shard_size_mb=a.shard_size_mb, workers=a.workers, progress=False,
                    log=None, **kw)
        return time.perf_counter() - t

    api(tree, False)  # warm-up: imports, the worker server, code in the page cache
    runs: dict[str, list[float]] = {"tar": [], "cli": [], "api": [], "re_cli": [], "re_api": []}
    for _ in range(a.reps):
        runs["tar"].append(timed(["tar", "cf", str(out_tar), "-C", str(tree), "train"], out_tar))
        runs["cli"].append(timed(cli(tree, []), out_dir))
        runs["api"].append(api(tree, False))
    m = json.loads((out_dir / "manifest.json").read_text())["splits"]["train"]
    assert m["num_samples"] == n, "make_shards lost samples"
    shard_bytes = sum(s["bytes"] for s in m["shards"])
    re_reps = max(1, (a.reps + 1) // 2)
    for _ in range(re_reps):
        runs["re_cli"].append(timed(cli(re_tree, re_opts), out_dir))
        runs["re_api"].append(api(re_tree, True))
    mr = json.loads((out_dir / "manifest.json").read_text())["splits"]["train"]
    re_out = sum(s["bytes"] for s in mr["shards"])

    best = {k: min(v) for k, v in runs.items()}  # the figures below; the medians go to the JSON
    medians = {k: statistics.median(v) for k, v in runs.items()}
    mb = nbytes / n / 1e6  # MB per image
    tar_rate, cli_rate, api_rate = n / best["tar"], n / best["cli"], n / best["api"]
    fixed = max(0.0, best["cli"] - best["api"])
    re_rate = n_re / best["re_api"]
    fixed_re = max(0.0, best["re_cli"] - best["re_api"])
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join(["python", "benchmarks/shard_speed.py"] + sys.argv[1:]),
        "images": n, "source_mb": round(nbytes / 1e6, 1), "shard_mb": round(shard_bytes / 1e6, 1),
        "workers": a.workers, "shard_size_mb": a.shard_size_mb,
        "tar_s": best["tar"], "tar_img_s": tar_rate, "tar_mb_s": tar_rate * mb,
        "cli_s": best["cli"], "cli_img_s": cli_rate, "cli_mb_s": cli_rate * mb, "cli_ratio": cli_rate / tar_rate,
        "api_s": best["api"], "api_img_s": api_rate, "api_mb_s": api_rate * mb, "api_ratio": api_rate / tar_rate,
        "cli_fixed_s": fixed,
        "reencode_images": n_re, "reencode_cli_s": best["re_cli"], "reencode_api_s": best["re_api"],
        "reencode_img_s": re_rate, "reencode_in_mb": round(bytes_re / 1e6, 1),
        "reencode_out_mb": round(re_out / 1e6, 1), "max_side": a.max_side, "quality": a.quality,
        "imagenet_images": IMAGENET_IMAGES,
        "imagenet_tar_min": IMAGENET_IMAGES / tar_rate / 60,
        "imagenet_pass_min": (fixed + IMAGENET_IMAGES / api_rate) / 60,
        "imagenet_reencode_h": (fixed_re + IMAGENET_IMAGES / re_rate) / 3600,
        "medians": medians, "runs": runs, "cpu_idle_before": idle,
    }
    print(f"best of {a.reps} runs each, {re_reps} of re-encode (medians in --json)")
    print(f"tar cf                          : {best['tar']:6.2f} s {tar_rate:7.0f} img/s {tar_rate * mb:6.0f} MB/s")
    print(f"make_shards CLI, end to end     : {best['cli']:6.2f} s {cli_rate:7.0f} img/s {cli_rate * mb:6.0f} MB/s"
          f" = {res['cli_ratio']:.2f} x tar")
    print(f"make_shards() warm, steady state: {best['api']:6.2f} s {api_rate:7.0f} img/s {api_rate * mb:6.0f} MB/s"
          f" = {res['api_ratio']:.2f} x tar  (CLI fixed cost {fixed:.2f} s)")
    print(f"re-encode --max-side {a.max_side} --quality {a.quality}, {n_re} images: CLI {best['re_cli']:.2f} s, "
          f"warm {best['re_api']:.2f} s = {re_rate:.0f} img/s; {bytes_re / 1e6:.0f} MB -> {re_out / 1e6:.0f} MB")
    print(f"ImageNet ({IMAGENET_IMAGES} images, ~{IMAGENET_IMAGES * mb / 1e3:.0f} GB) at these rates: tar cf "
          f"{res['imagenet_tar_min']:.0f} min, pass-through {res['imagenet_pass_min']:.0f} min, "
          f"re-encode {res['imagenet_reencode_h']:.1f} h (page-cache speed; a disk slower than this bounds all three)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
