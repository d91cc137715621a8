"""The shard format: WebDataset tar files and their DALI index files (``wds2idx``'s format).

One place writes, parses and derives both, for the shard writer (fatscale.prep), ``--verify``
and the quarantine of corrupt samples (fatscale.data.quarantine).

A shard is a ustar/PAX tar as ``webdataset.TarWriter(encoder=False, mtime=0)`` writes it: per
sample, its members ``<key>.<ext>`` in sorted extension order, each a 512-byte header and the
payload padded to 512 bytes; at the end two zero blocks, padded to tarfile's 10 KiB record.

Its index is a text file: ``v1.2 <samples>``, then per sample a line of ``ext offset size name``
per member (offset: of the member's bytes in the tar).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile (and webdataset.TarWriter) pad the archive to this
INDEX_VERSION = "v1.2"


def _pad(n: int) -> int:
    return (-n) % TAR_BLOCK


def _tarfile_header(name: str, size: int) -> bytes:
    """The member header webdataset.TarWriter(encoder=False, mtime=0) writes, built by tarfile."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uname = ti.gname = "bigdata"
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_HEADER_TEMPLATE = _tarfile_header("", 0)
# the checksum of a header is the byte sum with its own field as spaces: precompute the
# template's share without the name (bytes 0-99), size (124-135) and checksum (148-155) fields
_TEMPLATE_SUM = sum(_HEADER_TEMPLATE[100:124]) + sum(_HEADER_TEMPLATE[136:148]) + 8 * 32 + sum(_HEADER_TEMPLATE[156:])
_T_MODE_UID_GID, _T_MTIME, _T_REST = _HEADER_TEMPLATE[100:124], _HEADER_TEMPLATE[136:148], _HEADER_TEMPLATE[155:]


def _tar_header(name: str, size: int) -> bytes:
    """``_tarfile_header`` in ~1.5 us instead of ~30 us (three per sample; tests compare them).

    tarfile's header for a short ASCII name is its template with name, size and checksum
    filled in; anything else goes to tarfile itself.
    """
    if not name.isascii() or len(name) > 100 or not name or size >= 8**11:
        buf = _tarfile_header(name, size)
        if len(buf) != TAR_BLOCK:
            raise ValueError(f"tar member name {name!r} does not fit one ustar header")
        return buf
    nb = name.encode("ascii")
    sz = b"%011o\0" % size
    chk = b"%06o\0" % (_TEMPLATE_SUM + sum(nb) + sum(sz))
    return b"".join((nb, bytes(100 - len(nb)), _T_MODE_UID_GID, sz, _T_MTIME, chk, _T_REST))


def _tar_end(offset: int) -> bytes:
    end = offset + 2 * TAR_BLOCK
    return b"\0" * (2 * TAR_BLOCK + (-end) % TAR_RECORD)


def sample_tar_bytes(jpg_bytes: int, json_bytes: int = 200) -> int:
    """Bytes one sample takes in a shard (3 headers + padded cls/jpg/json)."""
    return 3 * TAR_BLOCK + TAR_BLOCK + jpg_bytes + _pad(jpg_bytes) + json_bytes + _pad(json_bytes)


_ZEROS = bytes(TAR_RECORD)


# --- the index -------------------------------------------------------------------------------


class Member(NamedTuple):
    """One member of a sample, as its index line lists it."""

    ext: str
    offset: int  # of the member's bytes in the tar
    size: int
    name: str

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass
class Index:
    """A DALI index: per sample, its members in tar order."""

    samples: list[tuple[Member, ...]] = field(default_factory=list)
    header: str | None = None  # the first line as read; None: "v1.2 <samples>"

    def text(self) -> str:
        head = self.header if self.header is not None else f"{INDEX_VERSION} {len(self.samples)}"
        return head + "\n" + "".join(" ".join(" ".join(map(str, m)) for m in s) + "\n" for s in self.samples)

    @classmethod
    def parse(cls, text: str) -> Index:
        """The index in ``text``; blank lines are passed over."""
        lines = text.splitlines()
        samples = []
        for line in lines[1:]:
            f = line.split()
            if f:
                samples.append(tuple(Member(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3])
                                     for i in range(0, len(f), 4)))
        return cls(samples, lines[0] if lines else "")

    def member_at(self, offset: int) -> Member | None:
        """The member whose bytes start at ``offset``."""
        return next((m for s in self.samples for m in s if m.offset == offset), None)


def index_from_tar(tar_path: str | os.PathLike) -> str:
    """The index wds2idx would write for ``tar_path`` (its tarfile fallback, in Python)."""
    samples: list[list[Member]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            d = m.name.find(".", m.name.rfind("/") + 1)
            base, ext = (m.name[:d], m.name[d + 1:]) if d >= 0 else (m.name, "")
            if not base or base.endswith("/"):
                continue
            member = Member(ext, m.offset_data, m.size, m.name)
            if base != last:
                samples.append([member])
                last = base
            else:
                samples[-1].append(member)
    return Index([tuple(s) for s in samples]).text()


# --- writing ---------------------------------------------------------------------------------


class ShardWriter:
    """Writes samples to a tar file, hashing it and recording its index on the way.

    Why not ``webdataset.TarWriter``: it runs tarfile in stream mode ("w|"), which re-buffers
    every byte through 10 KiB records and builds each header with tarfile (~30 us); on the
    2-core build machine it took 0.14 s per 110 MB of JPEGs against 0.05 s here (one
    ``os.writev`` per sample, no copy of the payload), and the whole of ``tar cf`` takes
    ~0.13 s. The bytes are the same: the tests compare this writer's output with TarWriter's.
    """

    def __init__(self, path: str | os.PathLike):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.sha = hashlib.sha256()
        self.offset = 0
        self.index = Index()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_samples(self) -> int:
        return len(self.index.samples)

    def _writev(self, parts: list) -> None:
        total = 0
        for p in parts:
            self.sha.update(p)
            total += len(p)
        done = os.writev(self.fd, parts)
        if done < total:  # short write (rare on regular files): finish it piecewise
            data = b"".join(bytes(p) for p in parts)
            while done < total:
                done += os.write(self.fd, data[done:])
        self.offset += total

    def write(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        """One sample: its (extension, payload) members, in TarWriter's order (sorted extensions)."""
        entries, parts = [], []
        off = self.offset
        for ext, payload in sorted(members):
            name = f"{key}.{ext}"
            n = len(payload)
            parts.append(_tar_header(name, n))
            off += TAR_BLOCK
            entries.append(Member(ext, off, n, name))
            parts.append(payload)
            pad = _pad(n)
            if pad:
                parts.append(_ZEROS[:pad])
            off += n + pad
        self._writev(parts)
        self.index.samples.append(tuple(entries))

    def finish(self) -> None:
        """Write the end-of-archive blocks (padded to tarfile's record size) and close."""
        self._writev([_tar_end(self.offset)])
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def index_text(self) -> str:
        return self.index.text()
