"""What makes a run resumable: ``SHARD_DIR/.make_shards/`` (the parameters, one commit record per
shard, the lock) and the checks a run makes on an existing SHARD_DIR before it writes there.

A shard counts as done only once its commit record is written (after the tar and its index are
in place) and only while the record matches the plan's digest and the files' sizes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from fatscale.atomic import is_temporary, write_json_atomic
from fatscale.data.manifest import FORMAT, MANIFEST_NAME
from fatscale.prep.errors import PROG, MakeShardsError, quoted
from fatscale.prep.plan import PLAN_VERSION, ShardTask, digest
from fatscale.prep.source import Source

STATE_DIR = ".make_shards"  # per-shard commit records + the parameters, inside SHARD_DIR
PARAMS = "params.json"

_PARAM_FLAGS = {"seed": "--seed", "shard_size_mb": "--shard-size-mb", "samples_per_shard": "--samples-per-shard",
                "max_side": "--max-side", "quality": "--quality", "decode_check": "--decode-check",
                "splits": "--splits"}
_MANIFEST_ONLY_PARAMS = ("source", "plan")  # in the manifest's params, not compared
# what make_shards replaces through a temporary file (fatscale.atomic): shards, indexes, JSON
_OUR_FILES = re.compile(r".+-\d{6}\.(?:tar|idx)|.+\.json")


def run_params(source: Source, args: dict) -> dict:
    """What decides the shards' bytes: a run on an existing SHARD_DIR must have the same."""
    files = {}
    for name, split in source.splits.items():
        files[name] = {"count": len(split.files),
                       "sha256": digest([(f.rel, f.size, f.label) for f in split.files])}
    return {
        "format": FORMAT,
        "plan_version": PLAN_VERSION,
        "splits": sorted(source.splits),
        "seed": args["seed"],
        "shard_size_mb": args["shard_size_mb"],
        "samples_per_shard": args["samples_per_shard"],
        "max_side": args["max_side"],
        "quality": args["quality"],
        "decode_check": args["decode_check"],
        "classes": digest(source.classes),
        "files": files,
    }


def _describe_param_diff(old: dict, new: dict) -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "files":
            for s in sorted(set(a or {}) | set(b or {})):
                fa, fb = (a or {}).get(s), (b or {}).get(s)
                if fa != fb:
                    ca, cb = (fa or {}).get("count"), (fb or {}).get("count")
                    diffs.append(f"the files or labels of {s} changed ({ca} -> {cb} files)")
        elif k == "classes":
            diffs.append("the class list changed")
        else:
            diffs.append(f"{_PARAM_FLAGS.get(k, k)} {a} -> {b}")
    return "; ".join(diffs) or "unknown difference"


def check_out_dir(out: Path, params: dict) -> bool:
    """Raise if OUT holds shards made with other arguments; return True if it holds ours."""
    if out.exists() and not out.is_dir():
        raise MakeShardsError(f"--out {quoted(out)} exists and is not a directory")
    if not out.exists():
        return False
    old = None
    ppath = out / STATE_DIR / PARAMS
    if ppath.is_file():
        try:
            old = json.loads(ppath.read_text())
        except (OSError, json.JSONDecodeError):
            raise MakeShardsError(f"{quoted(ppath)} is unreadable; delete {quoted(out)} or use another --out") from None
    elif (out / MANIFEST_NAME).is_file():
        try:
            old = json.loads((out / MANIFEST_NAME).read_text()).get("params")
        except (OSError, json.JSONDecodeError, AttributeError):
            old = None
    theirs = [p.name for p in out.iterdir() if p.suffix in (".tar", ".idx") or p.name == MANIFEST_NAME]
    if isinstance(old, dict):
        old = {k: v for k, v in old.items() if k not in _MANIFEST_ONLY_PARAMS}
    if old is None:
        if theirs:
            raise MakeShardsError(f"--out {quoted(out)} already holds {theirs[0]} not made by {PROG} "
                                  f"(no {STATE_DIR}/{PARAMS}); use another --out or delete it")
        return False
    if old != params:
        raise MakeShardsError(f"--out {quoted(out)} holds shards made with other arguments "
                              f"({_describe_param_diff(old, params)}); use another --out or delete it")
    return True


def create_state_dir(out: Path) -> None:
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MakeShardsError(f"--out {quoted(out)}: cannot create it ({e.strerror}: {quoted(e.filename)})") from None


@contextlib.contextmanager
def locked(out: Path):
    """Refuse a second make_shards on the same --out (it would delete our temporary files)."""
    fd = os.open(out / STATE_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MakeShardsError(f"another {PROG} is writing to {quoted(out)} right now") from None
        yield
    finally:
        os.close(fd)


def start_run(out: Path, params: dict) -> None:
    """Under the lock: record the parameters (first run) and remove what an interrupted run left:
    its temporary files, only those of files that make_shards writes."""
    if not (out / STATE_DIR / PARAMS).is_file():
        write_json_atomic(out / STATE_DIR / PARAMS, params)
    for d in (out, out / STATE_DIR):
        for p in d.iterdir():
            if is_temporary(p.name) and _OUR_FILES.fullmatch(p.name[1:].rsplit(".", 2)[0]):
                p.unlink(missing_ok=True)


def write_record(out: Path, record: dict, fsync: bool) -> None:
    """The commit point: a shard counts as done only with this record."""
    write_json_atomic(out / STATE_DIR / f"{record['name']}.json", record, fsync=fsync)


def valid_record(out: Path, task: ShardTask) -> dict | None:
    """The commit record of ``task``'s shard, if it is of this plan and its files are intact."""
    rpath = out / STATE_DIR / f"{task.name}.json"
    try:
        rec = json.loads(rpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("digest") != task.digest:
        return None
    if rec.get("num_samples", 0) == 0:
        return rec if not (out / f"{task.name}.tar").exists() else None
    try:
        if (out / rec["path"]).stat().st_size != rec["bytes"]:
            return None
        if (out / rec["index"]).stat().st_size != rec["index_bytes"]:
            return None
    except (OSError, KeyError, TypeError):
        return None
    return rec


def committed(out: Path, tasks: Iterable[ShardTask]) -> tuple[dict[str, dict], list[ShardTask]]:
    """The commit records an earlier run left for these shards, and the shards still to build."""
    records: dict[str, dict] = {}
    todo: list[ShardTask] = []
    for t in tasks:
        rec = valid_record(out, t)
        if rec is not None:
            records[t.name] = rec
        else:
            todo.append(t)
    return records, todo
