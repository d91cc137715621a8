"""JPEG inspection: the marker structure of JPEG bytes, parsed without decoding them.

Pass-through checks a JPEG by parsing its markers (SOF0/SOF1, 8 bit, 3 YCbCr components, one
interleaved scan, an EOI after it) without decoding it. The parser is bounds-checked and refuses
what libjpeg or Pillow would (bad tables, lengths, sampling factors, a marker inside the scan),
so bytes it passes decode.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SEQUENTIAL = {0xC0, 0xC1}  # Huffman-coded sequential DCT: the frames whose bytes may pass through
# the header segments walked; any other marker there (DAC, DNL, reserved ones) sends the file to Pillow
_SEGMENTS = _SOF | {0xC4, 0xDA, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0))
MAX_JPEG_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION
_CODE_SPACE = [1 << (16 - bits) for bits in range(1, 17)]  # of a Huffman code of 1..16 bits, in 2**-16
# An FF inside entropy-coded data is followed by 00 (a stuffed FF) or a restart marker; any other
# FF xx is a marker that ends the scan (a regex: C speed, ~30 us per 110 kB ImageNet file)
_SCAN_STOP = re.compile(rb"\xff[^\x00\xd0-\xd7]")


@dataclass
class JpegInfo:
    width: int = 0
    height: int = 0
    sof: int = 0
    precision: int = 0
    components: int = 0
    component_ids: tuple = ()
    adobe_transform: int | None = None
    jfif: bool = False
    has_dqt: bool = False
    has_dht: bool = False
    scan_components: int = 0
    ends_with_eoi: bool = False  # the first scan runs to an EOI marker
    orientation: int | None = None  # EXIF orientation of IFD0
    orientation_offset: int | None = None  # byte offset of its 2-byte value
    orientation_big_endian: bool = False
    problem: str | None = None  # structural problem (truncated, bad segment, ...)

    def fast_path_blocker(self) -> str | None:
        """Why these bytes cannot pass through untouched (None: baseline YCbCr JPEG)."""
        if self.problem:
            return self.problem
        if self.sof == 0xC2 or self.sof in (0xC6, 0xCA, 0xCE):
            return "progressive JPEG"
        if self.sof in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return "arithmetic-coded JPEG"
        if self.sof not in (0xC0, 0xC1):
            return "lossless or hierarchical JPEG"
        if self.precision != 8:
            return f"{self.precision}-bit JPEG"
        if self.components == 1:
            return "grayscale JPEG"
        if self.components == 4:
            return "CMYK JPEG"
        if self.components != 3:
            return f"{self.components}-component JPEG"
        if self.adobe_transform == 0 or (self.adobe_transform is None and not self.jfif
                                         and self.component_ids == (82, 71, 66)):
            return "RGB-coded JPEG"
        if not (self.has_dqt and self.has_dht):
            return "JPEG without quantization/Huffman tables"
        if self.scan_components != 3:
            return "multi-scan baseline JPEG"
        if not self.ends_with_eoi:
            return "JPEG with several scans or no EOI"
        if self.width <= 0 or self.height <= 0:
            return "JPEG without dimensions in its frame header"
        return None


def _exif_orientation(data: bytes, start: int, end: int, info: JpegInfo) -> None:
    t = start + 6  # TIFF header after b"Exif\0\0"
    if end - t < 8:
        return
    bo = data[t:t + 2]
    if bo == b"II":
        big = False
    elif bo == b"MM":
        big = True
    else:
        return
    order = "big" if big else "little"
    if int.from_bytes(data[t + 2:t + 4], order) != 42:
        return
    ifd = t + int.from_bytes(data[t + 4:t + 8], order)
    if ifd + 2 > end:
        return
    n = int.from_bytes(data[ifd:ifd + 2], order)
    for i in range(n):
        e = ifd + 2 + 12 * i
        if e + 12 > end:
            return
        if int.from_bytes(data[e:e + 2], order) == 0x0112:
            typ, cnt = int.from_bytes(data[e + 2:e + 4], order), int.from_bytes(data[e + 4:e + 8], order)
            if typ == 3 and cnt == 1:
                info.orientation = int.from_bytes(data[e + 8:e + 10], order)
                info.orientation_offset = e + 8
                info.orientation_big_endian = big
            return


class _Corrupt(Exception):
    """A problem inspect_jpeg found; the message becomes ``JpegInfo.problem``."""


def inspect_jpeg(data: bytes) -> JpegInfo | None:
    """Parse the marker structure of JPEG bytes (None: not a JPEG). Decodes nothing.

    Every read is bounds-checked, so any bytes get an answer. ``problem`` is set for broken
    structure and for what libjpeg (Pillow's and DALI's decoder) or Pillow's parser would refuse:
    bad segment lengths, tables, sampling factors, sizes, unknown markers, a marker inside the
    scan. Bytes with no blocker pass through undecoded, so this is what makes them decodable.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    info = JpegInfo()
    try:
        _parse_markers(data, info)
    except _Corrupt as e:
        info.problem = str(e)
    return info


def _parse_markers(data: bytes, info: JpegInfo) -> None:
    n = len(data)
    truncated = "truncated JPEG (ends inside its headers)"
    frame: dict[int, tuple[int, int, int]] = {}  # component id -> (h, v, quantization table)
    huffman: set[tuple[int, int]] = set()  # (class, id) of the Huffman tables defined
    quant: set[int] = set()
    pos = 2
    while True:
        if pos >= n:
            raise _Corrupt(truncated)
        if data[pos] != 0xFF:
            raise _Corrupt(f"corrupt JPEG (no marker at byte {pos})")
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            raise _Corrupt(truncated)
        marker = data[pos + 1]
        pos += 2
        if marker == 0xD9 or marker == 0xD8:
            raise _Corrupt("corrupt JPEG (image data missing)")
        if 0xD0 <= marker <= 0xD7:  # a stray restart marker: no length, no body (TEM, 01, Pillow refuses)
            continue
        if marker not in _SEGMENTS:
            raise _Corrupt(f"corrupt JPEG (unexpected marker 0x{marker:02X})")
        if pos + 2 > n:
            raise _Corrupt(truncated)
        seglen = int.from_bytes(data[pos:pos + 2], "big")
        if seglen < 2:
            raise _Corrupt("corrupt JPEG (segment length below 2)")
        end = pos + seglen
        if end > n:
            raise _Corrupt(truncated)
        body = pos + 2
        if marker in _SOF:
            _parse_frame(data, body, end, marker, info, frame)
        elif marker == 0xC4:
            _parse_huffman_tables(data, body, end, huffman)
            info.has_dht = True
        elif marker == 0xDB:
            _parse_quant_tables(data, body, end, quant)
            info.has_dqt = True
        elif marker == 0xDD and seglen != 4:
            raise _Corrupt("corrupt JPEG (bad restart interval segment)")
        elif marker == 0xE0 and data[body:body + 5] == b"JFIF\x00":
            info.jfif = True
        elif marker == 0xEE and data[body:body + 5] == b"Adobe" and seglen >= 14:
            info.adobe_transform = data[body + 11]
        elif marker == 0xE1 and data[body:body + 6] == b"Exif\x00\x00" and info.orientation is None:
            _exif_orientation(data, body, end, info)
        elif marker == 0xDA:
            _parse_scan(data, body, end, info, frame, huffman, quant)
            return
        pos = end


def _parse_frame(data: bytes, body: int, end: int, marker: int, info: JpegInfo, frame: dict) -> None:
    if info.sof:
        raise _Corrupt("corrupt JPEG (several frame headers)")
    nf = data[body + 5] if body + 6 <= end else 0
    if nf == 0 or end - body != 6 + 3 * nf:
        raise _Corrupt("corrupt JPEG (frame header length does not match its components)")
    info.sof, info.precision, info.components = marker, data[body], nf
    info.height = int.from_bytes(data[body + 1:body + 3], "big")
    info.width = int.from_bytes(data[body + 3:body + 5], "big")
    comps = [data[c:c + 3] for c in range(body + 6, end, 3)]
    info.component_ids = tuple(c[0] for c in comps)
    if len(set(info.component_ids)) != nf:
        raise _Corrupt("corrupt JPEG (duplicate component ids)")
    hs, vs = [c[1] >> 4 for c in comps], [c[1] & 15 for c in comps]
    # libjpeg: factors 1..4, and each must divide the largest ("fractional sampling not implemented")
    if not all(1 <= f <= 4 for f in hs + vs) or any(max(hs) % h or max(vs) % v for h, v in zip(hs, vs)):
        raise _Corrupt("corrupt JPEG (bad sampling factors)")
    if any(c[2] > 3 for c in comps):
        raise _Corrupt("corrupt JPEG (bad quantization table number)")
    if max(info.width, info.height) > MAX_JPEG_SIDE:
        raise _Corrupt(f"JPEG over {MAX_JPEG_SIDE} pixels on a side ({info.width}x{info.height})")
    frame.update((c[0], (c[1] >> 4, c[1] & 15, c[2])) for c in comps)


def _parse_huffman_tables(data: bytes, body: int, end: int, huffman: set) -> None:
    p = body
    while p < end:
        cls, tid, counts = data[p] >> 4, data[p] & 15, data[p + 1:p + 17]
        values = data[p + 17:p + 17 + sum(counts)]
        p += 17 + sum(counts)
        # libjpeg's checks: the codes fit their lengths with the all-ones code unused (Kraft's
        # sum below 1), and DC values are bit counts (<= 15)
        kraft = sum(map(operator.mul, counts, _CODE_SPACE))
        if p > end or cls > 1 or tid > 3 or kraft >= 1 << 16 or (cls == 0 and max(values, default=0) > 15):
            raise _Corrupt("corrupt JPEG (bad Huffman table)")
        huffman.add((cls, tid))


def _parse_quant_tables(data: bytes, body: int, end: int, quant: set) -> None:
    p = body
    while p < end:
        precision, tid = data[p] >> 4, data[p] & 15
        p += 1 + 64 * (precision + 1)
        if p > end or precision > 1 or tid > 3:
            raise _Corrupt("corrupt JPEG (bad quantization table)")
        quant.add(tid)


def _parse_scan(data: bytes, body: int, end: int, info: JpegInfo, frame: dict, huffman: set,
                quant: set) -> None:
    if not info.sof:
        raise _Corrupt("corrupt JPEG (scan before frame header)")
    ns = data[body] if body < end else 0
    if not 1 <= ns <= 4 or end - body != 4 + 2 * ns:
        raise _Corrupt("corrupt JPEG (bad scan header)")
    ids, tables = data[body + 1:end - 3:2], data[body + 2:end - 3:2]
    if len(set(ids)) != ns or not set(ids) <= set(frame):
        raise _Corrupt("corrupt JPEG (scan of components the frame does not have)")
    info.scan_components = ns
    if info.sof not in _SEQUENTIAL:  # decoded by Pillow in any case: only whether it is complete
        if data.rfind(b"\xff\xd9", end) < 0:
            raise _Corrupt("truncated JPEG (no end-of-image marker)")
        info.ends_with_eoi = True
        return
    if tuple(data[end - 3:end]) != (0, 63, 0):
        raise _Corrupt("corrupt JPEG (progressive parameters in a sequential scan)")
    if not all((0, t >> 4) in huffman and (1, t & 15) in huffman for t in tables):
        raise _Corrupt("corrupt JPEG (scan uses an undefined Huffman table)")
    if not all(frame[c][2] in quant for c in ids):
        raise _Corrupt("corrupt JPEG (scan uses an undefined quantization table)")
    if ns > 1 and sum(frame[c][0] * frame[c][1] for c in ids) > 10:  # libjpeg's D_MAX_BLOCKS_IN_MCU
        raise _Corrupt("corrupt JPEG (bad sampling factors)")
    # The entropy-coded data holds FF only as FF 00 or a restart marker: the first other marker
    # ends the scan, and it must be the EOI. A marker inside the data (a bit flip, a splice) or a
    # second scan makes libjpeg stop there and parse what follows; such files go to Pillow.
    stop = _SCAN_STOP.search(data, end)
    if stop is None:
        raise _Corrupt("truncated JPEG (no end-of-image marker)")
    j = stop.start()
    while j + 2 < len(data) and data[j + 1] == 0xFF:  # fill bytes before the marker
        j += 1
    info.ends_with_eoi = data[j + 1] == 0xD9
