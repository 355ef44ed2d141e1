"""Robust image decoding: any file in, an RGB ``PIL.Image`` or an ``ImageSkip`` out.

A data set of a million web images always holds some that are missing, empty,
truncated, not images at all or absurdly large. Each becomes an
:class:`ImageSkip` whose ``reason`` is one of ``store.schema.SKIP_REASONS``, so
the extraction loop can record it and go on (or stop under ``--strict``).
"""

from __future__ import annotations

import errno
import io
import struct
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mcpipe.errors import DataError
from mcpipe.store.schema import SKIP_REASONS

# file suffixes taken as images, wherever mcpipe looks for them (image folders, shards, predict's inputs)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")
_WHITE = (255, 255, 255, 255)

# Errors PIL's parsers raise on malformed data besides OSError (fuzzing finds all of these).
_MALFORMED = (SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError, ZeroDivisionError,
              struct.error, NotImplementedError)

# ``warnings.catch_warnings`` swaps the process-wide filter list while it is
# active and is not thread-safe before Python 3.14: two threads interleaving
# enter/exit could leave the "error" filter installed for good. The lock keeps
# the swap atomic among our callers; only the header parse runs under it.
_WARNINGS_LOCK = threading.Lock()

_TRUNCATED = ("image file is truncated", "broken data stream", "truncated")


class ImageSkip(Exception):
    """An image that cannot be used.

    Attributes:
        reason: one of ``SKIP_REASONS[1:]`` (missing, empty, truncated, corrupt, too_large, unreadable).
        detail: a short human-readable message (no path: the caller knows which image it was).
    """

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS[1:]:
            raise ValueError(f"ImageSkip reason {reason!r} is not one of {SKIP_REASONS[1:]}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (ImageSkip, (self.reason, self.detail))


def open_image(path: Path, *, min_size: int | None = None) -> Image.Image:
    """Decode the image at ``path`` fully and return it in mode ``"RGB"``.

    EXIF orientation is applied. With ``min_size``, JPEGs are decoded at a
    reduced scale (1/2, 1/4 or 1/8, by the DCT decoder, much faster for large
    photos) while the shorter side stays >= ``min_size``.

    Raises:
        ImageSkip: missing, empty, truncated, corrupt, too_large or unreadable.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageSkip("missing", "no such file") from None
    except OSError as exc:
        raise ImageSkip("unreadable", _os_detail(exc)) from None
    if size == 0:
        raise ImageSkip("empty", "file has 0 bytes")
    return _decode(lambda: open(path, "rb"), min_size=min_size)


def open_image_bytes(data: bytes, *, min_size: int | None = None) -> Image.Image:
    """Decode an image held in memory (a tar shard's member) exactly as :func:`open_image` decodes a file.

    Raises:
        ImageSkip: empty, truncated, corrupt or too_large.
    """
    if not data:
        raise ImageSkip("empty", "0 bytes")
    return _decode(lambda: io.BytesIO(data), min_size=min_size)


def _decode(open_fp: Callable[[], BinaryIO], *, min_size: int | None) -> Image.Image:
    """Open (``open_fp()``), decode fully, apply EXIF orientation, convert to RGB; every failure an ImageSkip."""
    try:
        with open_fp() as fp:
            img = _open_checked(fp)
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img.load()
    except ImageSkip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSkip("too_large", str(exc).split(",")[0]) from None
    except UnidentifiedImageError:
        raise ImageSkip("corrupt", "not a recognised image format") from None
    except OSError as exc:
        raise _classify_os_error(exc) from None
    except _MALFORMED as exc:
        raise ImageSkip("corrupt", f"{type(exc).__name__}: {exc}") from None
    return to_rgb(_exif_transposed(img))


def _open_checked(fp) -> Image.Image:
    """``Image.open`` with PIL's decompression-bomb *warning* turned into an error, for this call only.

    PIL's default pixel limit is kept; images between it and twice it would
    otherwise only warn and then be decoded (hundreds of MB each).
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(fp)


def _classify_os_error(exc: OSError) -> ImageSkip:
    message = str(exc)
    if exc.errno is not None:  # a real OS error: permissions, a folder, I/O error
        return ImageSkip("unreadable", _os_detail(exc))
    if any(m in message for m in _TRUNCATED):
        return ImageSkip("truncated", message)
    # PIL reports decoder failures as OSError without an errno ("decoder error -2",
    # "could not create decoder object"): the data is bad, the file was readable.
    return ImageSkip("corrupt", message or type(exc).__name__)


def _os_detail(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def _exif_transposed(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation tag; a malformed EXIF block is ignored."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except (OSError, *_MALFORMED):
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, *_MALFORMED):
        return img


def from_array(pixels: np.ndarray) -> Image.Image:
    """An RGB image from a uint8 array of shape (H, W) (grey) or (H, W, 3) (RGB)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (1, 3))):
        raise DataError(f"image array has shape {pixels.shape} and dtype {pixels.dtype}; "
                        "expected uint8 of shape (H, W) or (H, W, 3)")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    img = Image.fromarray(np.ascontiguousarray(pixels))
    return img.convert("RGB") if img.mode != "RGB" else img


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in mode ``"RGB"``: transparency composited on white, 16-bit and
    float pixels scaled to 8 bits (not clipped), CMYK and palettes converted."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(img)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV
    except ValueError as exc:
        raise ImageSkip("corrupt", f"cannot convert image mode {mode} to RGB ({exc})") from None


def _to_uint8(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a single-channel 16/32-bit integer or float image.

    Integers are scaled by the image's bit depth (``2**bits - 1`` -> 255):
    16 bits for ``I;16*`` modes and for ``I`` whose values fit 16 bits (PIL
    opens 16-bit PNGs and TIFFs so), the TIFF BitsPerSample tag when present.
    Floats in [0, 1] are scaled by 255, in [0, 255] kept; any other range is
    min-max scaled.
    """
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0 and hi <= 1:
            scale, offset = 255.0, 0.0
        elif lo >= 0 and hi <= 255:
            scale, offset = 1.0, 0.0
        else:
            scale, offset = 255.0 / max(hi - lo, 1e-12), lo
        return np.clip((a - offset) * scale + 0.5, 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    bits = _bits_per_sample(img)
    if bits is None:
        lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
        if lo >= 0 and hi <= 0xFFFF:
            bits = 16
        else:  # signed or wider than 16 bits with no declared depth: stretch the range
            return ((a - lo) * 255 // max(hi - lo, 1)).astype(np.uint8)
    top = (1 << bits) - 1
    return np.clip((a * 255 + top // 2) // top, 0, 255).astype(np.uint8)


def _bits_per_sample(img: Image.Image) -> int | None:
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)  # TIFF BitsPerSample
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        if isinstance(bits, int) and 1 <= bits <= 32:
            return bits
    if img.mode.startswith("I;16"):
        return 16
    return None
