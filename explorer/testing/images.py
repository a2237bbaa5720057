"""Image helpers for tests: encode arrays as files in memory."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["png_bytes", "jpeg_bytes", "random_image"]


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of an ``(H, W, 3)`` or ``(H, W)`` uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def random_image(h: int, w: int, seed: int = 0):
    """A :class:`~explorer.core.image_io.LoadedImage` of random ``(h, w)`` RGB pixels, read back
    through the program's own loader from PNG bytes."""
    from explorer.core.image_io import load_image

    rng = np.random.default_rng(seed)
    return load_image(png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
