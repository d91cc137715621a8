"""The source tree: its splits, class folders and image files, each with its label."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fatscale.data.manifest import SkippedFile
from fatscale.prep.errors import MakeShardsError, quoted
from fatscale.prep.labels import LabelEntry, class_names_for, label_flat_files, read_label_entries

# torchvision's IMG_EXTENSIONS, compared case-insensitively
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceFile(NamedTuple):
    rel: str  # path relative to the split directory, as found ("n01440764/x.JPEG")
    path: str  # absolute path to read
    size: int
    label: int


@dataclass
class SplitSource:
    name: str
    root: Path
    files: list[SourceFile]  # sorted by rel
    skipped: list[SkippedFile]  # found but not an image (paths relative to the source root)
    layout: str  # "folders" or "flat"
    empty_classes: list[str] = field(default_factory=list)


@dataclass
class Source:
    root: Path
    classes: list[str]
    class_names: list[str]
    splits: dict[str, SplitSource]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _walk(top: Path, rel: str, files: list, skipped: list, split: str, seen: set) -> None:
    """Recursively list ``top`` (following symlinks, loop-safe) into files/skipped."""
    real = os.path.realpath(top)
    if real in seen:
        skipped.append(SkippedFile(f"{split}/{rel}".rstrip("/"), "symlink loop (directory already visited)"))
        return
    seen = seen | {real}
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as e:
        skipped.append(SkippedFile(f"{split}/{rel}".rstrip("/"), f"unreadable directory: {e.strerror}"))
        return
    for e in entries:
        r = f"{rel}{e.name}"
        try:
            is_dir = e.is_dir()  # follows symlinks
        except OSError:
            is_dir = False
        if is_dir:
            _walk(Path(e.path), r + "/", files, skipped, split, seen)
            continue
        _add_file(e, r, files, skipped, split)


def _add_file(e: os.DirEntry, rel: str, files: list, skipped: list, split: str) -> None:
    """Append (rel, absolute path, size) to files, or the reason it is no sample to skipped."""
    if not _is_image_name(e.name):
        ext = os.path.splitext(e.name)[1] or "(none)"
        skipped.append(SkippedFile(f"{split}/{rel}", f"not an image file (extension {ext})"))
        return
    try:
        st = e.stat()  # follows symlinks
    except OSError as err:
        reason = "broken symlink" if e.is_symlink() else f"cannot stat: {err.strerror}"
        skipped.append(SkippedFile(f"{split}/{rel}", reason))
        return
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever
        skipped.append(SkippedFile(f"{split}/{rel}", "not a regular file"))
        return
    files.append((rel, e.path, st.st_size))  # absolute: scan_source starts from an absolute root


def _split_entries(root: Path) -> tuple[list[str], list[os.DirEntry]]:
    """Class folder names (sorted, like torchvision's ImageFolder) and the other entries."""
    dirs, others = [], []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise MakeShardsError(f"cannot list {quoted(root)}: {e.strerror}") from None
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            dirs.append(e.name)
        else:
            others.append(e)
    return dirs, others


def scan_source(src: str | os.PathLike, splits: list[str] | None = None,
                val_labels: str | os.PathLike | None = None) -> Source:
    """List and label every file; raise MakeShardsError (one line) on any inconsistency."""
    root = Path(os.path.abspath(src))  # absolute (not resolved: paths stay as found)
    present = _present_splits(root, splits)
    if val_labels is not None and "val" not in present:
        raise MakeShardsError(f"--val-labels given but {quoted(root / 'val')} is not being sharded")
    # the class list: train's class folders when there is a train/, even if it is not sharded now
    layouts = {s: _split_entries(root / s) for s in set(present) | ({"train"} if (root / "train").is_dir() else set())}
    classes = _folder_classes(root, present, layouts)
    label_entries = read_label_entries(Path(val_labels)) if val_labels is not None else None
    if classes is None:
        classes = _label_classes(root / present[0], label_entries, val_labels)
    class_index = {c: i for i, c in enumerate(classes)}
    out: dict[str, SplitSource] = {}
    for s in present:
        dirs, others = layouts[s]
        if dirs:
            split = _folder_split(root / s, s, dirs, others, class_index, label_entries is not None)
        else:
            split = _flat_split(root / s, s, others, class_index, label_entries, val_labels)
        if not split.files:
            raise MakeShardsError(f"{quoted(root / s)} contains no image files")
        split.skipped.sort(key=lambda k: k.path)
        out[s] = split
    return Source(root=root, classes=classes, class_names=class_names_for(classes), splits=out)


def _present_splits(root: Path, splits: list[str] | None) -> list[str]:
    """The splits to shard: those named, else those of train and val that are there."""
    if not root.exists():
        raise MakeShardsError(f"source {quoted(root)} does not exist")
    if not root.is_dir():
        raise MakeShardsError(f"source {quoted(root)} is not a directory")
    names = splits if splits is not None else ["train", "val"]
    present = [s for s in names if (root / s).is_dir()]
    if splits is not None:
        for s in names:
            if not (root / s).is_dir():
                raise MakeShardsError(f"split {s!r} not found: {quoted(root / s)} is not a directory")
    if not present:
        raise MakeShardsError(f"source {quoted(root)} has no train/ or val/ directory "
                              f"(expected SRC/train/<class>/*.JPEG; --splits names others)")
    return present


def _folder_classes(root: Path, present: list[str], layouts: dict) -> list[str] | None:
    """train's class folders, else those of the first split with folders (None: no split has any)."""
    if "train" in layouts:
        if not layouts["train"][0]:
            raise MakeShardsError(f"{quoted(root / 'train')} has no class folders (expected train/<class>/*.JPEG)")
        return layouts["train"][0]
    folder_splits = [s for s in present if layouts[s][0]]
    return layouts[folder_splits[0]][0] if folder_splits else None


def _label_classes(split_root: Path, label_entries: list[LabelEntry] | None, val_labels) -> list[str]:
    """Only a flat val/: the classes are the wnids of the labels file."""
    if label_entries is None:
        raise MakeShardsError(f"{quoted(split_root)} has no class folders; pass --val-labels FILE")
    tokens = {e.token for e in label_entries}
    if any(t.isdigit() for t in tokens):
        raise MakeShardsError(f"--val-labels {quoted(val_labels)}: class indices need the class list from "
                              f"SRC/train/, which is missing")
    return sorted(tokens)


def _folder_split(sroot: Path, s: str, dirs: list[str], others: list[os.DirEntry], class_index: dict[str, int],
                  labels_given: bool) -> SplitSource:
    if s == "val" and labels_given:
        raise MakeShardsError(f"--val-labels given but {quoted(sroot)} has class folders (labels come from them)")
    unknown = [d for d in dirs if d not in class_index]
    if unknown:
        raise MakeShardsError(f"class folder {quoted(s + '/' + unknown[0])} is not a class of train/ "
                              f"({len(unknown)} unknown folder(s))")
    skipped = [SkippedFile(f"{s}/{e.name}", "not inside a class folder") for e in others]
    raw: list[tuple[str, str, int]] = []
    files: list[SourceFile] = []
    empty = []
    seen = {os.path.realpath(sroot)}
    for d in dirs:
        before = len(raw)
        _walk(sroot / d, d + "/", raw, skipped, s, seen)
        if len(raw) == before:
            empty.append(d)
        files.extend(SourceFile(r, p, size, class_index[d]) for r, p, size in raw[before:])
    return SplitSource(s, sroot, files, skipped, "folders", empty)


def _flat_split(sroot: Path, s: str, others: list[os.DirEntry], class_index: dict[str, int],
                label_entries: list[LabelEntry] | None, val_labels) -> SplitSource:
    if s != "val":
        raise MakeShardsError(f"{quoted(sroot)} has no class folders (expected {s}/<class>/*.JPEG)")
    raw: list[tuple[str, str, int]] = []
    skipped: list[SkippedFile] = []
    for e in others:
        _add_file(e, e.name, raw, skipped, s)
    files: list[SourceFile] = []
    if raw:
        if label_entries is None:
            raise MakeShardsError(f"{quoted(sroot)} holds {len(raw)} images but no class folders; "
                                  f"pass --val-labels FILE")
        label_of = label_flat_files(s, sroot, raw, Path(val_labels), label_entries, class_index, len(class_index))
        files = [SourceFile(rel, p, size, label_of[rel]) for rel, p, size in raw]
    return SplitSource(s, sroot, files, skipped, "flat")
