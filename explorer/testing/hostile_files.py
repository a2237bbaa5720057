"""A corpus of bad, odd and hostile image files, generated on the spot (nothing is shipped).

:func:`make_corpus` writes them into a folder and returns :class:`Case` entries: the file, what
it is, and whether a careful image viewer should load it (``loads``) or refuse it with a message
(``refused``). The reliability check (``tools/reliability.py``, ``tests/test_reliability.py``)
runs every file through the command line and the window and counts what was handled cleanly,
what crashed and whether any earlier output was lost.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Case", "make_corpus"]


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    what: str
    loads: bool  # True: a valid image the program should open; False: refused with a message


def _png_bytes(arr: np.ndarray, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG signature and IHDR claiming ``w x h`` and a tiny IDAT (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def make_corpus(folder: str | os.PathLike) -> list[Case]:
    """Write the corpus into ``folder`` (created) and return its cases (at least 40)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([x * 2 % 256, y * 2 % 256, (x + y) % 256], -1).astype(np.uint8)
    cases: list[Case] = []

    def add(name: str, what: str, loads: bool, data: bytes | None = None) -> Path:
        p = root / name
        if data is not None:
            p.write_bytes(data)
        cases.append(Case(name, p, what, loads))
        return p

    good_png = _png_bytes(rgb)
    # -- not images at all
    add("empty.png", "an empty file", False, b"")
    add("text.png", "a text file named .png", False, b"hello, I am not an image\n" * 20)
    add("page.jpg", "an HTML page named .jpg", False, b"<!doctype html><html><body>404</body></html>")
    add("random.png", "random bytes named .png", False, rng.bytes(5000))
    add("random.jpg", "random bytes named .jpg", False, rng.bytes(5000))
    add("archive.png", "a ZIP archive named .png", False, _zip_bytes(good_png))
    add("gzipped.png", "a gzipped PNG", False, gzip.compress(good_png))
    add("array.png", "a NumPy .npy file named .png", False, _npy_bytes(rgb))
    add("drawing.svg", "an SVG drawing", False, b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    add("doc.pdf", "a PDF document", False, b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    add("script.png", "a shell script named .png", False, b"#!/bin/sh\nrm -rf /tmp/nothing\n")
    # -- damaged images
    add("truncated.png", "a PNG cut in half", False, good_png[: len(good_png) // 2])
    add("header-only.png", "a PNG signature and nothing else", False, good_png[:8])
    bad_crc = bytearray(good_png)
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    add("bad-crc.png", "a PNG whose header checksum is wrong", False, bytes(bad_crc))
    jpg = io.BytesIO()
    _save_to(rgb, jpg, "JPEG", quality=90)
    jpeg = jpg.getvalue()
    add("truncated.jpg", "a JPEG cut in half", False, jpeg[: len(jpeg) // 2])
    add("zero-width.png", "a PNG whose header says width 0", False, _png_header_only(0, 10))
    add("bomb.png", "a PNG header claiming 100000 x 100000 pixels", False, _png_header_only(100_000, 100_000))
    add("bomb.tif", "a TIFF claiming 60000 x 60000 pixels", False, _tiff_header(60_000, 60_000))
    add("tiny.png", "a 1 x 1 image", False, _png_bytes(np.zeros((1, 1, 3), np.uint8)))
    add("needle.png", "a 2 x 4000 image", False, _png_bytes(np.zeros((2, 4000, 3), np.uint8)))
    add("avif.avif", "an AVIF file (ftyp header)", False,
        struct.pack(">I", 28) + b"ftypavif" + b"\x00\x00\x00\x00avifmif1miaf" + rng.bytes(200))
    # -- not regular files
    d = root / "folder.png"
    d.mkdir(exist_ok=True)
    cases.append(Case("folder.png", d, "a folder named .png", False))
    fifo = root / "pipe.png"
    if hasattr(os, "mkfifo") and not fifo.exists():
        os.mkfifo(fifo)
        cases.append(Case("pipe.png", fifo, "a named pipe (FIFO)", False))
    zero = root / "zero.png"
    if Path("/dev/zero").exists() and not zero.exists():
        zero.symlink_to("/dev/zero")
        cases.append(Case("zero.png", zero, "a link to /dev/zero", False))
    dangling = root / "dangling.png"
    if not dangling.exists() and not dangling.is_symlink():
        dangling.symlink_to(root / "nowhere.png")
    cases.append(Case("dangling.png", dangling, "a link to a missing file", False))
    loop = root / "loop.png"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    cases.append(Case("loop.png", loop, "a link to itself", False))
    cases.append(Case("missing.png", root / "missing.png", "a file that does not exist", False))
    # -- valid images in odd forms (should load)
    add("plain.png", "an ordinary PNG", True, good_png)
    add("trailing-garbage.png", "a PNG with bytes after its end", True, good_png + rng.bytes(300))
    add("sixteen-bit.png", "a 16-bit grey PNG", True, _png_bytes((np.arange(96 * 128).reshape(96, 128) * 5).astype(np.uint16)))
    add("grey.png", "a grey PNG", True, _png_bytes(rgb[..., 0]))
    add("rgba.png", "a PNG with transparency", True, _png_bytes(np.dstack([rgb, rgb[..., :1]])))
    add("plain.jpg", "an ordinary JPEG", True, jpeg)
    from PIL import Image

    Image.fromarray(rgb).convert("CMYK").save(add("cmyk.jpg", "a CMYK JPEG", True), "JPEG")
    add("rotated.jpg", "a JPEG with EXIF orientation 6", True, _jpeg_with_orientation(rgb, 6))
    add("bad-exif.jpg", "a JPEG whose EXIF block is garbage", True, _jpeg_with_app1(jpeg, b"Exif\x00\x00" + rng.bytes(200)))
    Image.fromarray(rgb).save(add("image.bmp", "a BMP", True), "BMP")
    Image.fromarray(rgb).save(add("image.webp", "a WebP", True), "WEBP")
    Image.fromarray(rgb).save(add("image.tif", "a TIFF", True), "TIFF")
    frames = [Image.fromarray(np.roll(rgb, 8 * i, 1)) for i in range(3)]
    frames[0].save(add("anim.gif", "an animated GIF", True), "GIF", save_all=True, append_images=frames[1:])
    Image.fromarray(rgb).convert("P").save(add("palette.png", "a palette PNG", True), "PNG")
    add("odd name ü €.png", "a PNG with spaces and non-ASCII in its name", True, good_png)
    add("UPPER.PNG", "a PNG with an upper-case extension", True, good_png)
    add("no-extension", "a PNG without an extension", True, good_png)
    add("wrong-ext.jpg", "a PNG named .jpg", True, good_png)
    return cases


def _save_to(arr, buf, fmt, **kw):
    from PIL import Image

    Image.fromarray(arr).save(buf, fmt, **kw)


def _zip_bytes(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("image.png", payload)
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _tiff_header(w: int, h: int) -> bytes:
    """A little-endian TIFF with one IFD claiming ``w x h`` RGB and a few bytes of data."""
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHII", tag, typ, count, value) if typ == 4 else struct.pack("<HHIHH", tag, typ, count, value, 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def _jpeg_with_app1(jpeg: bytes, payload: bytes) -> bytes:
    seg = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + seg + jpeg[2:]


def _jpeg_with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()
