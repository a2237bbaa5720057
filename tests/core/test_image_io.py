"""Tests for explorer.core.image_io: every image is made in the test, no fixture files."""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from explorer.core import image_io
from explorer.core.image_io import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    ImageLoadError,
    LoadedImage,
    image_filter_patterns,
    load_image,
    probe_image,
)


# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def noise(h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A structurally valid 1-bit grey PNG whose IHDR claims ``width x height``, with a tiny IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decoding fail loudly, to prove that only the header was read."""

    def refuse(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --------------------------------------------------------------------------- 1. bad sources


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError) as exc:
        load_image(path)
    assert one_line(exc) == f"cannot read '{path}': no such file"
    with pytest.raises(ImageLoadError, match="no such file"):
        probe_image(str(path))


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError) as exc:
        load_image(tmp_path)
    msg = one_line(exc)
    assert str(tmp_path) in msg and "folder" in msg


def test_empty_file_and_empty_bytes(tmp_path):
    path = write(tmp_path, "empty.png", b"")
    with pytest.raises(ImageLoadError) as exc:
        load_image(path)
    assert "empty.png" in one_line(exc) and "empty" in exc.value.reason
    with pytest.raises(ImageLoadError, match=r"cannot read <bytes>: no data"):
        load_image(b"")


def test_text_file_is_not_an_image(tmp_path):
    path = write(tmp_path, "x.txt", b"hello, this is text and not pixels\n" * 20)
    with pytest.raises(ImageLoadError) as exc:
        load_image(path)
    assert one_line(exc) == f"cannot read '{path}': not an image (unrecognised format)"
    assert isinstance(exc.value, ValueError)
    assert exc.value.source == f"'{path}'" and exc.value.reason == "not an image (unrecognised format)"
    with pytest.raises(ImageLoadError, match="not an image"):
        probe_image(path)


def test_format_outside_allow_list_is_refused(tmp_path):
    path = write(tmp_path, "a.ppm", encode(Image.fromarray(noise()), "PPM"))
    assert "PPM" not in ALLOWED_FORMATS
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(path)


# --------------------------------------------------------------------------- 2. decompression bombs


def test_bomb_refused_from_header_without_decoding(tmp_path, no_decoding):
    data = png_header_only(30000, 30000)
    assert len(data) < 100  # the test never allocates the 900 MP
    path = write(tmp_path, "bomb.png", data)
    expected = "image is 30000x30000 (900.0 MP); the limit is 100.0 MP"
    for call in (load_image, probe_image):
        with pytest.raises(ImageLoadError) as exc:
            call(path)
        assert one_line(exc) == f"cannot read '{path}': {expected}"
    with pytest.raises(ImageLoadError, match=re.escape(expected)):
        load_image(data)


def test_max_pixels_is_the_callers_limit(tmp_path, no_decoding):
    # 95 MP is above Pillow's own default limit (~89 MP) but below ours: accepted, no warning.
    data = png_header_only(10000, 9500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe_image(data) == (9500, 10000)
    with pytest.raises(ImageLoadError, match=r"image is 10000x9500 \(95.0 MP\); the limit is 50.0 MP"):
        probe_image(data, max_pixels=50_000_000)


def test_lower_limit_applies_to_load(tmp_path):
    data = encode(Image.fromarray(noise(64, 64)), "PNG")
    assert load_image(data, max_pixels=4096).size == (64, 64)
    with pytest.raises(ImageLoadError, match=r"image is 64x64 \(0.0 MP\); the limit is 0.0 MP"):
        load_image(data, max_pixels=4095)


@pytest.mark.parametrize("kind", ["error", "warning"])
def test_pillow_bomb_error_and_warning_become_image_load_error(monkeypatch, kind):
    data = encode(Image.fromarray(noise()), "PNG")
    real_load = ImageFile.ImageFile.load

    def bomb(self):
        if kind == "error":
            raise Image.DecompressionBombError("Image size (1 pixels) exceeds limit")
        warnings.warn("Image size (1 pixels) exceeds limit", Image.DecompressionBombWarning)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", bomb)
    with pytest.raises(ImageLoadError, match="too large to decode safely"):
        load_image(data)


def test_pillow_globals_are_restored(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    good = encode(Image.fromarray(noise()), "JPEG")
    load_image(good, max_pixels=5000, allow_truncated=True)
    with pytest.raises(ImageLoadError):
        load_image(good[:-300], max_pixels=5000)
    load_image(good[:-300], allow_truncated=True)
    with pytest.raises(ImageLoadError):
        load_image(png_header_only(30000, 30000))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# --------------------------------------------------------------------------- 3. too small


@pytest.mark.parametrize("w, h", [(1, 1), (100, 8), (8, 100)])
def test_too_small_refused(w, h):
    data = encode(Image.new("RGB", (w, h)), "PNG")
    with pytest.raises(ImageLoadError) as exc:
        load_image(data)
    assert one_line(exc).endswith(f"image is {w}x{h} pixels; at least 16x16 is needed")
    with pytest.raises(ImageLoadError, match="at least 16x16"):
        probe_image(data)


def test_min_side_is_configurable():
    data = encode(Image.new("RGB", (4, 4)), "PNG")
    assert load_image(data, min_side=1).size == (4, 4)
    assert load_image(encode(Image.new("RGB", (16, 16)), "PNG")).size == (16, 16)
    with pytest.raises(ValueError):
        load_image(data, min_side=0)


# --------------------------------------------------------------------------- 4. truncated files


def smooth(h: int = 64, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("fmt, cut, missing, fill", [("JPEG", 300, "grey", 128), ("PNG", 3000, "black", 0)])
def test_truncated_file(tmp_path, fmt, cut, missing, fill):
    arr = smooth() if fmt == "JPEG" else noise(64, 64)
    data = encode(Image.fromarray(arr), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    assert len(data) > 2 * cut
    path = write(tmp_path, f"cut.{fmt.lower()}", data[:-cut])
    with pytest.raises(ImageLoadError) as exc:
        load_image(path)
    assert one_line(exc) == f"cannot read '{path}': file is truncated or corrupt"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    if fmt == "JPEG":  # a few missing bytes are enough to refuse it
        with pytest.raises(ImageLoadError, match="truncated or corrupt"):
            load_image(data[:-2])

    img = load_image(path, allow_truncated=True)
    assert img.size == (64, 64)
    assert f"truncated file: the missing part is {missing}" in img.warnings
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # the intact top rows decoded, the missing bottom rows are filled as the warning says
    assert np.abs(img.rgb[:4].astype(int) - arr[:4].astype(int)).max() <= (0 if fmt == "PNG" else 12)
    np.testing.assert_array_equal(img.rgb[-1], np.full((64, 3), fill))
    # a complete file gets no warning
    assert load_image(data, allow_truncated=True).warnings == ()


# --------------------------------------------------------------------------- 5. EXIF orientation


def test_exif_orientation_6_is_applied(tmp_path):
    stored = np.zeros((32, 48, 3), np.uint8)  # H=32, W=48 as stored
    stored[:, :] = (0, 0, 255)
    stored[:16, :16] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = write(tmp_path, "rot.jpg", encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95))

    assert probe_image(path) == (48, 32)
    img = load_image(path)
    assert img.size == (48, 32) and img.rgb.shape == (48, 32, 3)
    # stored top-left lands at the displayed top-right
    assert np.abs(img.rgb[4, 28].astype(int) - (255, 0, 0)).max() < 40
    assert np.abs(img.rgb[4, 4].astype(int) - (0, 0, 255)).max() < 40
    assert np.abs(img.rgb[40, 28].astype(int) - (0, 0, 255)).max() < 40
    assert img.rgb.flags.c_contiguous


# --------------------------------------------------------------------------- 6. modes


def test_16bit_png_is_scaled_not_clipped():
    vals = np.array([0, 257, 32768, 65535], np.uint16)
    arr = np.tile(vals, (16, 4))  # 16 x 16
    data = encode(Image.fromarray(arr), "PNG")
    img = load_image(data)
    assert img.mode.startswith("I")
    np.testing.assert_array_equal(img.rgb[0, :4, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(img.rgb[..., 0], img.rgb[..., 2])
    assert "16-bit image scaled to 8 bits" in img.warnings
    assert img.alpha is None


def test_mode_I_within_16_bits_is_scaled_and_wider_range_by_range():
    arr = np.tile(np.array([0, 32768, 65535, 0], np.int32), (16, 4))
    img = load_image(encode(Image.fromarray(arr, "I"), "TIFF"))
    assert img.mode == "I"
    np.testing.assert_array_equal(img.rgb[0, :3, 0], [0, 128, 255])

    wide = np.tile(np.array([-1000, 0, 1000, 3000], np.int32), (16, 4))
    img = load_image(encode(Image.fromarray(wide, "I"), "TIFF"))
    np.testing.assert_array_equal(img.rgb[0, :4, 0], [0, 64, 128, 255])
    assert any("range [-1000, 3000]" in w for w in img.warnings)


def test_float_image_scaled_by_range():
    arr = np.tile(np.array([-1.0, 0.0, 1.0, 3.0], np.float32), (16, 4))
    img = load_image(encode(Image.fromarray(arr, "F"), "TIFF"))
    assert img.mode == "F"
    np.testing.assert_array_equal(img.rgb[0, :4, 1], [0, 64, 128, 255])
    assert any(w.startswith("floating-point image scaled from its range [-1, 3]") for w in img.warnings)


def test_rgba_composited_on_background_not_black():
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[..., :3] = (255, 0, 0)
    arr[:, :8, 3] = 0  # transparent left half
    arr[:, 8:, 3] = 128  # half-transparent right half
    data = encode(Image.fromarray(arr, "RGBA"), "PNG")
    img = load_image(data)
    assert img.mode == "RGBA"
    np.testing.assert_array_equal(img.rgb[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(img.rgb[0, 15], (255, 127, 127))
    np.testing.assert_array_equal(img.alpha, arr[..., 3])
    assert img.alpha.shape == (16, 16) and img.alpha.dtype == np.uint8
    green = load_image(data, background=(0, 255, 0))
    np.testing.assert_array_equal(green.rgb[0, 0], (0, 255, 0))
    np.testing.assert_array_equal(green.rgb[0, 15], (128, 127, 0))
    with pytest.raises(ValueError):
        load_image(data, background=(0, 300, 0))


def test_palette_with_and_without_transparency():
    idx = np.zeros((16, 16), np.uint8)
    idx[:, 8:] = 1
    pal = Image.fromarray(idx, "P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    plain = load_image(encode(pal, "PNG"))
    assert plain.mode == "P" and plain.alpha is None
    np.testing.assert_array_equal(plain.rgb[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(plain.rgb[0, 15], (200, 100, 50))

    clear = load_image(encode(pal, "PNG", transparency=0), background=(1, 2, 3))
    assert clear.mode == "P"
    np.testing.assert_array_equal(clear.rgb[0, 0], (1, 2, 3))
    np.testing.assert_array_equal(clear.rgb[0, 15], (200, 100, 50))
    np.testing.assert_array_equal(clear.alpha[0, [0, 15]], (0, 255))


def test_la_one_bit_and_grey_modes():
    la = np.zeros((16, 16, 2), np.uint8)
    la[..., 0] = 100
    la[..., 1] = 255
    la[0, 0, 1] = 0
    img = load_image(encode(Image.fromarray(la, "LA"), "PNG"))
    assert img.mode == "LA"
    np.testing.assert_array_equal(img.rgb[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(img.rgb[1, 1], (100, 100, 100))
    assert img.alpha[0, 0] == 0 and img.alpha[1, 1] == 255

    bits = Image.new("1", (16, 16), 0)
    bits.putpixel((3, 2), 1)
    img = load_image(encode(bits, "PNG"))
    assert img.mode == "1"
    np.testing.assert_array_equal(img.rgb[2, 3], (255, 255, 255))
    np.testing.assert_array_equal(img.rgb[0, 0], (0, 0, 0))

    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = load_image(encode(Image.fromarray(grey, "L"), "PNG"))
    assert img.mode == "L" and img.alpha is None and img.warnings == ()
    np.testing.assert_array_equal(img.rgb, np.repeat(grey[..., None], 3, axis=2))


# --------------------------------------------------------------------------- 7. CMYK


def cmyk_cyan() -> Image.Image:
    return Image.new("CMYK", (16, 16), (255, 0, 0, 0))


def test_cmyk_jpeg_without_profile():
    img = load_image(encode(cmyk_cyan(), "JPEG", quality=95))
    assert img.mode == "CMYK" and img.format == "JPEG"
    assert np.abs(img.rgb[8, 8].astype(int) - (0, 255, 255)).max() <= 10
    assert "CMYK converted to RGB without a colour profile" in img.warnings


def test_cmyk_jpeg_with_unusable_profile_falls_back():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # RGB, not CMYK
    img = load_image(encode(cmyk_cyan(), "JPEG", quality=95, icc_profile=srgb))
    assert np.abs(img.rgb[8, 8].astype(int) - (0, 255, 255)).max() <= 10
    assert any("profile is unusable" in w for w in img.warnings)


def test_cmyk_jpeg_with_profile_uses_imagecms(monkeypatch):
    from PIL import ImageCms

    calls = []

    def fake(im, src, dst, outputMode=None, **kw):
        calls.append(outputMode)
        return Image.new("RGB", im.size, (1, 2, 3))

    monkeypatch.setattr(ImageCms, "profileToProfile", fake)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = load_image(encode(cmyk_cyan(), "JPEG", icc_profile=srgb))
    assert calls == ["RGB"]
    np.testing.assert_array_equal(img.rgb[0, 0], (1, 2, 3))
    assert not any("CMYK" in w for w in img.warnings)


# --------------------------------------------------------------------------- 8. frames


def gif_frames(tmp_path: Path) -> Path:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return write(tmp_path, "anim.gif", buf.getvalue())


def test_animated_gif_frames(tmp_path):
    path = gif_frames(tmp_path)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        img = load_image(path, frame=i)
        assert img.n_frames == 3 and img.frame == i and img.format == "GIF"
        np.testing.assert_array_equal(img.rgb[5, 5], colour)
        assert f"animated image: showing frame {i + 1} of 3" in img.warnings
    for bad in (3, -1):
        with pytest.raises(ImageLoadError) as exc:
            load_image(path, frame=bad)
        assert one_line(exc).endswith(f"frame {bad} requested but the image has 3 frame(s)")


def test_single_frame_has_no_frame_warning():
    img = load_image(encode(Image.fromarray(noise()), "PNG"))
    assert img.n_frames == 1 and img.frame == 0 and img.warnings == ()
    with pytest.raises(ImageLoadError, match="has 1 frame"):
        load_image(encode(Image.fromarray(noise()), "PNG"), frame=1)


# --------------------------------------------------------------------------- 9. bytes == path


def test_bytes_input_matches_path(tmp_path):
    data = encode(Image.fromarray(noise()), "PNG")
    path = write(tmp_path, "a.png", data)
    from_path = load_image(str(path))
    for blob in (data, bytearray(data), memoryview(data)):
        from_bytes = load_image(blob)
        assert from_bytes.source == "<bytes>"
        np.testing.assert_array_equal(from_bytes.rgb, from_path.rgb)
        assert (from_bytes.sha256, from_bytes.format, from_bytes.mode) == (
            from_path.sha256, from_path.format, from_path.mode)
    assert from_path.source == str(path)
    assert load_image(path).source == str(path)
    assert probe_image(data) == probe_image(path) == (32, 48)


# --------------------------------------------------------------------------- 10. content hash


def test_sha256_is_a_pixel_content_key(tmp_path):
    arr = noise()
    png = write(tmp_path, "a.png", encode(Image.fromarray(arr), "PNG"))
    ref = load_image(png).sha256
    assert len(ref) == 64
    assert load_image(png.read_bytes()).sha256 == ref
    assert load_image(encode(Image.fromarray(arr), "BMP")).sha256 == ref
    assert load_image(encode(Image.fromarray(arr), "TIFF")).sha256 == ref

    changed = arr.copy()
    changed[3, 4, 1] ^= 1
    assert load_image(encode(Image.fromarray(changed), "PNG")).sha256 != ref
    # same bytes, different shape -> different key
    reshaped = np.ascontiguousarray(arr).reshape(48, 32, 3)
    assert load_image(encode(Image.fromarray(reshaped), "PNG")).sha256 != ref


# --------------------------------------------------------------------------- 11. array contract


def test_rgb_array_contract():
    data = encode(Image.fromarray(noise()), "PNG")
    img = load_image(data)
    assert isinstance(img, LoadedImage)
    assert img.rgb.dtype == np.uint8 and img.rgb.shape == (32, 48, 3) and img.size == (32, 48)
    assert img.rgb.flags.c_contiguous and img.rgb.flags.writeable and img.rgb.flags.owndata
    img.rgb[0, 0] = (1, 2, 3)  # the caller owns it
    np.testing.assert_array_equal(load_image(data).rgb, noise())
    with pytest.raises(AttributeError):
        img.frame = 2  # frozen


def contract_sources(tmp_path: Path) -> dict[str, object]:
    exif = Image.Exif()
    exif[0x0112] = 8
    rgba = np.dstack([noise(20, 24), np.full((20, 24), 100, np.uint8)])
    return {
        "rgba": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette": encode(Image.fromarray(noise(20, 24)).convert("P"), "GIF"),
        "i16": encode(Image.fromarray(np.full((20, 24), 4000, np.uint16)), "PNG"),
        "float": encode(Image.fromarray(np.eye(20, 24, dtype=np.float32), "F"), "TIFF"),
        "cmyk": encode(Image.new("CMYK", (24, 20), (0, 255, 0, 0)), "JPEG"),
        "rotated": encode(Image.fromarray(noise(20, 24)), "JPEG", exif=exif.tobytes()),
        "gif frame 2": gif_frames(tmp_path),
    }


@pytest.mark.parametrize(
    "kind", ["rgba", "palette", "i16", "float", "cmyk", "rotated", "gif frame 2"]
)
def test_rgb_array_contract_for_every_path(tmp_path, kind):
    source = contract_sources(tmp_path)[kind]
    img = load_image(source, frame=1 if kind.startswith("gif") else 0)
    expected = (24, 20) if kind == "rotated" else ((16, 16) if kind.startswith("gif") else (20, 24))
    assert img.rgb.shape == (*expected, 3) and img.rgb.dtype == np.uint8
    assert img.rgb.flags.c_contiguous and img.rgb.flags.writeable
    if img.alpha is not None:
        assert img.alpha.shape == expected and img.alpha.dtype == np.uint8
        assert img.alpha.flags.c_contiguous


# --------------------------------------------------------------------------- misc


def test_probe_reads_only_the_header(no_decoding):
    data = encode(Image.fromarray(noise(20, 30)), "PNG")
    assert probe_image(data) == (20, 30)
    with pytest.raises(AssertionError, match="decoded"):
        load_image(data)  # proves the fixture would catch decoding


def test_image_filter_patterns():
    pats = image_filter_patterns()
    for p in ("*.png", "*.jpg", "*.jpeg", "*.gif", "*.bmp", "*.tif", "*.tiff", "*.webp"):
        assert p in pats
    assert "*.ppm" not in pats and "*.txt" not in pats
    assert len(pats) == len(set(pats)) and all(p.startswith("*.") for p in pats)


def test_constants():
    assert DEFAULT_MAX_PIXELS == 100_000_000 and MIN_SIDE == 16
    assert {"PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"} <= set(ALLOWED_FORMATS)
    assert image_io.__all__


def test_truncation_setting_does_not_leak_between_threads():
    from concurrent.futures import ThreadPoolExecutor

    cut = encode(Image.fromarray(smooth()), "JPEG")[:-300]

    def strict(_):
        try:
            load_image(cut)
        except ImageLoadError:
            return True
        return False

    def lenient(_):
        return load_image(cut, allow_truncated=True).size == (64, 64)

    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(f, i) for i in range(20) for f in (strict, lenient)]
        assert all(r.result() for r in results)


# --------------------------------------------------------------------------- 11. damaged and special files


def _png_with_bad_crc(chunk: bytes = b"IHDR") -> bytes:
    data = bytearray(encode(Image.fromarray(noise()), "PNG"))
    at = data.index(chunk)
    length = struct.unpack(">I", data[at - 4:at])[0]
    data[at + 4 + length] ^= 0xFF  # first byte of the chunk's CRC
    return bytes(data)


def _jpeg_with_exif(tiff: bytes) -> bytes:
    jpeg = encode(Image.fromarray(noise(24, 40)), "JPEG", quality=95)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _ifd(*entries: tuple[int, int, int, int]) -> bytes:
    """A little-endian TIFF header and one IFD of ``(tag, type, count, value)`` entries."""
    body = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    return b"II*\x00" + struct.pack("<I", 8) + body + b"\x00" * 28


def test_png_with_a_bad_checksum_says_so(tmp_path):
    path = write(tmp_path, "crc.png", _png_with_bad_crc())
    for call in (load_image, probe_image):
        with pytest.raises(ImageLoadError) as exc:
            call(path)
        assert one_line(exc) == f"cannot read '{path}': the file is damaged (PNG checksum error)"
    with pytest.raises(ImageLoadError, match=re.escape("the file is damaged (PNG checksum error)")):
        load_image(_png_with_bad_crc())
    with pytest.raises(ImageLoadError, match=re.escape("<bytes>: file is truncated or corrupt")):
        load_image(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else is a damaged PNG, not "not an image"


def test_png_with_a_bad_pixel_data_checksum_still_loads():
    # Pillow does not check IDAT checksums; the pixels (zlib-checked) decode as written
    assert load_image(_png_with_bad_crc(b"IDAT")).rgb.shape == (32, 48, 3)


def test_jpeg_whose_exif_stops_pillow_loads_without_it():
    # XResolution stored as one UNDEFINED byte: Pillow's open reads it as a pair and fails
    data = _jpeg_with_exif(_ifd((0x0128, 2, 2, 3), (0x011A, 7, 1, 3)))
    try:
        Image.open(io.BytesIO(data))
        pillow_refuses = False
    except Exception:  # noqa: BLE001 - whatever this Pillow raises for it
        pillow_refuses = True
    img = load_image(data)
    assert img.size == (24, 40) and img.format == "JPEG"
    if pillow_refuses:
        assert img.warnings == (image_io.EXIF_DAMAGED,)


def test_jpeg_with_exif_that_cannot_be_re_encoded_is_oriented():
    # orientation 3 (readable) next to a tag Pillow cannot write back: rotated, no error
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:4, :4] = 255
    jpeg = encode(Image.fromarray(stored), "JPEG", quality=95)
    payload = b"Exif\x00\x00" + _ifd((0x0112, 3, 1, 3), (0x010F, 12, 4, 3))
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(data)
    assert img.size == (24, 40) and img.warnings == ()
    assert img.rgb[-2:, -2:].mean() > 200 and img.rgb[:2, :2].mean() < 50  # rotated by 180 degrees


def test_jpeg_with_garbage_exif_loads_with_a_warning():
    data = _jpeg_with_exif(b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + bytes(range(40)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own "Corrupt EXIF data" warning does not escape
        img = load_image(data)
    assert img.size == (24, 40)
    assert img.warnings in ((), (image_io.EXIF_PARTLY,), (image_io.EXIF_DAMAGED,))


def test_avif(tmp_path, monkeypatch):
    from PIL import features

    header = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64)
    path = write(tmp_path, "a.avif", header)
    if features.check("avif"):
        with pytest.raises(ImageLoadError) as exc:
            load_image(path)
        assert one_line(exc) == f"cannot read '{path}': the file is damaged (AVIF could not be read)"
        real = write(tmp_path, "real.avif", encode(Image.fromarray(noise()), "AVIF", quality=90))
        img = load_image(real)
        assert img.format == "AVIF" and img.size == (32, 48) and img.warnings == ()
        assert "*.avif" in image_filter_patterns()
        monkeypatch.setattr(image_io, "ALLOWED_FORMATS", tuple(f for f in ALLOWED_FORMATS if f != "AVIF"))
    for source in (path, header):
        with pytest.raises(ImageLoadError) as exc:
            load_image(source)
        assert one_line(exc).endswith(": AVIF is not supported (convert it to PNG or JPEG)")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    with pytest.raises(ImageLoadError, match=re.escape("HEIC/HEIF is not supported (convert it to PNG or JPEG)")):
        load_image(heic)


def test_named_pipe_is_refused_without_blocking(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []

    def attempt():
        try:
            load_image(fifo)
        except ImageLoadError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the open() it is stuck in, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("load_image blocked on a named pipe")
    assert outcome == [f"cannot read '{fifo}': not a regular file (a named pipe)"]


def test_devices_are_refused():
    from pathlib import Path

    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    for call in (load_image, probe_image):
        with pytest.raises(ImageLoadError) as exc:
            call("/dev/zero")
        assert one_line(exc) == "cannot read '/dev/zero': not a regular file (a character device)"
