"""``make_shards``: scan, plan, build the shards an earlier identical run did not commit, and write
the manifest from the commit records."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from fatscale.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SkippedFile, SplitInfo, write_manifest
from fatscale.prep.build import OnShard, default_workers, run_tasks
from fatscale.prep.encode import EncodeOptions
from fatscale.prep.errors import PROG, MakeShardsError, RunStopped, quoted
from fatscale.prep.plan import ShardTask, plan_shards
from fatscale.prep.slurm import SlurmOptions, build_on_slurm, check_options, failure_line, running_array
from fatscale.prep.source import Source, scan_source
from fatscale.prep.state import check_out_dir, committed, create_state_dir, locked, run_params, start_run


def _validate_args(shard_size_mb, samples_per_shard, max_side, quality, workers, slurm) -> None:
    if shard_size_mb is not None and shard_size_mb < 0:
        raise MakeShardsError(f"--shard-size-mb must be >= 0 (0: no size bound), got {shard_size_mb}")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise MakeShardsError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not shard_size_mb and not samples_per_shard:
        raise MakeShardsError("--shard-size-mb 0 needs --samples-per-shard (a shard needs some bound)")
    if max_side is not None and max_side < 16:
        raise MakeShardsError(f"--max-side must be >= 16, got {max_side}")
    if quality is not None and not 1 <= quality <= 100:
        raise MakeShardsError(f"--quality must be in 1..100, got {quality}")
    if workers is not None and workers < 1:
        raise MakeShardsError(f"--workers must be >= 1, got {workers}")
    if workers is not None and slurm is not None:
        raise MakeShardsError(f"--workers {workers} is for a local run; a Slurm task runs --cpus-per-task workers")
    if slurm is not None:
        check_options(slurm)


def make_shards(src, out, *, splits: list[str] | None = None, val_labels=None, seed: int = 0,
                shard_size_mb: float = 1000, samples_per_shard: int | None = None,
                max_side: int | None = None, quality: int | None = None, workers: int | None = None,
                decode_check: bool = False, fsync: bool = False, progress: bool = True,
                log=print, on_shard: OnShard | None = None, slurm: SlurmOptions | None = None) -> Manifest:
    """Shard ``src`` into ``out``; resume what an earlier identical run left (fatscale.prep).

    ``log`` takes the summary's lines (None: no summary); ``on_shard`` is called in this process
    with each shard's commit record as it is committed (a local run's). ``slurm``: build the
    shards as a Slurm job array instead (fatscale.prep.slurm), with the same result.
    """
    t0 = time.perf_counter()
    _validate_args(shard_size_mb, samples_per_shard, max_side, quality, workers, slurm)
    workers = workers or default_workers()
    source = scan_source(src, splits, val_labels)
    out = Path(out)
    for split in source.splits.values():
        if out.resolve().is_relative_to(split.root.resolve()):
            raise MakeShardsError(f"--out {quoted(out)} is inside the source split {quoted(split.root)}")
    params = run_params(source, dict(seed=seed, shard_size_mb=shard_size_mb, samples_per_shard=samples_per_shard,
                                     max_side=max_side, quality=quality, decode_check=decode_check))
    check_out_dir(out, params)
    create_state_dir(out)
    with locked(out):
        array = running_array(out)
        if array is None:
            start_run(out, params)  # removes temporary files, which a running array's tasks are writing
        elif slurm is None:
            raise MakeShardsError(f"array job {array.job_id} is still building shards in {quoted(out)}; wait, "
                                  f"re-attach with the same --slurm-tasks command, or scancel {array.job_id}")
        opts = EncodeOptions(max_side=max_side, quality=quality, decode_check=decode_check, fsync=fsync)
        plans, plan_info = plan_shards(source, params, opts, out)
        shards = [t for tasks in plans.values() for t in tasks]
        records, todo = committed(out, shards)
        kept, n_todo = len(records), sum(len(t.samples) for t in todo)
        if slurm is None:
            if todo and workers > 1 and len(todo) < workers and log:
                log(f"{PROG}: note: {len(todo)} shard(s) for {workers} workers; a smaller --shard-size-mb "
                    f"gives more parallelism")
            processed_bytes = run_tasks(todo, workers, n_todo, progress, records, on_shard)
        else:
            array = build_on_slurm(out, todo, kept, slurm, array, progress, log)
            records, missing = committed(out, shards)
            if missing:
                raise RunStopped(failure_line(out, array, missing))
            processed_bytes = None  # read by the tasks
        manifest = _manifest(source, plans, records, dict(params, source=str(source.root.resolve()), plan=plan_info))
        write_manifest(out, manifest)
    if log:
        _summary(manifest, out, time.perf_counter() - t0, kept, len(todo), n_todo, processed_bytes, source, log)
    return manifest


def _manifest(source: Source, plans: dict[str, list[ShardTask]], records: dict[str, dict],
              params: dict) -> Manifest:
    """The manifest, assembled from the commit records in plan order."""
    splits_out: dict[str, SplitInfo] = {}
    for name, tasks in plans.items():
        split = source.splits[name]
        shards, skipped, changes = [], list(split.skipped), Counter()
        for t in tasks:
            rec = records[t.name]
            skipped.extend(SkippedFile(s["path"], s["reason"]) for s in rec["skipped"])
            changes.update(rec["changes"])
            if rec["num_samples"]:
                shards.append(ShardInfo(rec["path"], rec["index"], rec["num_samples"], rec["bytes"], rec["sha256"]))
        skipped.sort(key=lambda s: s.path)
        splits_out[name] = SplitInfo(
            num_samples=sum(s.num_samples for s in shards),
            num_source_files=len(split.files) + len(split.skipped),
            shuffled=name == "train", shards=shards, skipped=skipped, changes=dict(changes))
    return Manifest(classes=source.classes, class_names=source.class_names, splits=splits_out, params=params)


def _summary(m: Manifest, out: Path, seconds: float, kept: int, written: int, n_imgs: int,
             nbytes: int | None, source: Source, log) -> None:
    read = "" if nbytes is None else f", {nbytes / 1e6 / seconds:.1f} MB/s read"
    log(f"{PROG}: wrote {written} shard(s), kept {kept} from an earlier run, in {seconds:.1f} s "
        f"({n_imgs / seconds:.0f} images/s{read})")
    for name, s in m.splits.items():
        size = sum(sh.bytes for sh in s.shards)
        ch = ", ".join(f"{v} {k}" for k, v in sorted(s.changes.items())) or "none"
        log(f"  {name}: {s.num_samples} samples in {len(s.shards)} shards ({size / 1e6:.1f} MB), "
            f"{len(s.skipped)} skipped, changed: {ch}")
        if source.splits[name].empty_classes:
            e = source.splits[name].empty_classes
            log(f"  {name}: warning: {len(e)} class folder(s) without images, e.g. {quoted(e[0])}")
    skipped = [(n, k) for n, s in m.splits.items() for k in s.skipped]
    for _, k in skipped[:20]:
        log(f"  skipped {quoted(k.path)}: {quoted(k.reason)}")
    if len(skipped) > 20:
        log(f"  ... and {len(skipped) - 20} more skipped (see {MANIFEST_NAME})")
    log(f"  manifest: {out / MANIFEST_NAME}")
