"""Load images from disk or memory into one canonical RGB array, safely.

Conventions
-----------
* The result is always ``rgb``: an ``(H, W, 3)`` ``uint8`` C-contiguous array that the caller owns,
  rows top to bottom, in the orientation the camera meant (EXIF orientation applied first).
* Transparency is composited onto a solid ``background`` colour (white by default, never black);
  the ``(H, W)`` ``uint8`` alpha is returned alongside (255 = opaque).
* 16-bit data is *scaled* to 8 bits (``round(v / 257)``: 65535 -> 255, 32768 -> 128), never clipped;
  32-bit integer data outside ``0..65535`` and floating-point data are scaled by their own range.
* Sizes in messages are written ``WxH`` (as image viewers do); sizes returned are ``(H, W)``.
* Only formats in :data:`ALLOWED_FORMATS` are opened, and the header size is checked against
  ``max_pixels`` *before* any pixel is decoded (decompression-bomb guard).
* Only regular files are opened (a named pipe would block, a device never ends). A refusal says
  why in one line: an AVIF or HEIC file this Pillow cannot read, a PNG whose checksums do not
  match, a truncated file. Damaged EXIF data does not stop a load: the pixels are shown as stored
  and a warning says so.

Pillow keeps two settings in module globals (``Image.MAX_IMAGE_PIXELS`` and
``ImageFile.LOAD_TRUNCATED_IMAGES``). This module changes them only while it holds a module lock and
restores them in ``finally``, so callers never see them changed; other threads that use Pillow
directly during a load may briefly see them.

This module is numpy + Pillow only.
"""

from __future__ import annotations

import hashlib
import io
import operator
import os
import stat
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError, features

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "MIN_SIDE",
    "ImageLoadError",
    "LoadedImage",
    "image_filter_patterns",
    "list_images",
    "load_image",
    "probe_image",
    "image_from_array",
]

DEFAULT_MAX_PIXELS = 100_000_000
MIN_SIDE = 16
#: Pillow format names that are opened; everything else is "not an image". Multi-picture JPEGs
#: (camera stereo/preview files) open through the JPEG opener and report the format ``"MPO"``.
#: AVIF opens where this Pillow was built with it; elsewhere it is refused with a message saying so.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF", "GIF", "BMP", "ICO", "AVIF")

_PIL_LOCK = threading.Lock()
# Errors Pillow raises for damaged or truncated data (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# Errors Pillow raises for EXIF data it cannot parse or re-encode (damaged offsets, counts, types).
_EXIF_ERRORS = (SyntaxError, ValueError, KeyError, TypeError, IndexError, AttributeError, ArithmeticError,
                EOFError, struct.error)
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image
#: The transposition that shows the stored pixels as the camera meant, per EXIF orientation.
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
EXIF_DAMAGED = "the EXIF data is damaged: it was ignored, orientation included (the image is shown as stored)"
EXIF_PARTLY = "the EXIF data is damaged: only the part that could be read was used"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class ImageLoadError(ValueError):
    """An image could not be loaded; the message is one human-readable line.

    The message reads ``"cannot read '<file>': <reason>"``, for example
    ``"cannot read 'x.txt': not an image (unrecognised format)"``. The parts are also
    available as :attr:`source` and :attr:`reason`.
    """

    def __init__(self, message: str, *, source: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image in canonical form.

    Attributes
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` ``uint8``, C-contiguous, owned by the caller; EXIF orientation applied and
        any transparency composited onto the requested background.
    alpha : np.ndarray or None
        ``(H, W)`` ``uint8`` (255 = opaque) when the source has an alpha channel or a transparent
        colour, else ``None``.
    source : str
        The path as given, or ``"<bytes>"``.
    format, mode : str
        Pillow format name (``"PNG"``) and the source's original Pillow mode (``"I;16"``, ``"P"``).
    sha256 : str
        Hex SHA-256 of the shape and the ``rgb`` bytes as loaded (after compositing, so the
        background is part of it; alpha is not): a content key for caches.
    warnings : tuple of str
        Lossy or approximate steps taken, one human-readable line each.
    n_frames, frame : int
        Number of frames in the file and the 0-based frame returned.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    source: str
    format: str
    mode: str
    sha256: str
    warnings: tuple[str, ...]
    n_frames: int
    frame: int

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return (int(self.rgb.shape[0]), int(self.rgb.shape[1]))


def image_filter_patterns() -> list[str]:
    """Glob patterns (``["*.bmp", "*.gif", ...]``) for the allowed formats, for file dialogs."""
    Image.init()
    allowed = set(ALLOWED_FORMATS) | {"MPO"}
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in allowed}
    return sorted(f"*{ext.lower()}" for ext in exts)


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` by extension (:func:`image_filter_patterns`), sorted by path
    (case-insensitive); with ``recursive`` also those of its subfolders. An unreadable folder
    gives an empty list; hidden files and folders (a leading dot) are skipped."""
    exts = {p[1:].lower() for p in image_filter_patterns()}
    root = Path(folder)
    try:
        found = root.rglob("*") if recursive else root.iterdir()
        files = [p for p in found if p.suffix.lower() in exts and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    except OSError:
        return []
    return sorted(files, key=lambda p: str(p.relative_to(root)).lower())


def probe_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> tuple[int, int]:
    """Read only the header and return the image size after EXIF orientation.

    Parameters
    ----------
    source, max_pixels, min_side
        As for :func:`load_image`.

    Returns
    -------
    (H, W) : tuple of int
        Rows and columns of the image as :func:`load_image` would return it. (A PNG whose EXIF
        chunk follows the pixel data is reported as stored, since reading it means decoding.)

    Raises
    ------
    ImageLoadError
        For the header-level problems :func:`load_image` refuses: missing, empty or unreadable
        file, not an image, too small (``min_side``), too large (``max_pixels``).
    """
    _check_limits(max_pixels, min_side)
    _, label, opener = _resolve(source)
    with _pillow_guard(max_pixels), opener() as fp:
        with _open_header(fp, label) as img:
            w, h = _check_size(img, label, max_pixels, min_side)
    return (h, w)


def load_image(
    source: str | os.PathLike | bytes,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
    frame: int = 0,
    allow_truncated: bool = False,
) -> LoadedImage:
    """Decode one frame of an image file (path or encoded ``bytes``) into a :class:`LoadedImage`.

    Parameters
    ----------
    source : str, os.PathLike or bytes
        A file path, or the encoded file contents.
    background : (r, g, b)
        ``uint8`` colour that transparent pixels are composited onto.
    max_pixels : int
        Largest accepted ``W * H``, checked on the header before decoding.
    min_side : int
        Smallest accepted width and height.
    frame : int
        0-based frame of an animated or multi-page file.
    allow_truncated : bool
        Load what decodes from a truncated file (with a warning) instead of refusing it.

    Returns
    -------
    LoadedImage
        ``rgb`` ``(H, W, 3)`` ``uint8`` and, for sources with transparency, ``alpha`` ``(H, W)``.

    Raises
    ------
    ImageLoadError
        With one line naming the source and the reason.
    ValueError
        For invalid arguments (``background``, ``max_pixels``, ``min_side``).

    Notes
    -----
    Loads are serialised by a module lock (Pillow's settings are process-global).
    """
    _check_limits(max_pixels, min_side)
    frame = operator.index(frame)
    bg = np.asarray(background)
    if bg.shape != (3,) or not np.issubdtype(bg.dtype, np.integer) or not (
        0 <= bg.min() and bg.max() <= 255
    ):
        raise ValueError(f"background must be three integers in 0..255, got {background!r}")
    name, label, opener = _resolve(source)
    with _pillow_guard(max_pixels):
        try:
            return _decode(name, label, opener, bg, max_pixels, min_side, frame, False)
        except _DecodeFailed as failed:
            if not allow_truncated:
                raise _error(label, _damage(opener)) from failed.__cause__
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # restored by _pillow_guard
        try:
            return _decode(name, label, opener, bg, max_pixels, min_side, frame, True)
        except _DecodeFailed as failed:
            raise _error(label, _damage(opener)) from failed.__cause__


# ---------------------------------------------------------------------------------------------


class _DecodeFailed(Exception):
    """Internal: pixel decoding failed (its ``__cause__`` is Pillow's error)."""


def _damage(opener: Callable[[], BinaryIO]) -> str:
    """The reason for pixels that did not decode: a PNG checksum error when a chunk's CRC does
    not match, else truncated or corrupt."""
    with opener() as fp:
        if fp.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE and _png_checksum_error(fp):
            return "the file is damaged (PNG checksum error)"
    return "file is truncated or corrupt"


def _error(label: str, reason: str) -> ImageLoadError:
    return ImageLoadError(f"cannot read {label}: {reason}", source=label, reason=reason)


def _check_limits(max_pixels: int, min_side: int) -> None:
    if int(max_pixels) < 1 or int(min_side) < 1:
        raise ValueError(f"max_pixels and min_side must be >= 1, got {max_pixels}, {min_side}")


def _resolve(source: str | os.PathLike | bytes) -> tuple[str, str, Callable[[], BinaryIO]]:
    """Return ``(source field, label for messages, opener of a binary stream)``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise _error("<bytes>", "no data (0 bytes)")
        return "<bytes>", "<bytes>", lambda: io.BytesIO(data)
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    label = f"'{path}'"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _error(label, "no such file") from None
    except OSError as exc:
        raise _error(label, exc.strerror or str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise _error(label, "it is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):  # checked before opening: a named pipe would block, a device never ends
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise _error(label, f"not a regular file ({kind})")
    if st.st_size == 0:
        raise _error(label, "the file is empty (0 bytes)")

    def opener() -> BinaryIO:
        try:
            return open(path, "rb")
        except OSError as exc:
            raise _error(label, exc.strerror or str(exc)) from None

    return path, label, opener


@contextmanager
def _pillow_guard(max_pixels: int) -> Iterator[None]:
    """Hold the lock; make Pillow's bomb warning an error; restore Pillow's globals on exit."""
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
        try:
            Image.MAX_IMAGE_PIXELS = int(max_pixels)  # Pillow's later checks use the caller's limit
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open_header(fp: BinaryIO, label: str, notes: list[str] | None = None) -> Image.Image:
    """``Image.open`` reads the header only; Pillow's size check is off here, ours follows.

    A file Pillow does not recognise is looked at once more to say why: an AVIF or HEIC file
    this Pillow cannot open, a PNG whose checksums do not match, or a JPEG whose EXIF block
    stops Pillow (then it is opened without that block, and ``notes`` gets :data:`EXIF_DAMAGED`).
    """
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        Image.init()  # ``formats`` may only name registered openers (e.g. no WEBP without libwebp)
        formats = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)
        try:
            return Image.open(fp, formats=formats)
        except UnidentifiedImageError:
            pass
        fp.seek(0)
        head = fp.read(64)
        fp.seek(0)
        reason = _unsupported_container(head, avif="AVIF" in formats and features.check("avif"))
        if reason is None and head.startswith(_PNG_SIGNATURE):  # a PNG, but not one Pillow can read
            reason = ("the file is damaged (PNG checksum error)" if _png_checksum_error(fp)
                      else "file is truncated or corrupt")
        if reason is not None:
            raise _error(label, reason)
        if head.startswith(b"\xff\xd8\xff") and "JPEG" in formats:
            fp.seek(0)
            stripped = _without_exif(fp.read())
            if stripped is not None:
                try:
                    img = Image.open(io.BytesIO(stripped), formats=("JPEG",))
                except UnidentifiedImageError:
                    pass
                else:
                    if notes is not None:
                        notes.append(EXIF_DAMAGED)
                    return img
        raise _error(label, "not an image (unrecognised format)")
    except _DECODE_ERRORS as exc:
        if isinstance(exc, ImageLoadError):
            raise
        raise _error(label, "file is truncated or corrupt") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _unsupported_container(head: bytes, avif: bool) -> str | None:
    """The reason for an ISO media file (``ftyp`` box first) holding an AVIF or HEIC image that
    Pillow did not open: not supported, or (``avif``: this Pillow reads AVIF) damaged; ``None``
    for anything else."""
    if len(head) < 16 or head[4:8] != b"ftyp":
        return None
    size = int.from_bytes(head[:4], "big")
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, min(max(size, 16), len(head)) - 3, 4)}
    if brands & {b"avif", b"avis"}:
        return "the file is damaged (AVIF could not be read)" if avif else "AVIF is not supported (convert it to PNG or JPEG)"
    if brands & _HEIF_BRANDS:
        return "HEIC/HEIF is not supported (convert it to PNG or JPEG)"
    return None


def _png_checksum_error(fp: BinaryIO) -> bool:
    """Whether a chunk of the PNG in ``fp`` has a CRC that does not match its contents (reads
    chunk by chunk up to ``IEND`` or the end of the file; a truncated file is not a CRC error)."""
    fp.seek(len(_PNG_SIGNATURE))
    while True:
        header = fp.read(8)
        if len(header) < 8:
            return False
        length, kind = int.from_bytes(header[:4], "big"), header[4:]
        if length > 2**31 - 1:
            return False
        crc = zlib.crc32(kind)
        left = length
        while left:
            block = fp.read(min(left, 1 << 20))
            if not block:
                return False
            crc = zlib.crc32(block, crc)
            left -= len(block)
        stored = fp.read(4)
        if len(stored) < 4:
            return False
        if int.from_bytes(stored, "big") != crc:
            return True
        if kind == b"IEND":
            return False


def _without_exif(data: bytes) -> bytes | None:
    """The JPEG ``data`` with its EXIF (``APP1 Exif``) segments removed, or ``None`` when it has
    none or its segments cannot be walked. Everything from the start of scan on is kept as is."""
    out = bytearray(data[:2])
    i, removed = 2, False
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: the rest is pixel data
            out += data[i:]
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            out += data[i:i + 2]
            i += 2
            continue
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            removed = True
        else:
            out += data[i:end]
        i = end
    return bytes(out) if removed else None


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation readable without decoding pixels (1 when unknown)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # PNG.getexif() would decode the pixels to find a late eXIf chunk
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except _EXIF_ERRORS:
        return 1


def _check_size(img: Image.Image, label: str, max_pixels: int, min_side: int) -> tuple[int, int]:
    """Refuse too small / too large headers; return ``(W, H)`` after orientation."""
    w, h = img.size
    if _header_orientation(img) in _SWAPS_AXES:
        w, h = h, w
    if w * h > max_pixels:
        mp, limit = w * h / 1e6, max_pixels / 1e6
        raise _error(label, f"image is {w}x{h} ({mp:.1f} MP); the limit is {limit:.1f} MP")
    if min(w, h) < min_side:
        raise _error(label, f"image is {w}x{h} pixels; at least {min_side}x{min_side} is needed")
    return w, h


def _decode(
    name: str,
    label: str,
    opener: Callable[[], BinaryIO],
    bg: np.ndarray,
    max_pixels: int,
    min_side: int,
    frame: int,
    truncated: bool,
) -> LoadedImage:
    """Open, check, decode one frame, orient, convert and composite; see :func:`load_image`.
    Pillow's warnings about damaged EXIF data become a note of the result (other warnings pass)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        loaded = _decode_frame(name, label, opener, bg, max_pixels, min_side, frame, truncated)
    notes = list(loaded.warnings)
    for w in caught:
        if str(w.message).startswith(("Corrupt EXIF data", "Metadata Warning")):  # Pillow's EXIF (TIFF) reader
            if EXIF_DAMAGED not in notes and EXIF_PARTLY not in notes:
                notes.append(EXIF_PARTLY)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return replace(loaded, warnings=tuple(notes)) if len(notes) != len(loaded.warnings) else loaded


def _decode_frame(
    name: str,
    label: str,
    opener: Callable[[], BinaryIO],
    bg: np.ndarray,
    max_pixels: int,
    min_side: int,
    frame: int,
    truncated: bool,
) -> LoadedImage:
    notes: list[str] = []
    with opener() as fp, _open_header(fp, label, notes) as img:
        fmt, mode = str(img.format), img.mode
        _check_size(img, label, max_pixels, min_side)
        try:
            n_frames = int(getattr(img, "n_frames", 1))  # GIF: scans the frames
            in_range = 0 <= frame < n_frames
            if in_range and frame:
                img.seek(frame)
            if in_range:
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _error(label, f"image is too large to decode safely ({exc})") from exc
        except _DECODE_ERRORS as exc:
            raise _DecodeFailed() from exc
        if not in_range:
            raise _error(label, f"frame {frame} requested but the image has {n_frames} frame(s)")
        try:  # the orientation only: re-encoding damaged EXIF (as ImageOps.exif_transpose does) may fail
            orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
        except _EXIF_ERRORS:
            orientation = 1
            if EXIF_DAMAGED not in notes:
                notes.append(EXIF_DAMAGED)
        shown = img.transpose(_ORIENT[orientation]) if orientation in _ORIENT else img
        rgb, alpha = _to_rgb(shown, notes, label)
    if n_frames > 1:
        kind = "animated" if fmt in ("GIF", "PNG", "WEBP") else "multi-frame"
        notes.append(f"{kind} image: showing frame {frame + 1} of {n_frames}")
    if truncated:
        missing = {"JPEG": "grey", "MPO": "grey", "PNG": "black"}.get(fmt)
        notes.append(
            f"truncated file: the missing part is {missing}"
            if missing
            else "truncated file: only part of the image could be decoded"
        )
    if alpha is not None:
        a = alpha.astype(np.uint16)[..., None]
        mixed = rgb.astype(np.uint16) * a + bg.astype(np.uint16) * (255 - a) + 127
        rgb = (mixed // 255).astype(np.uint8)
    if not (rgb.flags.c_contiguous and rgb.flags.owndata and rgb.flags.writeable):
        rgb = np.array(rgb, dtype=np.uint8, order="C")
    digest = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}x3:".encode())
    digest.update(rgb.data)
    return LoadedImage(
        rgb, alpha, name, fmt, mode, digest.hexdigest(), tuple(notes), n_frames, frame
    )


def _scale_range(values: np.ndarray, notes: list[str], what: str) -> np.ndarray:
    """Linearly map the finite range of ``values`` onto 0..255 (non-finite -> 0)."""
    v = values.astype(np.float64)
    finite = np.isfinite(v)
    lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 0.0)
    notes.append(f"{what} image scaled from its range [{lo:g}, {hi:g}] to 8 bits")
    out = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.rint(np.where(finite, out, 0.0)).astype(np.uint8)


def _to_rgb(
    img: Image.Image, notes: list[str], label: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(rgb (H, W, 3) uint8, alpha (H, W) uint8 or None)``, not yet composited."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        raw = np.asarray(img)
        if mode == "F":
            gray = _scale_range(raw, notes, "floating-point")
        elif mode.startswith("I;16") or (raw.size and raw.min() >= 0 and raw.max() <= 65535):
            notes.append("16-bit image scaled to 8 bits")
            gray = ((raw.astype(np.uint32) + 128) // 257).astype(np.uint8)
        else:
            gray = _scale_range(raw, notes, "32-bit integer")
        alpha = None
        key = img.info.get("transparency")
        if isinstance(key, int) and not isinstance(key, bool):
            alpha = np.where(raw == key, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), alpha
    if mode == "CMYK":
        return np.array(_cmyk_to_rgb(img, notes)), None
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        arr = np.array(img.convert("RGBA" if has_alpha else "RGB"))
    except ValueError as exc:
        raise _error(label, f"unsupported pixel mode {mode!r}") from exc
    if has_alpha:
        return arr[..., :3], np.ascontiguousarray(arr[..., 3])
    return arr, None


def _cmyk_to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """CMYK -> sRGB through the embedded ICC profile when possible, else Pillow's naive formula."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms
        except ImportError:
            notes.append("CMYK converted to RGB without its colour profile (no colour management)")
            return img.convert("RGB")
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            notes.append(
                "CMYK converted to RGB without its colour profile (the profile is unusable)"
            )
            return img.convert("RGB")
    notes.append("CMYK converted to RGB without a colour profile")
    return img.convert("RGB")


def image_from_array(rgb: np.ndarray, source: str = "<array>") -> LoadedImage:
    """A :class:`LoadedImage` from an ``(H, W, 3)`` uint8 array already in memory (crops,
    synthetic scenes), hashed exactly as :func:`load_image` hashes decoded pixels."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
    arr = np.array(arr, dtype=np.uint8, order="C")
    digest = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}x3:".encode())
    digest.update(arr.data)
    return LoadedImage(arr, None, source, "ARRAY", "RGB", digest.hexdigest(), (), 1, 0)
