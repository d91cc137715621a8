"""The ``manifest.json`` that ``data_prep/make_shards.py`` writes next to its shards.

One place defines the schema (fatscale.schema dataclasses), so the shard writer, ``--verify`` and the DALI
loader agree on it. ``load_manifest`` validates everything a reader relies on and fails with a one-line
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

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fatscale.atomic import write_json_atomic
from fatscale.schema import NON_NEGATIVE, SchemaError, Section, build, must, setting

MANIFEST_NAME = "manifest.json"
FORMAT = "fatscale-shards/1"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent (one-line message)."""


def _relative(path: str) -> bool:
    return not os.path.isabs(path) and ".." not in Path(path).parts


NON_EMPTY = must(lambda v: v != "", "a non-empty string")


@dataclass(frozen=True)
class ShardInfo(Section):
    path: str = setting(check=must(_relative, "relative to the shard directory"))  # tar file
    index: str = setting(check=NON_EMPTY)  # DALI index file (wds2idx format), relative to the shard directory
    num_samples: int = setting(check=NON_NEGATIVE)
    bytes: int = setting(check=NON_NEGATIVE)
    sha256: str = setting(check=must(lambda v: _SHA256.fullmatch(v) is not None, "64 hex digits"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SkippedFile(Section):
    path: str = setting(check=NON_EMPTY)  # relative to the source root
    reason: str = setting(check=NON_EMPTY)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SplitInfo(Section):
    num_samples: int = setting(check=NON_NEGATIVE)
    num_source_files: int = setting(check=NON_NEGATIVE)
    shuffled: bool = False
    shards: list[ShardInfo] = setting(factory=list)
    skipped: list[SkippedFile] = setting(factory=list)
    changes: dict[str, int] = setting(factory=dict)  # kind of change -> samples

    def _check_together(self) -> None:
        total = sum(shard.num_samples for shard in self.shards)
        if self.num_samples != total:
            raise SchemaError(f"num_samples is {self.num_samples} but its shards hold {total}", whole=True)
        if self.num_source_files != self.num_samples + len(self.skipped):
            raise SchemaError(f"num_source_files is {self.num_source_files} but num_samples + skipped is "
                              f"{self.num_samples + len(self.skipped)}", whole=True)

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
class Manifest(Section):
    classes: list[str] = setting(check=must(lambda v: v and all(v) and len(set(v)) == len(v),
                                            "a non-empty list of distinct class names"))
    class_names: list[str] = setting(factory=list)  # [] in a file: the classes
    splits: dict[str, SplitInfo] = setting(factory=dict, check=must(bool, "a non-empty mapping of splits"))
    params: dict[str, Any] = setting(factory=dict)  # the arguments the shards were made with
    format: str = FORMAT

    def _check_together(self) -> None:
        if len(self.class_names) != len(self.classes):
            raise SchemaError(f"class_names: must be a list of {len(self.classes)} strings, one per class")
        listed = Counter(shard.path for split in self.splits.values() for shard in split.shards)
        twice = sorted(path for path, times in listed.items() if times > 1)
        if twice:
            raise SchemaError(f"splits: shard {twice[0]!r} is listed twice")

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
    if not isinstance(d, dict):
        raise ManifestError(f"{path}: not a manifest (the top level is not an object)")
    if d.get("format") != FORMAT:  # another format is not checked key by key
        raise ManifestError(f"{path}: format is {d.get('format')!r}, expected {FORMAT!r}")
    if "class_names" not in d:
        d["class_names"] = d.get("classes")
    try:
        return build(Manifest, d)
    except SchemaError as e:
        raise ManifestError(f"{path}: {e}") from None
