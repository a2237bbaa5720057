"""Turn a model's own torchvision-style preprocessing into a :class:`Geometry`.

The preprocessing pipeline returned with a model (open_clip's ``preprocess``) is walked step by
step. For every geometric step the output size and the affine map are computed with the same
rules the transform uses, the step is applied to the image, and the real output size is checked
against the prediction, so a token layout can never silently disagree with what the model saw.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image

from explorer.core.layout import Geometry

__all__ = ["UnsupportedPreprocessing", "apply_with_geometry"]

# Steps that do not move pixels.
_PHOTOMETRIC = {
    "ToTensor",
    "MaybeToTensor",
    "Normalize",
    "MaybeConvertMode",
    "ConvertImageDtype",
    "PILToTensor",
    "_convert_to_rgb",
    "ToImage",
    "ToDtype",
}


class UnsupportedPreprocessing(ValueError):
    """The pipeline contains a step whose geometry the explorer cannot derive."""


def _size_pair(size: Any) -> tuple[int, int] | int:
    if isinstance(size, int):
        return size
    size = list(size)
    if len(size) == 1:
        return int(size[0])
    return int(size[0]), int(size[1])


def _resize_output(h: int, w: int, size: Any, max_size: int | None) -> tuple[int, int]:
    """Output ``(h, w)`` of torchvision ``Resize(size, max_size)`` on an ``h x w`` image."""
    size = _size_pair(size)
    if isinstance(size, tuple):
        return size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None:
        if max_size <= size:
            raise UnsupportedPreprocessing(f"Resize max_size={max_size} must exceed size={size}")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop_steps(geo: Geometry, size: Any, name: str) -> Geometry:
    """torchvision ``CenterCrop`` / open_clip ``CenterCropOrPad``: pad (if smaller) then crop."""
    s = _size_pair(size)
    ch, cw = (s, s) if isinstance(s, int) else s
    h, w = geo.frame_size
    if cw > w or ch > h:
        left = (cw - w) // 2 if cw > w else 0
        top = (ch - h) // 2 if ch > h else 0
        right = (cw - w + 1) // 2 if cw > w else 0
        bottom = (ch - h + 1) // 2 if ch > h else 0
        geo = geo.pad(top, left, bottom, right, f"{name}: pad to {max(cw, w)}x{max(ch, h)}")
        h, w = geo.frame_size
        if (h, w) == (ch, cw):
            return geo
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return geo.crop(top, left, ch, cw, f"{name}: center crop {cw}x{ch}")


def _step_name(t: Any) -> str:
    return getattr(t, "__name__", None) or type(t).__name__


def _predict(geo: Geometry, t: Any) -> Geometry | None:
    """The geometry after step ``t``, or ``None`` for a photometric step."""
    name = _step_name(t)
    if name in _PHOTOMETRIC:
        return None
    h, w = geo.frame_size
    if name == "Resize":
        nh, nw = _resize_output(h, w, t.size, getattr(t, "max_size", None))
        return geo.resize((nh, nw), f"resize {w}x{h} -> {nw}x{nh} ({getattr(t, 'interpolation', '')})")
    if name == "ResizeKeepRatio":  # open_clip: resize so a mix of shortest/longest edge hits size
        th, tw = t.size
        if getattr(t, "random_scale_prob", 0) or getattr(t, "random_aspect_prob", 0):
            raise UnsupportedPreprocessing("random ResizeKeepRatio is a training transform")
        ratio_h, ratio_w = h / th, w / tw
        ratio = max(ratio_h, ratio_w) * t.longest + min(ratio_h, ratio_w) * (1.0 - t.longest)
        nh, nw = round(h / ratio), round(w / ratio)
        return geo.resize((nh, nw), f"resize keeping aspect {w}x{h} -> {nw}x{nh}")
    if name in ("CenterCrop", "CenterCropOrPad"):
        return _center_crop_steps(geo, t.size, name)
    raise UnsupportedPreprocessing(
        f"cannot derive the token layout from preprocessing step {name!r}; "
        "supported: Resize, ResizeKeepRatio, CenterCrop, CenterCropOrPad and photometric steps"
    )


def apply_with_geometry(transform: Any, image: Image.Image) -> tuple[Any, Geometry]:
    """Apply ``transform`` (a ``Compose`` or a single callable) to ``image`` and return
    ``(model_input, geometry)`` where ``geometry`` maps the original image to the input frame.

    Raises
    ------
    UnsupportedPreprocessing
        A step's geometry is unknown, or a step produced a size other than predicted.
    """
    steps: list[Callable] = list(getattr(transform, "transforms", [transform]))
    geo = Geometry.identity((image.height, image.width))
    x: Any = image
    for t in steps:
        nxt = _predict(geo, t)
        x = t(x)
        if nxt is not None:
            got = _spatial_size(x)
            if got != tuple(nxt.frame_size):
                raise UnsupportedPreprocessing(
                    f"step {_step_name(t)} produced {got[1]}x{got[0]}, expected {nxt.frame_size[1]}x{nxt.frame_size[0]}"
                )
            geo = nxt
    return x, geo


def _spatial_size(x: Any) -> tuple[int, int]:
    if isinstance(x, Image.Image):
        return (x.height, x.width)
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) >= 2:
        return (int(shape[-2]), int(shape[-1]))
    if isinstance(x, np.ndarray):
        return x.shape[:2]
    raise UnsupportedPreprocessing(f"cannot read the size of a {type(x).__name__}")
