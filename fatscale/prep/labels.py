"""Labels that do not come from class folders: a flat val/ with a labels file, and class names."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from fatscale.prep.errors import MakeShardsError, quoted


class LabelEntry(NamedTuple):
    line: int  # in the labels file, from 1
    name: str  # file name, with or without its extension
    token: str  # class name (wnid) or class index


def class_names_for(classes: list[str]) -> list[str]:
    """Human-readable names: timm's ImageNet descriptions (WordNet lemmas) for wnids, else the folder names."""
    if not any(re.fullmatch(r"n\d{8}", c) for c in classes):
        return list(classes)
    from timm.data import ImageNetInfo  # imports torch: only for trees named by ImageNet class ids

    info = ImageNetInfo()
    names = []
    for c in classes:
        try:
            names.append(info.label_name_to_description(c))
        except KeyError:  # not a WordNet synset timm knows
            names.append(c)
    return names


def read_label_entries(path: Path) -> list[LabelEntry]:
    """The entries of Kaggle's LOC_val_solution.csv or of a plain 'FILENAME LABEL' list."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MakeShardsError(f"--val-labels {quoted(path)}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MakeShardsError(f"--val-labels {quoted(path)}: cannot read ({e})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first.replace(" ", "").lower().startswith("imageid,"):  # Kaggle: ImageId,PredictionString
        entries = _kaggle_entries(path, lines, first)
    else:
        entries = _plain_entries(path, lines)
    if not entries:
        raise MakeShardsError(f"--val-labels {quoted(path)}: no labels in the file")
    return entries


def _kaggle_entries(path: Path, lines: list[str], first: str) -> list[LabelEntry]:
    header = [h.strip().lower() for h in first.split(",")]
    if "predictionstring" not in header:
        raise MakeShardsError(f"--val-labels {quoted(path)}: CSV header has ImageId but no PredictionString column")
    i_id, i_pred = header.index("imageid"), header.index("predictionstring")
    entries = []
    started = False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not started:
            started = True
            continue
        cols = line.split(",")
        if len(cols) <= max(i_id, i_pred) or not cols[i_pred].split():
            raise MakeShardsError(f"--val-labels {quoted(path)} line {n}: expected ImageId,PredictionString, "
                                  f"got {quoted(line)!r}")
        entries.append(LabelEntry(n, cols[i_id].strip(), cols[i_pred].split()[0]))
    return entries


def _plain_entries(path: Path, lines: list[str]) -> list[LabelEntry]:
    """'filename label' per line (whitespace or comma separated), label = wnid or index."""
    entries = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = re.split(r"[\s,]+", s)
        if len(parts) != 2:
            raise MakeShardsError(f"--val-labels {quoted(path)} line {n}: expected 'FILENAME LABEL', got {quoted(s)!r}")
        entries.append(LabelEntry(n, parts[0], parts[1]))
    return entries


def label_flat_files(split_name: str, split_root: Path, raw: list[tuple[str, str, int]], labels_path: Path,
                     entries: list[LabelEntry], class_index: dict[str, int],
                     n_classes: int) -> dict[str, int]:
    """The label of each of a flat split's files (``raw``: rel, path, size), matching the entries
    by exact name, else by name without extension; every file needs one, every entry a file."""
    by_name = {rel for rel, _, _ in raw}
    by_stem: dict[str, list[str]] = {}
    for rel, _, _ in raw:
        by_stem.setdefault(os.path.splitext(rel)[0], []).append(rel)
    label_of: dict[str, tuple[int, int]] = {}  # rel -> (label, line)
    missing = []
    where = f"--val-labels {quoted(labels_path)}"
    for n, name, token in entries:
        if name in by_name:
            rel = name
        elif name in by_stem:
            if len(by_stem[name]) > 1:
                raise MakeShardsError(f"{where} line {n}: {quoted(name)!r} matches several files: "
                                      f"{', '.join(by_stem[name][:3])}")
            rel = by_stem[name][0]
        else:
            missing.append((n, name))
            continue
        label = _label(token, class_index, n_classes, f"{where} line {n}")
        if rel in label_of and label_of[rel][0] != label:
            raise MakeShardsError(f"{where} line {n}: {quoted(name)!r} is labelled {label} here but "
                                  f"{label_of[rel][0]} at line {label_of[rel][1]}")
        label_of[rel] = (label, n)
    if missing:
        n, name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MakeShardsError(f"{where} line {n}: {quoted(name)!r} matches no file in {quoted(split_root)}{more}")
    unlabelled = [rel for rel, _, _ in raw if rel not in label_of]
    if unlabelled:
        more = f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else ""
        raise MakeShardsError(f"{where}: no label for {quoted(split_name + '/' + unlabelled[0])}{more}")
    return {rel: label for rel, (label, _) in label_of.items()}


def _label(token: str, class_index: dict[str, int], n_classes: int, where: str) -> int:
    if token in class_index:  # a class (folder) name
        return class_index[token]
    if token.isdigit():  # else a class index
        label = int(token)
        if label >= n_classes:
            raise MakeShardsError(f"{where}: class index {label} out of range 0..{n_classes - 1}")
        return label
    raise MakeShardsError(f"{where}: unknown class {quoted(token)!r} (not one of the {n_classes} classes)")
