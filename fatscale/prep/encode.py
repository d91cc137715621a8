"""One source file to the JPEG bytes of its sample: passed through, or (re-)encoded by Pillow.

Bytes that :func:`fatscale.prep.jpeg.inspect_jpeg` finds to be a baseline YCbCr JPEG pass
through untouched (an EXIF orientation tag reset to 1 in place: DALI would apply it, Pillow and
torchvision do not); everything else (progressive, grayscale, CMYK, PNG named .JPEG,
truncated, ...) goes through Pillow and is re-encoded to baseline RGB JPEG at quality 95, or
skipped with the reason when Pillow cannot decode it. Whose fault a failure is decides what
happens (``load_sample``): any exception the file's bytes cause skips the file; one that is not
theirs stops the run with ``RunStopped``.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from fatscale.prep.errors import RESUME, RunStopped, caused_by_bytes, failure, one_line, quoted, type_name
from fatscale.prep.jpeg import inspect_jpeg

DEFAULT_QUALITY = 95  # for images that must be re-encoded when --quality is not given
# Pillow's default decompression-bomb threshold: larger images are downscaled to fit it, so that
# a plain PIL loader (and DALI) can open every sample. Beyond HARD_MAX_PIXELS they are skipped.
MAX_PIXELS = 89_478_485
HARD_MAX_PIXELS = 16 * MAX_PIXELS


class SkipSample(Exception):
    """This file cannot become a sample; the message is the reason."""


class CannotDecode(SkipSample):
    """Pillow (or a parser before it) fails on the bytes; ``detail`` says how."""

    def __init__(self, detail: str, reason: str | None = None):
        self.detail = detail
        super().__init__(f"{reason + ': ' if reason else ''}cannot decode ({detail})")


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int | None = None
    quality: int | None = None  # None: pass through when possible, re-encode at DEFAULT_QUALITY
    decode_check: bool = False  # also fully decode pass-through JPEGs with Pillow
    fsync: bool = False  # fsync every shard before it is renamed into place


@contextlib.contextmanager
def decoding(data: bytes, reason: str | None = None) -> Iterator:
    """Pillow's image of ``data`` for the block. Whatever the bytes make fail, opening it or in
    the block, raises CannotDecode (``reason``: why the bytes went to Pillow, for the message);
    a failure that is not theirs (memory, an OS error) propagates as it is."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            yield im
    except SkipSample:
        raise
    except Image.UnidentifiedImageError:  # its message holds an object address: not reproducible
        raise CannotDecode("not an image format Pillow knows", reason) from None
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises on these bytes, they are undecodable
        if not caused_by_bytes(e):
            raise
        raise CannotDecode(one_line(e), reason) from None


def check_decodes(data: bytes) -> None:
    """Raise CannotDecode unless Pillow decodes ``data`` completely."""
    with decoding(data) as im:
        im.load()


def _target_size(w: int, h: int, opts: EncodeOptions) -> tuple[int, int, str | None]:
    scale, why = 1.0, None
    if opts.max_side and max(w, h) > opts.max_side:
        scale, why = opts.max_side / max(w, h), "resized to --max-side"
    if w * h * scale * scale > MAX_PIXELS:
        scale, why = math.sqrt(MAX_PIXELS / (w * h)), "huge image downscaled"
    if why is None:
        return w, h, None
    if why == "huge image downscaled":
        tw, th = max(1, int(w * scale)), max(1, int(h * scale))  # floor: stay within MAX_PIXELS
    else:
        tw, th = max(1, min(opts.max_side, round(w * scale))), max(1, min(opts.max_side, round(h * scale)))
    return tw, th, why


def _decode_reencode(data: bytes, opts: EncodeOptions, reason: str | None) -> tuple[bytes, int, int, list[str]]:
    from PIL import Image

    changes = [reason] if reason else []
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # checked below against HARD_MAX_PIXELS, before decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with decoding(data, reason) as im:
                w, h = im.size
                fmt = im.format or "unknown"
                if fmt != "JPEG" and not changes:
                    changes.append(f"{fmt} file")
                if w * h > HARD_MAX_PIXELS:
                    raise SkipSample(f"image too large ({w}x{h} pixels)")
                tw, th, why = _target_size(w, h, opts)
                if why:
                    changes.append(why)
                if fmt == "JPEG" and (tw, th) != (w, h):
                    im.draft(None, (tw, th))  # DCT-domain downscale: less memory and time
                im.load()
                if im.mode.startswith("I;16"):  # 16-bit gray: Pillow's convert would clip, scale
                    im = im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                if rgb.size != (tw, th):
                    rgb = rgb.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
                q = opts.quality or DEFAULT_QUALITY
                if opts.quality is not None and not changes:
                    changes.append("re-encoded at --quality")
                buf = io.BytesIO()
                rgb.save(buf, "JPEG", quality=q, optimize=False, progressive=False)
                return buf.getvalue(), w, h, changes
    finally:
        Image.MAX_IMAGE_PIXELS = old


def process_image(data: bytes, opts: EncodeOptions) -> tuple[bytes, int, int, list[str]]:
    """Return (baseline RGB JPEG bytes, original width, original height, changes made).

    ``changes`` is empty when the bytes pass through untouched. Raises SkipSample.
    """
    if not data:
        raise SkipSample("empty file")
    info = inspect_jpeg(data)
    if info is None:
        return _decode_reencode(data, opts, None)
    blocker = info.fast_path_blocker()
    if blocker is None and opts.quality is None:
        if _target_size(info.width, info.height, opts)[2] is None:
            changes = []
            if opts.decode_check:
                check_decodes(data)
            if info.orientation in range(2, 9) and info.orientation_offset is not None:
                # Pillow (like torchvision) ignores EXIF orientation, DALI applies it. Reset the
                # tag in place so both see the stored pixels; no pixel is re-encoded.
                o = info.orientation_offset
                one = (1).to_bytes(2, "big" if info.orientation_big_endian else "little")
                data = data[:o] + one + data[o + 2:]
                changes.append("EXIF orientation reset")
            return data, info.width, info.height, changes
    return _decode_reencode(data, opts, blocker)


def load_sample(path: str, opts: EncodeOptions) -> tuple[bytes, bytes, int, int, list[str]]:
    """Read a source file and process it: (its bytes, then what ``process_image`` returns).

    The per-file boundary. Whatever the file's bytes make fail raises SkipSample with the reason:
    the file is listed as skipped and the run goes on. What is not their fault (reading the file,
    memory) raises RunStopped naming the file: nothing is recorded for it, so a re-run retries it.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read()
    except OSError as e:
        raise RunStopped(f"cannot read {quoted(path)}: {e.strerror or one_line(e)}; {RESUME}") from e
    except MemoryError as e:
        raise RunStopped(f"{quoted(path)}: out of memory reading it; {RESUME}") from e
    try:
        return (data, *process_image(data, opts))
    except SkipSample:
        raise
    except Exception as e:  # noqa: BLE001 - sorted by whose fault it is
        if caused_by_bytes(e):
            raise CannotDecode(f"{type_name(e)}: {one_line(e)}") from None
        raise RunStopped(f"{quoted(path)}: {failure(e)} while processing it; {RESUME}") from e
