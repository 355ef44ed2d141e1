"""Image decoding: every skip reason from real bad files, every mode conversion."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mcpipe.errors import DataError
from mcpipe.extract.images import ImageSkip, from_array, open_image, to_rgb
from mcpipe.store.schema import SKIP_REASONS


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))


def _skip_reason(path, **kw) -> ImageSkip:
    with pytest.raises(ImageSkip) as info:
        open_image(path, **kw)
    assert info.value.reason in SKIP_REASONS[1:] and info.value.detail
    return info.value


# ---------------------------------------------------------------- skip reasons

def test_missing(tmp_path):
    assert _skip_reason(tmp_path / "nope.jpg").reason == "missing"


def test_empty(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    assert _skip_reason(tmp_path / "e.jpg").reason == "empty"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_noise(64, 80)).save(buf, fmt)
    data = buf.getvalue()
    (tmp_path / "t").write_bytes(data[: len(data) // 2])
    assert _skip_reason(tmp_path / "t").reason == "truncated"


def test_truncated_does_not_change_pil_global():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_random_bytes_are_corrupt(tmp_path):
    (tmp_path / "r.jpg").write_bytes(np.random.default_rng(1).bytes(4096))
    assert _skip_reason(tmp_path / "r.jpg").reason == "corrupt"


def test_text_file_is_corrupt(tmp_path):
    (tmp_path / "a.png").write_text("not an image\n")
    assert _skip_reason(tmp_path / "a.png").reason == "corrupt"


@pytest.mark.parametrize("side", [20000, 10000])  # over 2x PIL's limit (error) / over 1x (warning)
def test_decompression_bomb_is_too_large(tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(side, side))
    filters = list(warnings.filters)
    assert _skip_reason(tmp_path / "bomb.png").reason == "too_large"
    assert warnings.filters == filters, "the global warning filters must be left as they were"
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


def test_folder_is_unreadable(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    assert _skip_reason(tmp_path / "d.jpg").reason == "unreadable"


def test_image_skip_pickles_and_checks_reason():
    import pickle

    skip = pickle.loads(pickle.dumps(ImageSkip("truncated", "cut")))
    assert (skip.reason, skip.detail) == ("truncated", "cut")
    with pytest.raises(ValueError, match="missing"):
        ImageSkip("broken", "x")


# ---------------------------------------------------------------- modes

def _roundtrip(tmp_path, img: Image.Image, fmt: str, name: str, **save) -> Image.Image:
    path = tmp_path / name
    img.save(path, fmt, **save)
    out = open_image(path)
    assert out.mode == "RGB"
    return out


def test_rgb_jpeg(tmp_path):
    out = _roundtrip(tmp_path, Image.fromarray(_noise(30, 40)), "JPEG", "a.jpg")
    assert out.size == (40, 30)


def test_grey_and_bilevel(tmp_path):
    out = _roundtrip(tmp_path, Image.new("L", (8, 6), 77), "PNG", "l.png")
    assert out.getpixel((3, 3)) == (77, 77, 77)
    out = _roundtrip(tmp_path, Image.new("1", (8, 6), 1), "PNG", "b.png")
    assert out.getpixel((3, 3)) == (255, 255, 255)


def test_palette(tmp_path):
    img = Image.new("P", (8, 6), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out = _roundtrip(tmp_path, img, "PNG", "p.png")
    assert out.getpixel((0, 0)) == (10, 200, 30)


def test_palette_with_transparency_goes_on_white(tmp_path):
    img = Image.new("P", (8, 6), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    out = _roundtrip(tmp_path, img, "PNG", "pt.png", transparency=0)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert out.getpixel((1, 1)) == (10, 200, 30)


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))
    rgba.putpixel((1, 1), (200, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = _roundtrip(tmp_path, rgba, "PNG", "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (200, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 2)))
    out = _roundtrip(tmp_path, Image.new("LA", (4, 4), (0, 0)), "PNG", "la.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    out = _roundtrip(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", "c.jpg", quality=100)
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15  # pure red survives


def test_16_bit_png_scales_by_bit_depth(tmp_path):
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = _roundtrip(tmp_path, img, "PNG", "g16.png")
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_16_bit_big_endian_and_32_bit_modes():
    arr = np.array([[0, 65535]], dtype=">u2")
    img = Image.frombytes("I;16B", (2, 1), arr.tobytes())
    assert [to_rgb(img).getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    img = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert img.mode == "I" and to_rgb(img).getpixel((1, 0)) == (255, 255, 255)
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert img.mode == "F" and [to_rgb(img).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(_noise(20, 40))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
    assert open_image(tmp_path / "rot.jpg").size == (20, 40)


def test_jpeg_draft_keeps_min_size(tmp_path):
    Image.fromarray(_noise(1000, 1500)).save(tmp_path / "big.jpg", "JPEG")
    for min_size in (100, 125, 256, 999):
        out = open_image(tmp_path / "big.jpg", min_size=min_size)
        assert min(out.size) >= min_size
        assert min(out.size) < 2 * min_size or min(out.size) == 1000  # it did downscale where it could
    assert open_image(tmp_path / "big.jpg", min_size=100).size == (188, 125)  # 1/8
    assert open_image(tmp_path / "big.jpg").size == (1500, 1000)


def test_from_array():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = from_array(grey)
    assert out.mode == "RGB" and out.size == (4, 3) and out.getpixel((1, 0)) == (1, 1, 1)
    rgb = _noise(5, 6)
    assert np.array_equal(np.asarray(from_array(rgb)), rgb)
    assert np.array_equal(np.asarray(from_array(rgb[:, ::2])), rgb[:, ::2])  # non-contiguous view
    for bad in (np.zeros((3, 4), np.float32), np.zeros((3, 4, 4), np.uint8), np.zeros(5, np.uint8)):
        with pytest.raises(DataError, match="expected uint8"):
            from_array(bad)
