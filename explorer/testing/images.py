"""Image helpers for tests: encode arrays as files in memory."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["png_bytes", "jpeg_bytes"]


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of an ``(H, W, 3)`` or ``(H, W)`` uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
