"""The plan: which source file goes into which shard under which key.

A pure function of the sorted file list, the seed and the size bounds: train is shuffled with
``random.Random(seed)``, val keeps its sorted order, and shards are cut greedily by sample count
and by each sample's tar size. In pass-through mode that size is known from the file size
(exact for every image whose bytes pass through); with ``--max-side`` or ``--quality`` output
sizes are unknown before encoding, so shards are cut by count, the count derived from
``--shard-size-mb`` and the mean output size of a fixed, evenly spaced calibration subset
encoded up front. Files that turn out undecodable leave a hole in their planned shard: the plan
never depends on processing results, and a resumed run is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fatscale.data.shard_format import sample_tar_bytes
from fatscale.prep.encode import EncodeOptions, SkipSample, load_sample
from fatscale.prep.source import Source, SourceFile, SplitSource

PLAN_VERSION = 2  # bump when the bytes of a shard change (2: stricter pass-through check)
CALIBRATION_SAMPLES = 64
KEY_STEM_CHARS = 64


class PlannedSample(NamedTuple):
    key: str
    rel: str
    path: str
    label: int


@dataclass
class ShardTask:
    split: str
    index: int
    out_dir: str
    samples: list[PlannedSample]
    classes_of: dict[int, str]  # label -> wnid, for the labels in this shard
    opts: EncodeOptions
    digest: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sample_key(pos: int, rel: str) -> str:
    stem = os.path.splitext(os.path.basename(rel))[0]
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:KEY_STEM_CHARS]
    return f"{pos:08d}_{stem}"


def order_files(files: list[SourceFile], shuffle: bool, seed: int) -> list[SourceFile]:
    ordered = sorted(files, key=lambda f: f.rel)
    if shuffle:
        random.Random(seed).shuffle(ordered)
    return ordered


def cut_shards(sizes: list[int], max_bytes: int | None, max_count: int | None) -> list[range]:
    """Greedy cut: a shard closes before the sample that would exceed a bound."""
    out, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        n = i - start
        if n and ((max_count and n >= max_count) or (max_bytes and acc + s > max_bytes)):
            out.append(range(start, i))
            start, acc = i, 0
        acc += s
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def _calibrate(split: SplitSource, opts: EncodeOptions) -> float:
    """Mean tar bytes per sample of an evenly spaced, fixed subset, encoded as the run will."""
    files = split.files
    k = min(CALIBRATION_SAMPLES, len(files))
    sizes = []
    for i in range(k):
        f = files[i * len(files) // k]
        try:
            sizes.append(sample_tar_bytes(len(load_sample(f.path, opts)[1])))
        except SkipSample:
            continue
    if not sizes:
        return sum(sample_tar_bytes(f.size) for f in files) / len(files)
    return sum(sizes) / len(sizes)


def plan_shards(source: Source, params: dict, opts: EncodeOptions,
                out: Path) -> tuple[dict[str, list[ShardTask]], dict]:
    """The shards of every split, and what calibration found (for the manifest's params)."""
    max_bytes = int(params["shard_size_mb"] * 1e6) if params["shard_size_mb"] else None
    max_count = params["samples_per_shard"]
    plans: dict[str, list[ShardTask]] = {}
    info: dict[str, Any] = {}
    reencode_mode = opts.quality is not None or opts.max_side is not None
    for name, split in source.splits.items():
        ordered = order_files(split.files, name == "train", params["seed"])
        count = max_count
        if reencode_mode and max_bytes:
            mean = _calibrate(split, opts)
            by_size = max(1, int(max_bytes // mean))
            count = min(count, by_size) if count else by_size
            info[name] = {"calibrated_bytes_per_sample": round(mean), "samples_per_shard": count}
            cuts = cut_shards([0] * len(ordered), None, count)
        else:
            cuts = cut_shards([sample_tar_bytes(f.size) for f in ordered], max_bytes, count)
        tasks = []
        for i, r in enumerate(cuts):
            samples = [PlannedSample(sample_key(p, ordered[p].rel), ordered[p].rel, ordered[p].path,
                                     ordered[p].label) for p in r]
            task_digest = digest([PLAN_VERSION, name, i, [(s.key, s.rel, s.label) for s in samples],
                                  [opts.max_side, opts.quality, opts.decode_check]])
            tasks.append(ShardTask(name, i, str(out), samples,
                                   {s.label: source.classes[s.label] for s in samples}, opts, task_digest))
        plans[name] = tasks
    return plans, info
