"""The ``manifest.json`` that ``data_prep/make_shards.py`` writes next to its shards.

One place defines the schema, so the shard writer, ``--verify`` and the DALI loader agree on
it. ``load_manifest`` validates everything a reader relies on and fails with a one-line
:class:`ManifestError` naming the field at fault.

Schema (``format`` = ``fatscale-shards/1``)::

    {
      "format": "fatscale-shards/1",
      "classes": ["n01440764", ...],          # index = label
      "class_names": ["tench, Tinca tinca", ...],
      "params": {...},                        # the arguments the shards were made with
      "splits": {
        "train": {
          "num_samples": 1281167,             # samples in the shards (sum over shards)
          "num_source_files": 1281167,        # files found = num_samples + len(skipped)
          "shuffled": true,
          "shards": [{"path": "train-000000.tar", "index": "train-000000.idx",
                      "num_samples": 9107, "bytes": 1048586240, "sha256": "..."}, ...],
          "skipped": [{"path": "train/n0.../x.JPEG", "reason": "..."}, ...],
          "changes": {"grayscale JPEG": 12, ...}   # samples per kind of change
        },
        "val": {...}
      }
    }

Paths in ``shards`` are relative to the manifest's directory; ``skipped`` paths are relative
to the source root.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fatscale.atomic import write_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "fatscale-shards/1"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent (one-line message)."""


@dataclass(frozen=True)
class ShardInfo:
    path: str  # tar file, relative to the shard directory
    index: str  # DALI index file (wds2idx format), relative to the shard directory
    num_samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "index": self.index,
            "num_samples": self.num_samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class SkippedFile:
    path: str  # relative to the source root
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class SplitInfo:
    num_samples: int
    num_source_files: int
    shuffled: bool
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    changes: dict[str, int] = field(default_factory=dict)  # kind of change -> samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_source_files": self.num_source_files,
            "shuffled": self.shuffled,
            "shards": [s.to_dict() for s in self.shards],
            "skipped": [s.to_dict() for s in self.skipped],
            "changes": dict(sorted(self.changes.items())),
        }


@dataclass
class Manifest:
    classes: list[str]
    class_names: list[str]
    splits: dict[str, SplitInfo]
    params: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_paths(self, split: str, root: str | os.PathLike) -> list[str]:
        """Absolute tar paths of ``split``, in order (what ``fn.readers.webdataset`` takes)."""
        return [str(Path(root, s.path)) for s in self._split(split).shards]

    def index_paths(self, split: str, root: str | os.PathLike) -> list[str]:
        """Absolute DALI index paths of ``split``, aligned with :meth:`shard_paths`."""
        return [str(Path(root, s.index)) for s in self._split(split).shards]

    def split_digest(self, split: str) -> str:
        """A digest of ``split``'s samples as stored (its shards' checksums, in order): equal for the
        same shards wherever they are copied to."""
        sums = "".join(s.sha256 for s in self._split(split).shards)
        return hashlib.sha256(sums.encode()).hexdigest()

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise ManifestError(f"manifest has no split {split!r} (it has {sorted(self.splits)})")
        return self.splits[split]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "params": self.params,
            "splits": {name: s.to_dict() for name, s in self.splits.items()},
        }


def write_json_atomic(path: str | os.PathLike, obj: Any, fsync: bool = True) -> None:
    """Write ``obj`` as JSON to ``path``, atomically (fatscale.atomic)."""
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"), fsync)


def write_manifest(shard_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(shard_dir, MANIFEST_NAME)
    write_json_atomic(path, manifest.to_dict())
    return path


def load_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """Load and validate ``SHARD_DIR/manifest.json`` (or a path to the file itself)."""
    path = Path(shard_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest (make the shards first)") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ManifestError(f"{path}: not a manifest (nested too deeply)") from None
    return _parse(d, str(path))


# --- validation ------------------------------------------------------------------------------


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: {msg}")


def _int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, where,
          f"{key} must be a non-negative integer, got {v!r}")
    return v


def _str(d: dict, key: str, where: str) -> str:
    v = d.get(key)
    _need(isinstance(v, str) and v != "", where, f"{key} must be a non-empty string, got {v!r}")
    return v


def _parse(d: Any, where: str) -> Manifest:
    _need(isinstance(d, dict), where, "top level must be an object")
    fmt = d.get("format")
    _need(fmt == FORMAT, where, f"format is {fmt!r}, expected {FORMAT!r}")
    classes = d.get("classes")
    _need(isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes),
          where, "classes must be a non-empty list of strings")
    _need(len(set(classes)) == len(classes), where, "classes has duplicates")
    names = d.get("class_names", list(classes))
    _need(isinstance(names, list) and len(names) == len(classes)
          and all(isinstance(n, str) for n in names),
          where, f"class_names must be a list of {len(classes)} strings")
    params = d.get("params", {})
    _need(isinstance(params, dict), where, "params must be an object")
    splits_d = d.get("splits")
    _need(isinstance(splits_d, dict) and splits_d, where, "splits must be a non-empty object")
    splits: dict[str, SplitInfo] = {}
    seen_paths: set[str] = set()
    for name, s in splits_d.items():
        w = f"{where}: splits.{name}"
        _need(isinstance(s, dict), w, "must be an object")
        shards_d = s.get("shards")
        _need(isinstance(shards_d, list), w, "shards must be a list")
        shards = []
        for i, sh in enumerate(shards_d):
            ws = f"{w}.shards[{i}]"
            _need(isinstance(sh, dict), ws, "must be an object")
            info = ShardInfo(
                path=_str(sh, "path", ws),
                index=_str(sh, "index", ws),
                num_samples=_int(sh, "num_samples", ws),
                bytes=_int(sh, "bytes", ws),
                sha256=_str(sh, "sha256", ws),
            )
            _need(bool(_SHA256.fullmatch(info.sha256)), ws, f"sha256 is not 64 hex digits: {info.sha256!r}")
            _need(not os.path.isabs(info.path) and ".." not in Path(info.path).parts, ws,
                  f"path must be relative to the shard directory, got {info.path!r}")
            _need(info.path not in seen_paths, ws, f"shard {info.path!r} is listed twice")
            seen_paths.add(info.path)
            shards.append(info)
        skipped_d = s.get("skipped", [])
        _need(isinstance(skipped_d, list), w, "skipped must be a list")
        skipped = []
        for i, sk in enumerate(skipped_d):
            wk = f"{w}.skipped[{i}]"
            _need(isinstance(sk, dict), wk, "must be an object")
            skipped.append(SkippedFile(path=_str(sk, "path", wk), reason=_str(sk, "reason", wk)))
        num = _int(s, "num_samples", w)
        total = sum(sh.num_samples for sh in shards)
        _need(num == total, w, f"num_samples is {num} but its shards hold {total}")
        nsrc = _int(s, "num_source_files", w)
        _need(nsrc == num + len(skipped), w,
              f"num_source_files is {nsrc} but num_samples + skipped is {num + len(skipped)}")
        changes = s.get("changes", {})
        _need(isinstance(changes, dict) and all(isinstance(v, int) for v in changes.values()), w,
              "changes must map kinds of change to sample counts")
        splits[name] = SplitInfo(num_samples=num, num_source_files=nsrc,
                                 shuffled=bool(s.get("shuffled", False)), shards=shards,
                                 skipped=skipped, changes=dict(changes))
    return Manifest(classes=list(classes), class_names=list(names), splits=splits,
                    params=params, format=fmt)
