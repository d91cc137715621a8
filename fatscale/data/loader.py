"""DALI loaders over the shards that ``data_prep/make_shards.py`` writes.

Train: each epoch's global permutation of the split (fatscale.data.sample_order: a function of
(seed, epoch) only, whatever the number of ranks), read sample by sample from the shards by offset
(fatscale.data.shard_samples, DALI's parallel external source) -> decode fused with the
random-resized crop (``mixed`` = nvJPEG on a GPU, ``cpu`` otherwise) -> bicubic resize ->
RandAugment (timm-equivalent, ``fatscale.data.rand_augment``) or colour jitter -> flip + normalise
-> on the training device: random erasing and Mixup/CutMix + label smoothing (timm's, per batch).

Val: resize the shorter side to ``floor(img_size / crop_pct)`` (bicubic), centre crop
``img_size``, normalise; every sample is evaluated exactly once over all ranks (no padding samples
counted). ``img_size`` is ``data.img_size`` or one given to ``ValLoader`` (one loader per size of
``DataConfig.val_sizes``).

Train size: epoch ``e`` (``state.epoch``, from 0) crops to ``DataConfig.train_size(e)``
(``data.resolution``, else ``data.img_size``), ``TrainLoader.img_size``. The size is a scalar
argument of the graph, so where it changes, at an epoch boundary, the pipeline is rebuilt for the
new size from DALI's checkpoint taken at that boundary (as a resumed run's is): the graph is the
same, so the source's position and every random operator's state carry over, and the order and
random draws (crop windows, flips, RandAugment) are those of a run at a constant size. The
rebuild costs what a resume does (a pipeline build). The
old pipeline goes when the epoch before ends, and the memory it held is handed back
(``ReleaseUnusedMemory``: DALI's pools keep freed blocks otherwise).

Epochs (train): optimizer step ``s`` of an epoch trains on the global batch ``perm[s*B:(s+1)*B]``
(``B`` = ``batch_per_device x grad_accum x world_size``); rank ``r`` takes its micro-batches of that
batch in a fixed way (``SampleOrder``). Every rank yields ``steps_per_epoch x grad_accum``
micro-batches per epoch, so collective operations line up; the tail of fewer than ``B`` samples
(a different one each epoch) is not read. No sample is seen twice in an epoch.

Corrupt images: a sample DALI's decoder fails on is found, reported (log warning, counted in
``quarantine``) and replaced without stopping the run: see ``fatscale.data.quarantine``.

Position: ``TrainLoader.state_dict()`` (plain, JSON-able data) holds the epoch, the micro-batches
handed out in it, the (epoch, step) the pipeline started at, the batch layout, DALI's checkpoint
of the pipeline (the source's iteration and every random operator's state) after the last of them
and the quarantine; ``load_state_dict`` of it, in a new loader or this one, continues with exactly
the batches that had not been handed out, at the size of the saved epoch (the size is not saved:
it follows from the epoch and ``data``). A state saved under another layout (another number of
ranks) continues at the same optimizer step with the same samples; its random operators start
afresh from the seed and step. (Random erasing and Mixup draw from the host's generators, which
the trainer saves.)

``DataConfig`` and ``AugConfig`` are the recipe's sections (fatscale.config), valid once made.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import tempfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import ReleaseUnusedMemory
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.random_erasing import RandomErasing

from fatscale.data.config import MIN_IMG_SIZE, AugConfig, DataConfig
from fatscale.data.manifest import Manifest
from fatscale.data.quarantine import DecodeCheck, QuarantinedSample, parse_source_info, read_member, write_patched_index
from fatscale.data.rand_augment import RandAugmentSpec, rand_augment
from fatscale.data.sample_order import BatchLayout, SampleOrder
from fatscale.data.shard_samples import LABEL_DIGITS, ShardSamples, TrainSource
from fatscale.lifetime import start_resource_tracker

log = logging.getLogger(__name__)

READER = "reader"


def _placeholder_jpeg() -> np.ndarray:
    encoded = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(encoded, "JPEG")
    return np.frombuffer(encoded.getvalue(), dtype=np.uint8)


PLACEHOLDER_JPEG = _placeholder_jpeg()


def resolve_decode_device(setting: str, device: torch.device) -> str:
    """The decoder's DALI device for ``data.decode_device`` (a valid one: DataConfig checks it)
    on ``device``."""
    if setting == "mixed" and device.type != "cuda":
        raise ValueError(f"data.decode_device=mixed needs a CUDA training device, got {device}")
    if setting == "auto":
        return "mixed" if device.type == "cuda" else "cpu"
    return setting


def _normalize(images, cfg: DataConfig, mirror=None):
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="HWC" if cfg.channels_last else "CHW",
        mean=[255 * m for m in IMAGENET_DEFAULT_MEAN],
        std=[255 * s for s in IMAGENET_DEFAULT_STD],
        mirror=mirror if mirror is not None else 0,
    )


def _labels(cls):
    # ``.cls`` is decimal ASCII text; padded to a fixed width so the batch is a dense tensor.
    return fn.pad(cls, fill_value=0, shape=[LABEL_DIGITS])


def _read(paths, index_paths, info_len: int, probe: bool, **reader_args):
    """The reader, plus the decoder's input. The probe (fatscale.data.quarantine) must have the
    very operators and outputs of the real pipeline, or its checkpoint would not restore: only a
    constant differs, which sends every sample down the placeholder branch, where nothing fails."""
    jpg, cls = fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=["jpg", "cls"],
        missing_component_behavior="error",
        name=READER,
        **reader_args,
    )
    info = fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0, shape=[info_len])
    if jpg.shape()[0] >= (np.iinfo(np.int32).max if probe else 0):
        encoded = jpg
    else:
        encoded = types.Constant(PLACEHOLDER_JPEG, device="cpu")
    return encoded, _labels(cls), info


def _decode_whole(encoded, decode: str):
    """The val pipeline's decoder."""
    return fn.decoders.image(encoded, device=decode, output_type=types.RGB)


def _decode_random_crop(encoded, decode: str, aug: AugConfig):
    """The train pipeline's decoder: only the random-resized crop's window is decoded."""
    return fn.decoders.image_random_crop(
        encoded,
        device=decode,
        output_type=types.RGB,
        random_area=list(aug.scale),
        random_aspect_ratio=list(aug.ratio),
        num_attempts=10,
    )


def augment_train(encoded, cfg: DataConfig, aug: AugConfig, decode: str, img_size: int):
    """The train augmentation of encoded images, as DALI operators (also the reader benchmark's)."""
    images = _decode_random_crop(encoded, decode, aug)
    size = (img_size, img_size)  # only a scalar argument: a checkpoint restores across sizes (TrainLoader)
    images = fn.resize(images, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
    if aug.rand_augment:
        images = rand_augment(images, RandAugmentSpec(aug.rand_augment), shape=size, interp=aug.rand_augment_interp)
    elif aug.color_jitter > 0:
        jitter = [1 - aug.color_jitter, 1 + aug.color_jitter]
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=jitter),
            contrast=fn.random.uniform(range=jitter),
            saturation=fn.random.uniform(range=jitter),
        )
    mirror = fn.random.coin_flip(probability=aug.hflip)
    return _normalize(images, cfg, mirror)


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _train_pipeline(source: TrainSource, cfg: DataConfig, aug: AugConfig, decode: str, img_size: int):
    encoded, cls, index = fn.external_source(source=source, num_outputs=3, batch=False, parallel=True,
                                             dtype=[types.UINT8, types.UINT8, types.INT64])
    return augment_train(encoded, cfg, aug, decode, img_size), cls, index


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _val_pipeline(paths, index_paths, info_len: int, probe: bool, cfg: DataConfig, decode: str, shard_id: int,
                  num_shards: int, img_size: int):
    encoded, labels, info = _read(
        paths, index_paths, info_len, probe, shard_id=shard_id, num_shards=num_shards,
        stick_to_shard=True,
        pad_last_batch=True,  # padding repeats the last sample; the iterator trims it (PARTIAL)
    )
    images = _decode_whole(encoded, decode)
    images = fn.resize(
        images,
        resize_shorter=math.floor(img_size / cfg.crop_pct),  # timm's eval scale size
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )
    images = fn.crop(images, crop=(img_size, img_size), crop_pos_x=0.5, crop_pos_y=0.5)
    return _normalize(images, cfg), labels, info


def decode_labels(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [B, LABEL_DIGITS] of zero-padded ASCII digits -> int64 [B]."""
    digits = raw.long() - ord("0")
    present = raw != 0
    if bool(((digits < 0) | (digits > 9))[present].any()):
        raise ValueError("a .cls entry is not a decimal class index")
    value = torch.zeros(raw.shape[0], dtype=torch.long, device=raw.device)
    for column in range(raw.shape[1]):
        value = torch.where(present[:, column], value * 10 + digits[:, column], value)
    return value


@dataclass
class LoaderState:
    epoch: int = 0
    step: int = 0  # micro-batches handed out in this epoch
    checkpoint: str | None = None  # DALI pipeline checkpoint (serialized bytes), base64
    origin: tuple[int, int] = (0, 0)  # (epoch, step) where the pipeline of ``checkpoint`` started
    layout: tuple[int, int, int] | None = None  # (world size, micro-batch, grad_accum) of ``checkpoint``
    quarantine: list[dict] = field(default_factory=list)  # QuarantinedSample dicts


def _encode_checkpoint(checkpoint: bytes | None) -> str | None:
    return None if checkpoint is None else base64.b64encode(checkpoint).decode("ascii")


def _decode_checkpoint(checkpoint: str | None) -> bytes | None:
    return None if checkpoint is None else base64.b64decode(checkpoint)


class _DaliSplit:
    """One split's DALI pipeline and iterator."""

    policy: LastBatchPolicy
    reader_name: str | None
    img_size: int  # the size the pipeline yields now; it is (re)built for it when that changes

    def __init__(self, manifest: Manifest, split: str, cfg: DataConfig, batch_size: int, rank: int,
                 world_size: int, device: torch.device, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        if device.type == "cuda" and device.index is None:  # "cuda": DALI needs the GPU's index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.decode = resolve_decode_device(cfg.decode_device, device)
        self.num_samples = manifest.splits[split].num_samples
        self.paths = manifest.shard_paths(split, cfg.shards)
        self.index_paths = manifest.index_paths(split, cfg.shards)
        self._last_good: bytes | None = None  # where the pipeline (re)starts: after the last batch handed out
        self._it: DALIGenericIterator | None = None  # built by the first batch asked for
        self._built_size: int | None = None  # the img_size _it yields
        log.info("%s loader: rank %d/%d, decode on %s", split, rank, world_size, self.decode)

    def _pipeline(self, probe: bool = False, **kwargs):
        raise NotImplementedError

    def _decoders(self) -> list:
        """What the quarantine's DecodeCheck decodes with: the functions that build the pipeline's decoder."""
        raise NotImplementedError

    def _ahead(self) -> Iterator[tuple[str, str, bytes]]:
        """(shard name, key, encoded image) of every sample in the batches after the last good
        checkpoint that the failed one can be (at most the prefetch depth + 2 ahead)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Drop the pipeline, and hand the memory its buffers leave free in DALI's pools (device and
        pinned host memory) back to the system: DALI keeps freed blocks for reuse otherwise."""
        if self._it is not None:
            self._it = None  # the only reference to the pipeline: it is destroyed here
            ReleaseUnusedMemory()

    def _start(self, checkpoint: bytes | None) -> None:
        """(Re)build the pipeline at ``checkpoint`` (None: the start of the first epoch), for ``img_size``."""
        self._release()  # the old pipeline goes first
        pipe = self._pipeline(**self._pipe_kwargs(checkpoint))
        self._built_size = self.img_size
        self._it = DALIGenericIterator([pipe], ["images", "labels", "info"], reader_name=self.reader_name,
                                       last_batch_policy=self.policy, auto_reset=False, prepare_first_batch=False)
        self._last_good = checkpoint

    def _pipe_kwargs(self, checkpoint: bytes | None) -> dict:
        return dict(
            batch_size=self.batch_size,
            num_threads=self.cfg.num_threads,
            device_id=self.device.index if self.device.type == "cuda" else None,
            seed=self.seed + 1000 * self.rank,
            prefetch_queue_depth=self.cfg.prefetch,
            checkpoint=checkpoint,
        )

    def _next(self) -> dict:
        """The next batch; raises StopIteration at the end of the reader's epoch."""
        if self._it is None or self._built_size != self.img_size:
            self._start(self._last_good)
        try:
            batch = next(self._it)[0]
        except RuntimeError as error:  # DALI: "Critical error in pipeline"
            self._recover(error)
            return self._next()
        self._last_good = self._it.checkpoints()[0]
        return batch

    def _recover(self, error: RuntimeError) -> None:
        """Find the undecodable samples ahead of the last good checkpoint, quarantine them and
        restart from that checkpoint (module docstring of fatscale.data.quarantine)."""
        self._release()
        check = DecodeCheck(self.decode, self.device.index if self.device.type == "cuda" else None, self._decoders())
        known = {(q.shard, q.key) for q in self.quarantine}
        found = []
        for shard, key, encoded in self._ahead():
            reason = check.reason(encoded)
            if reason and (shard, key) not in known:
                found.append(QuarantinedSample(shard, key, reason))
                known.add((shard, key))
        if not found:
            raise RuntimeError(f"DALI pipeline failed and no undecodable sample was found ahead: {error}") from error
        for sample in found:
            log.warning("corrupt sample %s in %s (%s): quarantined", sample.key, sample.shard, sample.reason)
        self.quarantine += found
        self._start(self._last_good)

    def _convert(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last
        return images, decode_labels(batch["labels"]).to(self.device, non_blocking=True)


class TrainLoader(_DaliSplit):
    """Yields this rank's micro-batches of every optimizer step (module docstring, "Epochs");
    targets are soft labels (with label smoothing) when Mixup/CutMix is on, else class indices
    (the trainer then applies label smoothing in the loss, as timm's train.py does). A quarantined
    sample's slot holds the next healthy sample of the split. ``indices`` are the split's indices of
    the samples of the last batch yielded (``keys(...)`` names them)."""

    policy = LastBatchPolicy.FILL  # never reached: the source has no end
    reader_name = None

    def __init__(self, manifest: Manifest, cfg: DataConfig, aug: AugConfig, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_classes: int | None = None, device: torch.device | str = "cpu",
                 seed: int = 0, grad_accum: int = 1):
        super().__init__(manifest, "train", cfg, batch_size, rank, world_size, torch.device(device), seed)
        self.aug = aug
        self.layout = BatchLayout(batch_size * grad_accum * world_size, world_size, batch_size, grad_accum)
        self.samples = ShardSamples(self.paths, self.index_paths)
        self.order = SampleOrder(self.num_samples, seed, self.layout, rank)
        if self.order.steps_per_epoch == 0:
            raise ValueError(
                f"{cfg.shards}: {self.num_samples} train samples cannot fill one global batch of "
                f"{self.layout.global_batch} ({self.layout.describe()})")
        self.steps_per_epoch = self.order.steps_per_epoch  # optimizer steps
        self.state = LoaderState()  # load_state_dict() continues a saved one
        self.quarantine: list[QuarantinedSample] = []
        self.indices: np.ndarray | None = None
        self.random_erasing = (
            RandomErasing(aug.reprob, mode="pixel", max_count=1, device=self.device) if aug.reprob > 0 else None
        )
        num_classes = num_classes or manifest.num_classes
        mixing = aug.mixup > 0 or aug.cutmix > 0
        self.mixup = (
            Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                  switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing, num_classes=num_classes)
            if mixing else None
        )

    @property
    def img_size(self) -> int:
        """The train crop size of the current epoch (``state.epoch``): ``DataConfig.train_size``."""
        return self.cfg.train_size(self.state.epoch)

    def _source(self) -> TrainSource:
        index_of = {(self.samples.shard_name(i), self.samples.key(i)): i for i in range(len(self.samples))} \
            if self.quarantine else {}
        return TrainSource(self.samples, self.order, tuple(self.state.origin),
                           {index_of[(q.shard, q.key)] for q in self.quarantine})

    def _pipeline(self, **kwargs):
        if tuple(self.state.origin) != (0, 0):  # started afresh at a step (another layout): not step 0's draws
            kwargs["seed"] = int(np.random.SeedSequence([self.seed, self.rank, *self.state.origin]).generate_state(1)[0])
        start_resource_tracker()  # before DALI starts the reader processes that use it
        return _train_pipeline(self._source(), self.cfg, self.aug, self.decode, self.img_size,
                               py_num_workers=self.cfg.reader_workers, py_start_method="spawn", **kwargs)

    def _decoders(self) -> list:
        # The check cannot draw the window the pipeline drew: the whole image is decoded too, which
        # fails where some windows would (a truncated file: the windows that reach its missing rows).
        return [partial(_decode_random_crop, decode=self.decode, aug=self.aug),
                partial(_decode_whole, decode=self.decode)]

    def _ahead(self) -> Iterator[tuple[str, str, bytes]]:
        source = self._source()
        handed = self._handed_since_origin()
        for micro_batches in range(handed, handed + self.cfg.prefetch + 2):
            epoch, step, micro = self.order.position(tuple(self.state.origin), micro_batches)
            for slot in range(self.batch_size):
                index = source.index(epoch, step, micro, slot)
                yield self.samples.shard_name(index), self.samples.key(index), self.samples.read(index)[0]

    def _handed_since_origin(self) -> int:
        epoch, step = self.state.origin
        return ((self.state.epoch - epoch) * self.steps_per_epoch - step) * self.layout.grad_accum + self.state.step

    def keys(self, indices: np.ndarray) -> list[str]:
        return [self.samples.key(int(i)) for i in indices]

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return self.steps_per_epoch * self.layout.grad_accum

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch (the rest of it, after a restore)."""
        while self.state.step < len(self):
            batch = self._next()
            images, labels = self._convert(batch)
            self.indices = batch["info"].numpy().reshape(-1)
            self.state.step += 1
            if self.random_erasing is not None:
                images = self.random_erasing(images)
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
            yield images, labels
        self.state.epoch += 1
        self.state.step = 0
        if self.img_size != self._built_size:  # rebuilt at the next batch: the old one goes now, before the evaluation
            self._release()

    def state_dict(self) -> dict:
        """Where this loader is (module docstring, "Position"), as plain JSON-able data: ``epoch``,
        ``step`` (micro-batches handed out in it), ``checkpoint`` (DALI's, base64) with the
        ``origin`` and ``layout`` of its pipeline, and ``quarantine``."""
        layout = self.layout
        return dict(epoch=self.state.epoch, step=self.state.step, checkpoint=_encode_checkpoint(self._last_good),
                    origin=list(self.state.origin), layout=[layout.world_size, layout.micro_batch, layout.grad_accum],
                    quarantine=[q.to_dict() for q in self.quarantine])

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``, a ``state_dict()`` of a loader over the same shards with the
        same config and seed. Saved with this layout (world size, micro-batch, accumulation), the
        pipeline restores DALI's checkpoint: every random draw continues too. Saved with another
        one (a resume on another number of ranks), it must be at an optimizer step's end, and a
        new pipeline starts at that step: the same samples, other random draws. The pipeline is
        (re)built when the next batch is asked for."""
        loaded = LoaderState(**{**state, "origin": tuple(state.get("origin", (0, 0)))})
        saved_layout = tuple(loaded.layout) if loaded.layout else None
        here = (self.layout.world_size, self.layout.micro_batch, self.layout.grad_accum)
        if saved_layout != here:
            saved_accum = saved_layout[2] if saved_layout else 1
            if loaded.step % saved_accum:
                raise ValueError(f"loader state at micro-batch {loaded.step} of a step of {saved_accum}: not at "
                                 "an optimizer step's end")
            step = loaded.step // saved_accum
            loaded = replace(loaded, step=step * self.layout.grad_accum, checkpoint=None, origin=(loaded.epoch, step),
                             layout=None)
        if not 0 <= loaded.step <= len(self):
            raise ValueError(f"loader state at step {loaded.step} of an epoch of {len(self)} steps: "
                             "saved with another batch size or train split")
        self.state = replace(loaded, quarantine=[])
        self.quarantine = [QuarantinedSample(**q) for q in loaded.quarantine]
        self._last_good = _decode_checkpoint(loaded.checkpoint)
        self._release()


class ValLoader(_DaliSplit):
    """Each rank yields its contiguous part of the val split (or of ``split``: fatscale.evaluate
    --split train), read in order by DALI's webdataset reader, every sample exactly once; a
    quarantined sample is left out (and listed in ``quarantine``).

    Each pass (evaluation) builds its pipeline and releases it at its end: kept between
    evaluations, it would hold its buffers (prefetched batches, decoder state: GPU memory on a GPU)
    through the training epochs, at every eval size, and a built pipeline gives none back, whatever
    its prefetch depth. A fresh pipeline costs its pass ~0.2 s (build, decoder start-up; on 2 CPU
    cores, where a pass over 1000 ImageNet images at 224 px takes ~6 s)."""

    policy = LastBatchPolicy.PARTIAL
    reader_name = READER

    def __init__(self, manifest: Manifest, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", img_size: int | None = None, split: str = "val"):
        self.img_size = cfg.img_size if img_size is None else img_size  # one of cfg.val_sizes, for the trainer
        if self.img_size < MIN_IMG_SIZE:
            raise ValueError(f"val img_size {self.img_size}: must be at least {MIN_IMG_SIZE}")
        super().__init__(manifest, split, cfg, batch_size, rank, world_size, torch.device(device), 0)
        # The reader's split of N samples over W shards: [floor(N r / W), floor(N (r + 1) / W)).
        self.rank_samples = (self.num_samples * (rank + 1)) // world_size - (self.num_samples * rank) // world_size
        self.info_len = max(len(p) for p in self.paths) + 64  # "<tar>:<offset>:<member name>"
        self.quarantine: list[QuarantinedSample] = []
        self._patched_dir: tempfile.TemporaryDirectory | None = None  # removed with the loader, or at exit

    def _pipeline(self, probe: bool = False, **kwargs):
        return _val_pipeline(self.paths, self._current_index_paths(), self.info_len, probe, self.cfg, self.decode,
                             self.rank, self.world_size, self.img_size, **kwargs)

    def _current_index_paths(self) -> list[str]:
        if not self.quarantine:
            return self.index_paths
        if self._patched_dir is None:
            self._patched_dir = tempfile.TemporaryDirectory(prefix="fatscale-index-")
        paths = list(self.index_paths)
        for i, tar in enumerate(self.paths):
            keys = {q.key: q.reason for q in self.quarantine if q.shard == Path(tar).name}
            if keys:
                paths[i] = write_patched_index(self.index_paths[i], keys, Path(self._patched_dir.name))
        return paths

    def _decoders(self) -> list:
        return [partial(_decode_whole, decode=self.decode)]

    def _ahead(self) -> Iterator[tuple[str, str, bytes]]:
        # The batches after the last good checkpoint replayed with the decoder fed a placeholder
        # (fatscale.data.quarantine): the reader says which samples they hold.
        index_of = dict(zip(self.paths, self._current_index_paths()))
        probe = self._pipeline(True, **self._pipe_kwargs(self._last_good))
        probe.build()
        for _ in range(self.cfg.prefetch + 2):
            info = probe.run()[2]
            for i in range(len(info)):
                tar, offset, key = parse_source_info(bytes(info.at(i)).rstrip(b"\0"))
                yield Path(tar).name, key, read_member(tar, offset, index_of[tar])

    def __len__(self) -> int:
        return math.ceil(self.rank_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass from the first sample; the pipeline is released when it ends or is left unfinished."""
        try:
            while True:
                batch = self._next()
                images, labels = self._convert(batch)
                if self.quarantine:
                    keep = self._not_quarantined(batch["info"])
                    images, labels = images[keep], labels[keep]
                yield images, labels
        except StopIteration:
            pass
        finally:
            self._release()
            self._last_good = None  # the next pass starts at the split's first sample

    def _not_quarantined(self, info: torch.Tensor) -> torch.Tensor:
        bad = {(q.shard, q.key) for q in self.quarantine}
        keep = []
        for row in info.numpy():
            tar, _offset, key = parse_source_info(row.tobytes().rstrip(b"\0"))
            keep.append((Path(tar).name, key) not in bad)
        return torch.tensor(keep, device=self.device)
