"""``--verify SHARD_DIR``: re-read every shard against the manifest, in one line per problem.

Each shard's size, checksum and index; its members (regular files named ``<key>.cls/.jpg/.json``,
adjacent per sample); each sample's label, metadata and JPEG, which must be a baseline RGB JPEG
that Pillow decodes; the keys unique per split and no shard file the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from fatscale.data.manifest import MANIFEST_NAME, ManifestError, ShardInfo, load_manifest
from fatscale.data.shard_format import index_from_tar
from fatscale.prep.build import default_workers, mp_context
from fatscale.prep.encode import CannotDecode, decoding
from fatscale.prep.errors import PROG, MakeShardsError, RunStopped, caused_by_bytes, failure, one_line, quoted, type_name
from fatscale.prep.jpeg import inspect_jpeg
from fatscale.prep.plan import KEY_STEM_CHARS

Problem = Callable[[str], None]  # takes one line about the shard

_MEMBER_KEY = re.compile(r"[0-9]{8,}_[A-Za-z0-9_-]{0,%d}" % KEY_STEM_CHARS)  # what plan.sample_key makes
_MEMBER_TYPES = {tarfile.DIRTYPE: "a directory", tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
                 tarfile.FIFOTYPE: "a FIFO", tarfile.CHRTYPE: "a character device",
                 tarfile.BLKTYPE: "a block device"}


def _member(name: str) -> str:
    """A tar member name for a one-line message: escaped, an absurdly long one cut."""
    return quoted(name if len(name) <= 80 else name[:80] + "...")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_shard(job: tuple[str, str, ShardInfo, list[str]]) -> tuple[list[str], list[str]]:
    """Check one shard against its manifest entry; return (problems, keys).

    Whatever the shard holds, each problem is one line naming the shard and the member or sample;
    only a failure that is not the shard's (memory, ...) raises, as RunStopped.
    """
    root, split, sh, classes = job
    problems: list[str] = []
    keys: list[str] = []
    p = lambda msg: problems.append(f"{split}/{quoted(sh.path)}: {msg}")  # noqa: E731
    try:
        _check_shard(Path(root), sh, classes, p, keys)
    except Exception as e:  # noqa: BLE001 - the boundary: bytes no check above foresaw
        if not caused_by_bytes(e):
            raise RunStopped(f"--verify {quoted(Path(root, sh.path))}: {failure(e)}; run --verify again") from e
        p(f"cannot be checked ({type_name(e)}: {one_line(e)})")
    return problems, keys


def _check_shard(root: Path, sh: ShardInfo, classes: list[str], p: Problem, keys: list[str]) -> None:
    tar = root / sh.path
    if not _check_files(root, tar, sh, p):
        return
    samples = _read_samples(tar, p)
    if samples is None:
        return
    for key, parts in samples.items():
        keys.append(key)
        _check_sample(key, parts, classes, p)
    if len(samples) != sh.num_samples:
        p(f"holds {len(samples)} samples, manifest says {sh.num_samples}")


def _check_files(root: Path, tar: Path, sh: ShardInfo, p: Problem) -> bool:
    """The tar's size, checksum and index; False if its samples cannot be read."""
    try:
        st = tar.stat()
    except OSError:
        p("missing")
        return False
    if not stat.S_ISREG(st.st_mode):
        p("not a regular file")
        return False
    if st.st_size != sh.bytes:
        p(f"size is {st.st_size} bytes, manifest says {sh.bytes}")
    try:
        digest = _sha256_file(tar)
    except OSError as e:
        p(f"cannot read: {e.strerror or one_line(e)}")
        return False
    if digest != sh.sha256:
        p(f"sha256 is {digest}, manifest says {sh.sha256}")
    try:
        index = index_from_tar(tar)
    except tarfile.TarError as e:
        p(f"not a readable tar ({one_line(e)})")
        return False
    idx = root / sh.index
    try:
        if not stat.S_ISREG(idx.stat().st_mode):  # a FIFO would block the read for ever
            p(f"index {quoted(sh.index)} is not a regular file")
        elif idx.read_bytes() != index.encode("utf-8", "surrogateescape"):
            p(f"index {quoted(sh.index)} does not match the tar")
    except FileNotFoundError:
        p(f"index {quoted(sh.index)} missing")
    except OSError as e:
        p(f"index {quoted(sh.index)} cannot be read: {e.strerror or one_line(e)}")
    return True


def _read_samples(tar: Path, p: Problem) -> dict[str, dict[str, bytes]] | None:
    """key -> extension -> bytes of the tar's well-named regular members (None: unreadable)."""
    samples: dict[str, dict[str, bytes]] = {}
    last = None
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if not m.isreg():  # extractfile would give None, or follow the link
                    p(f"member {_member(m.name)} is {_MEMBER_TYPES.get(m.type, f'of type {m.type!r}')}, "
                      f"not a regular file")
                    continue
                key, _, ext = m.name.partition(".")
                if not _MEMBER_KEY.fullmatch(key) or ext not in ("cls", "jpg", "json"):
                    p(f"member {_member(m.name)} is not named <key>.cls/.jpg/.json")
                    continue
                if key != last and key in samples:  # readers group adjacent members into samples
                    p(f"sample {key}: its members are not adjacent")
                elif ext in samples.get(key, {}):
                    p(f"member {m.name} appears twice")
                last = key
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    except OSError as e:
        p(f"cannot read: {e.strerror or one_line(e)}")
        return None
    except tarfile.TarError as e:
        p(f"not a readable tar ({one_line(e)})")
        return None
    return samples


def _check_sample(key: str, parts: dict[str, bytes], classes: list[str], p: Problem) -> None:
    if set(parts) != {"cls", "jpg", "json"}:
        p(f"sample {key} has {sorted(parts)}, expected cls, jpg, json")
        return
    if not parts["cls"].isdigit():
        p(f"sample {key}: cls {parts['cls'][:20]!r} is not an integer")
        return
    label = int(parts["cls"])
    if label >= len(classes):
        p(f"sample {key}: label {label} out of range 0..{len(classes) - 1}")
        return
    try:
        meta = json.loads(parts["json"])
    except (ValueError, RecursionError):
        p(f"sample {key}: json does not parse")
        return
    if not isinstance(meta, dict):
        p(f"sample {key}: json is not an object")
        return
    if meta.get("wnid") != classes[label]:
        p(f"sample {key}: label {label} is {quoted(classes[label])} but json says wnid {quoted(meta.get('wnid'))}")
    info = inspect_jpeg(parts["jpg"])
    if info is None or info.fast_path_blocker() is not None:
        p(f"sample {key}: jpg is not a baseline RGB JPEG ({'not a JPEG' if info is None else info.fast_path_blocker()})")
        return
    try:
        with decoding(parts["jpg"]) as im:
            im.load()
            if im.mode != "RGB":
                p(f"sample {key}: decodes to mode {im.mode}, not RGB")
    except CannotDecode as e:
        p(f"sample {key}: jpg does not decode ({e.detail})")


def verify_shards(shard_dir, workers: int | None = None, progress: bool = True, log=print) -> list[str]:
    """Re-read every shard of SHARD_DIR against its manifest; return the problems found."""
    from tqdm import tqdm

    root = Path(shard_dir)
    if not root.is_dir():
        raise MakeShardsError(f"--verify {quoted(root)}: no such directory")
    try:
        m = load_manifest(root)
    except ManifestError as e:
        raise MakeShardsError(str(e)) from None
    jobs = [(str(root), name, sh, m.classes) for name, s in m.splits.items() for sh in s.shards]
    problems: list[str] = []
    listed = {sh.path for _, _, sh, _ in jobs} | {sh.index for _, _, sh, _ in jobs}
    for p in sorted(root.iterdir()):
        if p.suffix in (".tar", ".idx") and p.name not in listed:
            problems.append(f"{quoted(p.name)}: not listed in {MANIFEST_NAME}")
    workers = min(workers or default_workers(), max(1, len(jobs)))
    keys_by_split: dict[str, list[str]] = {}
    bar = tqdm(total=len(jobs), unit="shard", desc=f"{PROG} --verify", disable=not progress)
    results: Iterable
    pool = ProcessPoolExecutor(workers, mp_context=mp_context()) if workers > 1 else None
    try:
        results = pool.map(_verify_shard, jobs) if pool else map(_verify_shard, jobs)
        for job, (probs, keys) in zip(jobs, results):
            problems.extend(probs)
            keys_by_split.setdefault(job[1], []).extend(keys)
            bar.update(1)
    except BrokenProcessPool:
        raise RunStopped("a --verify worker process died (killed, out of memory...); run --verify again") from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    for name, keys in keys_by_split.items():
        dup = [k for k, c in Counter(keys).items() if c > 1]
        if dup:
            problems.append(f"{name}: key {dup[0]} appears in several samples ({len(dup)} duplicate keys)")
    n = sum(s.num_samples for s in m.splits.values())
    if log:
        if problems:
            for pr in problems:
                log(f"{PROG}: verify: {pr}")
            log(f"{PROG}: verify: FAILED, {len(problems)} problem(s) in {len(jobs)} shards")
        else:
            log(f"{PROG}: verify: OK, {len(jobs)} shards, {n} samples, "
                f"{', '.join(f'{k}={s.num_samples}' for k, s in m.splits.items())}")
    return problems
