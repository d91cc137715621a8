"""Corrupt samples found while training: how they are recognised and kept out of DALI's way.

DALI cannot skip a sample its decoder fails on: the pipeline stops with a critical error
(github.com/NVIDIA/DALI/issues/3913). The loader then reads the samples that follow its last good
checkpoint from their tars, decodes each alone with the pipeline's own decoder operator, built by
the same function as in the pipeline, on the pipeline's device (PIL accepts files that
nvImageCodec rejects, and the other way round; so do DALI's whole-image and random-crop
decoders), and quarantines the undecodable ones, then restarts from that checkpoint.
Train: the source (fatscale.data.shard_samples.TrainSource) puts the next healthy sample of the
split in a quarantined sample's slot, so the batch count is unchanged and training continues
exactly where it was. Val (DALI's webdataset reader): the pipeline is replayed with the decoder fed
a placeholder to find the samples at DALI's reported offsets, and a private copy of the shard's
index points the sample's slot at the bytes of a neighbouring sample (same shard, same
components), named after the quarantined key; the evaluation leaves that slot out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from fatscale.data.shard_format import Index


@dataclass(frozen=True)
class QuarantinedSample:
    shard: str  # tar file name
    key: str  # sample key in the tar
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class DecodeCheck:
    """Decodes one encoded image at a time with each of ``decoders``, the functions that build the
    pipeline's decoder operators on ``decode`` ("cpu", or "mixed": nvJPEG / the hardware decoder)."""

    def __init__(self, decode: str, device_id: int | None, decoders: Sequence[Callable]):
        self.decode, self.device_id, self.decoders = decode, device_id, decoders
        self._pipe = None

    def _build(self):
        @pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1, seed=0)
        def decode_one():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            return tuple(decoder(encoded) for decoder in self.decoders)

        pipe = decode_one()
        pipe.build()
        return pipe

    def reason(self, encoded: bytes) -> str | None:
        """Why a decoder fails on ``encoded``, or None when all decode it."""
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(encoded, dtype=np.uint8)])
        try:
            self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # DALI: "Current pipeline object is no longer valid"
            lines = str(e).splitlines()
            detail = lines[lines.index("encountered:") + 2] if "encountered:" in lines[:-2] else lines[-1]
            return f"DALI {self.decode} decoder: {detail}"
        return None


def parse_source_info(info: bytes) -> tuple[str, int, str]:
    """DALI's webdataset ``source_info`` ("<tar path>:<offset>:<member name>") ->
    (tar path, offset of the member's bytes, sample key)."""
    path, offset, member = info.decode().rsplit(":", 2)
    return path, int(offset), member.split(".", 1)[0]


def read_member(tar_path: str, offset: int, index_path: str) -> bytes:
    """The bytes of the tar member at ``offset``, its size taken from the DALI index."""
    member = Index.parse(Path(index_path).read_text()).member_at(offset)
    if member is None:
        raise RuntimeError(f"{index_path}: no member at offset {offset} of {tar_path}")
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(member.size)


def write_patched_index(index_path: str, keys: dict[str, str], out_dir: Path) -> str:
    """Copy of the DALI index at ``index_path`` whose samples in ``keys`` (key -> reason) read
    the bytes of the nearest earlier (else later) healthy sample. Returns the new path."""
    index = Index.parse(Path(index_path).read_text())
    healthy = [i for i, sample in enumerate(index.samples) if sample[0].key not in keys]
    if not healthy:
        raise RuntimeError(f"{index_path}: every sample is undecodable ({sorted(keys)})")
    for i, sample in enumerate(index.samples):
        key = sample[0].key
        if key in keys:
            donor = index.samples[max((j for j in healthy if j < i), default=min(healthy))]
            # the donor's bytes under the own key
            index.samples[i] = tuple(m._replace(name=f"{key}.{m.name.split('.', 1)[1]}") for m in donor)
    out = out_dir / os.path.basename(index_path)
    out.write_text(index.text())
    return str(out)
