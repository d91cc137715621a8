"""The train split's samples by global index, read straight from the shards by offset, for DALI's
parallel external source.

``fn.readers.webdataset`` reads each rank's contiguous part of the shards in order (shuffling only
within a buffer), which ties the order of samples to the number of ranks. A global order
(fatscale.data.sample_order) needs random access: the shards' DALI index files give every
member's offset and size, so a sample is two ``pread`` calls, done by DALI's Python reader
processes (``parallel=True``; decoding stays DALI's, on the GPU with ``mixed``). On 2 CPU cores the
train pipeline reads as fast this way as through the webdataset reader (BENCHMARKS.md, "Train
reader").

``TrainSource`` is the source callable: DALI counts the batches it asked for (its ``iteration``,
kept in DALI's checkpoints), and the source maps batch ``i`` of a pipeline that started at
``origin`` (epoch, step) to the samples of ``SampleOrder``. A sample quarantined as undecodable
(fatscale.data.quarantine) is replaced by the next healthy one of the split; the batch's ``index``
output says which sample each slot holds.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from fatscale.data.sample_order import SampleOrder
from fatscale.data.shard_format import Index
from fatscale.lifetime import end_with_parent

LABEL_DIGITS = 8  # ``.cls`` holds the class index as decimal ASCII, padded to this many bytes


class ShardSamples:
    """Where each sample's ``.jpg`` and ``.cls`` members lie in the shards (picklable: no open
    files are kept across pickling)."""

    def __init__(self, paths: list[str], index_paths: list[str]):
        self.paths = list(paths)
        shard, jpg, cls, keys = [], [], [], []
        for i, index_path in enumerate(index_paths):
            for sample in Index.parse(Path(index_path).read_text()).samples:
                members = {m.ext: m for m in sample}
                if "jpg" not in members or "cls" not in members:
                    raise ValueError(f"{index_path}: sample {sample[0].key} lacks a .jpg or .cls member")
                shard.append(i)
                jpg.append((members["jpg"].offset, members["jpg"].size))
                cls.append((members["cls"].offset, members["cls"].size))
                keys.append(sample[0].key)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.jpg = np.asarray(jpg, dtype=np.int64).reshape(-1, 2)
        self.cls = np.asarray(cls, dtype=np.int64).reshape(-1, 2)
        self.keys = np.asarray(keys, dtype=np.bytes_)
        self._files: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def __del__(self):
        for fd in self._files.values():
            os.close(fd)

    def key(self, index: int) -> str:
        return self.keys[index].decode()

    def shard_name(self, index: int) -> str:
        return os.path.basename(self.paths[self.shard[index]])

    def read(self, index: int) -> tuple[bytes, bytes]:
        """The sample's encoded image and its ``.cls`` text."""
        shard = int(self.shard[index])
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        (jpg_at, jpg_size), (cls_at, cls_size) = self.jpg[index], self.cls[index]
        return os.pread(fd, int(jpg_size), int(jpg_at)), os.pread(fd, int(cls_size), int(cls_at))


class TrainSource:
    """DALI's source callable (sample mode): the sample in slot ``idx_in_batch`` of this rank's
    micro-batch number ``iteration`` since ``origin`` -> (encoded image, label digits, index)."""

    def __init__(self, samples: ShardSamples, order: SampleOrder, origin: tuple[int, int], quarantined: set[int]):
        self.samples, self.order, self.origin = samples, order, origin
        healthy = np.setdiff1d(np.arange(len(samples)), np.fromiter(quarantined, dtype=np.int64))
        if not len(healthy):
            raise ValueError("every train sample is quarantined as undecodable")
        self.quarantined = frozenset(quarantined)
        self.healthy = healthy

    def __setstate__(self, state: dict) -> None:
        # Unpickled in a DALI reader process. Slurm signals every process of a job step (USR2 before
        # the time limit, TERM) and Ctrl-C the whole process group (INT): they are for the rank, which
        # stops at a step's end; a reader that died of them first would fail or hang its batch. It
        # ends with the rank instead, however the rank ends.
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        end_with_parent(signal.SIGKILL)
        self.__dict__.update(state)

    def index(self, epoch: int, step: int, micro: int, slot: int) -> int:
        """The sample that ``slot`` of that micro-batch holds (a quarantined one's healthy successor)."""
        index = int(self.order.micro_batch(epoch, step, micro)[slot])
        if index in self.quarantined:
            index = int(self.healthy[np.searchsorted(self.healthy, index) % len(self.healthy)])
        return index

    def __call__(self, info) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch, step, micro = self.order.position(self.origin, info.iteration)
        index = self.index(epoch, step, micro, info.idx_in_batch)
        encoded, label = self.samples.read(index)
        digits = np.zeros(LABEL_DIGITS, dtype=np.uint8)
        digits[:len(label)] = np.frombuffer(label[:LABEL_DIGITS], dtype=np.uint8)
        return np.frombuffer(encoded, dtype=np.uint8), digits, np.array([index], dtype=np.int64)
