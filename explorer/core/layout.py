"""Token layout: which pixels of the *original* image each token covers.

Coordinate conventions (used throughout the project)
----------------------------------------------------
* Image pixel ``(row, col)`` covers the continuous square ``[col, col + 1) x [row, row + 1)``.
  Points are ``(x, y)`` in these continuous coordinates; boxes are :class:`Box`
  ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive.
* Every preprocessing step that a backend applies (resize, crop, pad, tile extraction) is an
  axis-aligned affine map ``dst = src * scale + offset`` per axis, in those continuous coordinates.
  :class:`Geometry` composes them: it maps the original image to one model-input *frame*.
* A :class:`GridSegment` is a ``rows x cols`` grid of tokens that evenly divides a rectangle
  ``frame_rect`` of its frame, laid out row-major in the token sequence from ``seq_start`` with
  ``row_stride`` tokens per row (``row_stride > cols`` when a newline token ends each row, as in
  LLaVA-NeXT).
* Image tokens are numbered ``0 .. n_image_tokens - 1`` in segment order, row-major inside each
  segment. Per-image-token vectors (heatmap values, kept flags) use that order; sequence indices
  of those tokens come from :meth:`TokenLayout.image_token_indices`.

This module is numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Literal, Sequence

import numpy as np

_EDGE_EPS = 1e-6  # pixels / grid cells: absorbs float rounding of composed geometries
_BAND_PIXELS = 1 << 22  # TokenLayout.to_image paints rasters above 4 MP in bands of rows of this many pixels

__all__ = [
    "Box",
    "PreprocessStep",
    "Geometry",
    "GridSegment",
    "SpecialToken",
    "TokenLayout",
]


@dataclass(frozen=True)
class Box:
    """Axis-aligned rectangle ``[x0, x1) x [y0, y1)`` in continuous pixel coordinates."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def intersect(self, other: "Box") -> "Box | None":
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1, y1)

    def pixel_slices(self, size: tuple[int, int]) -> tuple[slice, slice]:
        """Rows and columns of an image of ``size = (H, W)`` whose pixel centres lie in the box."""
        h, w = size
        r0 = int(np.clip(np.ceil(self.y0 - 0.5 - _EDGE_EPS), 0, h))
        r1 = int(np.clip(np.ceil(self.y1 - 0.5 - _EDGE_EPS), 0, h))
        c0 = int(np.clip(np.ceil(self.x0 - 0.5 - _EDGE_EPS), 0, w))
        c1 = int(np.clip(np.ceil(self.x1 - 0.5 - _EDGE_EPS), 0, w))
        return slice(r0, r1), slice(c0, c1)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class PreprocessStep:
    """One geometric preprocessing step: ``dst = src * scale + offset`` per axis.

    ``in_size`` and ``out_size`` are ``(height, width)`` in pixels.
    """

    kind: Literal["resize", "crop", "pad", "tile", "scale"]
    description: str
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    scale: tuple[float, float]  # (sy, sx)
    offset: tuple[float, float]  # (oy, ox)


@dataclass(frozen=True)
class Geometry:
    """Composed axis-aligned map from the original image to one model-input frame.

    ``frame = original * scale + offset`` per axis (``scale``/``offset`` given as ``(y, x)``).
    """

    original_size: tuple[int, int]
    frame_size: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)
    steps: tuple[PreprocessStep, ...] = ()

    @classmethod
    def identity(cls, size: tuple[int, int]) -> "Geometry":
        size = (int(size[0]), int(size[1]))
        return cls(original_size=size, frame_size=size)

    # -- building -----------------------------------------------------------------------------
    def then(self, step: PreprocessStep) -> "Geometry":
        if tuple(step.in_size) != tuple(self.frame_size):
            raise ValueError(
                f"preprocessing step {step.description!r} expects input {step.in_size}, "
                f"but the frame is {self.frame_size}"
            )
        sy, sx = step.scale
        oy, ox = step.offset
        return Geometry(
            original_size=self.original_size,
            frame_size=tuple(int(v) for v in step.out_size),
            scale=(self.scale[0] * sy, self.scale[1] * sx),
            offset=(self.offset[0] * sy + oy, self.offset[1] * sx + ox),
            steps=self.steps + (step,),
        )

    def resize(self, new_size: tuple[int, int], description: str = "") -> "Geometry":
        h, w = self.frame_size
        nh, nw = int(new_size[0]), int(new_size[1])
        if nh <= 0 or nw <= 0:
            raise ValueError(f"resize to a non-positive size {new_size}")
        return self.then(
            PreprocessStep(
                "resize",
                description or f"resize {w}x{h} -> {nw}x{nh}",
                (h, w),
                (nh, nw),
                (nh / h, nw / w),
                (0.0, 0.0),
            )
        )

    def crop(self, top: int, left: int, height: int, width: int, description: str = "") -> "Geometry":
        """Keep frame rows ``top .. top+height`` and columns ``left .. left+width``.

        ``top``/``left`` may be negative or the crop may exceed the frame: the uncovered part is
        padding (as torchvision's ``crop`` does).
        """
        h, w = self.frame_size
        return self.then(
            PreprocessStep(
                "crop",
                description or f"crop {width}x{height} at (x={left}, y={top})",
                (h, w),
                (int(height), int(width)),
                (1.0, 1.0),
                (-float(top), -float(left)),
            )
        )

    def pad(self, top: int, left: int, bottom: int, right: int, description: str = "") -> "Geometry":
        h, w = self.frame_size
        return self.then(
            PreprocessStep(
                "pad",
                description or f"pad top={top} left={left} bottom={bottom} right={right}",
                (h, w),
                (h + int(top) + int(bottom), w + int(left) + int(right)),
                (1.0, 1.0),
                (float(top), float(left)),
            )
        )

    # -- mapping ------------------------------------------------------------------------------
    def to_frame(self, x: np.ndarray | float, y: np.ndarray | float):
        """Map original-image points to frame points."""
        return (
            np.asarray(x, dtype=np.float64) * self.scale[1] + self.offset[1],
            np.asarray(y, dtype=np.float64) * self.scale[0] + self.offset[0],
        )

    def to_original(self, x: np.ndarray | float, y: np.ndarray | float):
        """Map frame points back to original-image points."""
        return (
            (np.asarray(x, dtype=np.float64) - self.offset[1]) / self.scale[1],
            (np.asarray(y, dtype=np.float64) - self.offset[0]) / self.scale[0],
        )

    def box_to_original(self, box: Box) -> Box:
        x0, y0 = self.to_original(box.x0, box.y0)
        x1, y1 = self.to_original(box.x1, box.y1)
        return Box(float(x0), float(y0), float(x1), float(y1))

    def describe(self) -> list[str]:
        return [s.description for s in self.steps]

    def to_dict(self) -> dict:
        return {
            "original_size": list(self.original_size),
            "frame_size": list(self.frame_size),
            "scale": list(self.scale),
            "offset": list(self.offset),
            "steps": [
                {
                    "kind": s.kind,
                    "description": s.description,
                    "in_size": list(s.in_size),
                    "out_size": list(s.out_size),
                    "scale": list(s.scale),
                    "offset": list(s.offset),
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(
            original_size=tuple(d["original_size"]),
            frame_size=tuple(d["frame_size"]),
            scale=tuple(d["scale"]),
            offset=tuple(d["offset"]),
            steps=tuple(
                PreprocessStep(
                    s["kind"], s["description"], tuple(s["in_size"]), tuple(s["out_size"]),
                    tuple(s["scale"]), tuple(s["offset"]),
                )
                for s in d.get("steps", [])
            ),
        )


@dataclass(frozen=True)
class GridSegment:
    """A ``rows x cols`` grid of image tokens evenly covering ``frame_rect`` of its frame.

    Parameters
    ----------
    name
        Human-readable name ("patches", "base", "tile r0c1", "global").
    rows, cols
        Grid shape in tokens.
    seq_start
        Sequence index of the token at grid cell ``(0, 0)``.
    geometry
        Map from the original image to this segment's frame.
    frame_rect
        Rectangle of the frame (frame pixel coordinates) that the grid divides evenly.
        ``None`` means the whole frame.
    row_stride
        Sequence distance between the first tokens of consecutive rows; ``cols`` unless extra
        tokens (newlines) follow each row. Extra tokens sit at ``seq_start + r*row_stride + cols ..``.
    """

    name: str
    rows: int
    cols: int
    seq_start: int
    geometry: Geometry
    frame_rect: Box | None = None
    row_stride: int | None = None

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.cols <= 0:
            raise ValueError(f"segment {self.name!r} has an empty grid {self.rows}x{self.cols}")
        if self.row_stride is not None and self.row_stride < self.cols:
            raise ValueError(f"segment {self.name!r}: row_stride {self.row_stride} < cols {self.cols}")
        if self.seq_start < 0:
            raise ValueError(f"segment {self.name!r}: negative seq_start")

    @property
    def stride(self) -> int:
        return self.cols if self.row_stride is None else self.row_stride

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def seq_end(self) -> int:
        """One past the last sequence index used by this segment (including row extras)."""
        return self.seq_start + self.rows * self.stride

    @property
    def rect(self) -> Box:
        """The covered rectangle in frame coordinates."""
        if self.frame_rect is not None:
            return self.frame_rect
        h, w = self.geometry.frame_size
        return Box(0.0, 0.0, float(w), float(h))

    @property
    def image_rect(self) -> Box:
        """The covered rectangle in original-image coordinates (may extend past the image)."""
        return self.geometry.box_to_original(self.rect)

    def seq_indices(self) -> np.ndarray:
        """Sequence indices of the grid cells, shape ``(rows * cols,)``, row-major."""
        r = np.arange(self.rows)[:, None] * self.stride
        c = np.arange(self.cols)[None, :]
        return (self.seq_start + r + c).reshape(-1).astype(np.int64)

    def extra_indices(self) -> np.ndarray:
        """Sequence indices of the per-row extra tokens (newlines), possibly empty."""
        extra = self.stride - self.cols
        if extra == 0:
            return np.zeros(0, dtype=np.int64)
        r = np.arange(self.rows)[:, None] * self.stride + self.cols
        e = np.arange(extra)[None, :]
        return (self.seq_start + r + e).reshape(-1).astype(np.int64)

    def cell_box_frame(self, row: int, col: int) -> Box:
        rect = self.rect
        cw, ch = rect.width / self.cols, rect.height / self.rows
        return Box(rect.x0 + col * cw, rect.y0 + row * ch, rect.x0 + (col + 1) * cw, rect.y0 + (row + 1) * ch)

    def cell_box(self, row: int, col: int) -> Box:
        """Box of grid cell ``(row, col)`` in original-image coordinates."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"cell ({row}, {col}) outside the {self.rows}x{self.cols} grid")
        return self.geometry.box_to_original(self.cell_box_frame(row, col))

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """Grid cell containing original-image point ``(x, y)``, or ``None``."""
        fx, fy = self.geometry.to_frame(x, y)
        rect = self.rect
        col = int(np.floor((float(fx) - rect.x0) / (rect.width / self.cols)))
        row = int(np.floor((float(fy) - rect.y0) / (rect.height / self.rows)))
        if 0 <= row < self.rows and 0 <= col < self.cols:
            return row, col
        return None

    # Separable sampling helpers: the map from image pixels to grid cells is axis-aligned.
    def _axis_coords(self, out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Grid-unit coordinates of output pixel centres: ``(gy (H,), gx (W,))``.

        A value ``g`` means cell ``floor(g)``; cell centres sit at ``k + 0.5``.
        """
        H, W = out_size
        oh, ow = self.geometry.original_size
        # pixel centres of the output raster, in original-image coordinates
        ys = (np.arange(H) + 0.5) * (oh / H)
        xs = (np.arange(W) + 0.5) * (ow / W)
        fx, fy = self.geometry.to_frame(xs, ys)
        rect = self.rect
        gx = (fx - rect.x0) / (rect.width / self.cols)
        gy = (fy - rect.y0) / (rect.height / self.rows)
        return gy, gx

    def _interp_matrix(self, g: np.ndarray, n: int, mode: str) -> np.ndarray:
        """Sampling matrix ``(len(g), n)``: row i holds the weights of the n cells for coordinate g[i].

        Rows are zero where ``g`` falls outside ``[0, n)`` (outside the covered rectangle).
        """
        m = np.zeros((g.shape[0], n), dtype=np.float64)
        inside = (g >= 0) & (g < n)
        idx = np.nonzero(inside)[0]
        if mode == "nearest":
            # a pixel centre exactly on a cell edge belongs to the cell that starts there; the tiny
            # epsilon keeps float rounding of the geometry from flipping it (as in Box.pixel_slices)
            m[idx, np.clip(np.floor(g[idx] + _EDGE_EPS), 0, n - 1).astype(int)] = 1.0
        elif mode == "bilinear":
            c = np.clip(g[idx] - 0.5, 0.0, n - 1.0)
            lo = np.floor(c).astype(int)
            hi = np.minimum(lo + 1, n - 1)
            t = c - lo
            m[idx, lo] += 1.0 - t
            m[idx, hi] += t
        else:
            raise ValueError(f"unknown interpolation {mode!r}; use 'nearest' or 'bilinear'")
        return m

    def sample(self, grid: np.ndarray, out_size: tuple[int, int], mode: str = "nearest",
               rows: tuple[int, int] | None = None):
        """Resample ``grid (rows, cols)`` onto an ``out_size = (H, W)`` raster of the original image.

        Returns ``(values (H, W) float32, coverage (H, W) bool)``; with ``rows = (r0, r1)`` only
        the raster's rows ``r0..r1-1`` (``(r1 - r0, W)``, the same values as those rows of the
        whole raster).
        """
        grid = np.asarray(grid, dtype=np.float64)
        if grid.shape != (self.rows, self.cols):
            raise ValueError(f"segment {self.name!r} expects a {self.rows}x{self.cols} grid, got {grid.shape}")
        gy, gx = self._axis_coords(out_size)
        if rows is not None:
            gy = gy[rows[0]:rows[1]]
        my = self._interp_matrix(gy, self.rows, mode)
        mx = self._interp_matrix(gx, self.cols, mode)
        values = my @ grid @ mx.T
        coverage = (my.sum(1) > 0)[:, None] & (mx.sum(1) > 0)[None, :]
        return values.astype(np.float32), coverage

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rows": self.rows,
            "cols": self.cols,
            "seq_start": self.seq_start,
            "row_stride": self.row_stride,
            "frame_rect": None if self.frame_rect is None else list(self.frame_rect.as_tuple()),
            "geometry": self.geometry.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GridSegment":
        return cls(
            name=d["name"],
            rows=d["rows"],
            cols=d["cols"],
            seq_start=d["seq_start"],
            row_stride=d.get("row_stride"),
            frame_rect=None if d.get("frame_rect") is None else Box(*d["frame_rect"]),
            geometry=Geometry.from_dict(d["geometry"]),
        )


@dataclass(frozen=True)
class SpecialToken:
    """A non-grid token of the sequence: ``kind`` is 'cls', 'register', 'newline', 'text', ..."""

    index: int
    kind: str


@dataclass(frozen=True)
class TokenLayout:
    """Where every image token of a token sequence sits on the original image.

    Parameters
    ----------
    n_tokens
        Length of the token sequence this layout describes (vision tower sequence for a ViT,
        the LLM sequence for a VLM).
    original_size
        ``(H, W)`` of the original image (after EXIF orientation), the canonical frame.
    segments
        Grid segments in image-token order.
    special
        Non-grid tokens worth naming (prefix [CLS] and registers, newline tokens, ...).
    window_size
        For windowed-attention encoders (SAM), the attention window in tokens, else ``None``.
    description
        Free text for the UI (the model family, preprocessing in words).
    """

    n_tokens: int
    original_size: tuple[int, int]
    segments: tuple[GridSegment, ...]
    special: tuple[SpecialToken, ...] = ()
    window_size: int | None = None
    description: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a token layout needs at least one grid segment")
        used = np.concatenate([s.seq_indices() for s in self.segments])
        if used.size and (used.min() < 0 or used.max() >= self.n_tokens):
            raise ValueError(
                f"segment token indices span {used.min()}..{used.max()}, outside a sequence of {self.n_tokens}"
            )
        if np.unique(used).size != used.size:
            raise ValueError("two grid segments claim the same sequence index")
        for s in self.segments:
            if tuple(s.geometry.original_size) != tuple(self.original_size):
                raise ValueError(
                    f"segment {s.name!r} maps from an image of {s.geometry.original_size}, "
                    f"the layout's image is {self.original_size}"
                )

    # -- token bookkeeping ----------------------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        return int(sum(s.n_tokens for s in self.segments))

    def image_token_indices(self) -> np.ndarray:
        """Sequence indices of all image tokens, shape ``(n_image_tokens,)``, in image-token order."""
        if "idx" not in self._cache:
            self._cache["idx"] = np.concatenate([s.seq_indices() for s in self.segments])
        return self._cache["idx"]

    def prefix_indices(self, kinds: Iterable[str] = ("cls", "register")) -> np.ndarray:
        kinds = set(kinds)
        return np.array([t.index for t in self.special if t.kind in kinds], dtype=np.int64)

    @property
    def cls_index(self) -> int | None:
        for t in self.special:
            if t.kind == "cls":
                return t.index
        return None

    def segment_offsets(self) -> list[int]:
        """Image-token offset of each segment (cumulative token counts)."""
        offs, acc = [], 0
        for s in self.segments:
            offs.append(acc)
            acc += s.n_tokens
        return offs

    def split(self, values: np.ndarray) -> list[np.ndarray]:
        """Split a per-image-token vector ``(n_image_tokens, ...)`` into per-segment grids
        ``(rows, cols, ...)``."""
        values = np.asarray(values)
        if values.shape[0] != self.n_image_tokens:
            raise ValueError(f"expected {self.n_image_tokens} image-token values, got {values.shape[0]}")
        out = []
        for s, o in zip(self.segments, self.segment_offsets()):
            out.append(values[o : o + s.n_tokens].reshape((s.rows, s.cols) + values.shape[1:]))
        return out

    def gather(self, sequence_values):
        """Pick the image tokens from a per-sequence-token array ``(n_tokens, ...)``.

        Works in the array's own namespace: a device tensor stays on its device."""
        if not hasattr(sequence_values, "shape") or not hasattr(sequence_values, "dtype"):
            sequence_values = np.asarray(sequence_values)
        if sequence_values.shape[0] != self.n_tokens:
            raise ValueError(f"expected {self.n_tokens} sequence values, got {sequence_values.shape[0]}")
        if isinstance(sequence_values, np.ndarray):
            return sequence_values[self.image_token_indices()]
        from .arrays import take

        return take(sequence_values, self.image_token_indices(), axis=0)

    def locate(self, seq_index: int) -> tuple[int, int, int] | None:
        """``(segment_number, row, col)`` of the image token at ``seq_index``, or ``None``."""
        for k, s in enumerate(self.segments):
            rel = seq_index - s.seq_start
            if rel < 0:
                continue
            r, c = divmod(rel, s.stride)
            if r < s.rows and c < s.cols:
                return k, r, c
        return None

    def image_token_number(self, seq_index: int) -> int | None:
        loc = self.locate(seq_index)
        if loc is None:
            return None
        k, r, c = loc
        return self.segment_offsets()[k] + r * self.segments[k].cols + c

    def token_box(self, seq_index: int) -> tuple[str, Box]:
        """Segment name and original-image box of the image token at ``seq_index``."""
        loc = self.locate(seq_index)
        if loc is None:
            raise ValueError(f"sequence index {seq_index} is not an image token")
        k, r, c = loc
        seg = self.segments[k]
        return seg.name, seg.cell_box(r, c)

    def token_at(self, x: float, y: float, segment: int | str = 0) -> int | None:
        """Sequence index of the image token of ``segment`` covering original point ``(x, y)``."""
        seg = self.segment(segment)
        cell = seg.cell_at(x, y)
        if cell is None:
            return None
        return seg.seq_start + cell[0] * seg.stride + cell[1]

    def segment(self, key: int | str) -> GridSegment:
        if isinstance(key, int):
            return self.segments[key]
        for s in self.segments:
            if s.name == key:
                return s
        raise KeyError(f"no segment named {key!r}; segments: {[s.name for s in self.segments]}")

    # -- rasterisation --------------------------------------------------------------------------
    def to_image(
        self,
        values: np.ndarray,
        out_size: tuple[int, int] | None = None,
        mode: str = "nearest",
        combine: Literal["mean", "max", "first"] = "mean",
        segments: Sequence[int | str] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Paint a per-image-token vector onto the original image.

        Parameters
        ----------
        values
            ``(n_image_tokens,)`` values in image-token order.
        out_size
            ``(H, W)`` of the output raster; defaults to the original image size. The raster
            always spans the whole original image.
        mode
            'nearest' (each pixel takes its token's value exactly) or 'bilinear' (between cell
            centres).
        combine
            How overlapping segments (a base view and tiles) combine.
        segments
            Restrict to these segments (names or numbers).
        rows
            ``(r0, r1)``: only rows ``r0..r1-1`` of the ``out_size`` raster (for drawing a large
            raster in bands); the values are those rows of the whole raster.

        Returns
        -------
        np.ndarray
            ``(H, W)`` float32 (``(r1 - r0, W)`` with ``rows``); NaN where no selected segment
            covers a pixel. Large rasters are computed in bands of rows, so the float64
            temporaries stay a few tens of MB whatever the size.
        """
        out_size = tuple(self.original_size) if out_size is None else (int(out_size[0]), int(out_size[1]))
        grids = self.split(np.asarray(values, dtype=np.float64))
        chosen = range(len(self.segments)) if segments is None else [
            self.segments.index(self.segment(k)) for k in segments
        ]
        H, W = out_size
        r0, r1 = (0, H) if rows is None else (max(0, int(rows[0])), min(H, int(rows[1])))
        out = np.full((max(0, r1 - r0), W), np.nan, dtype=np.float32)
        band = max(1, _BAND_PIXELS // max(W, 1))
        for b0 in range(r0, r1, band):
            b1 = min(r1, b0 + band)
            out[b0 - r0:b1 - r0] = self._paint_rows(grids, chosen, out_size, mode, combine, (b0, b1))
        return out

    def _paint_rows(self, grids, chosen, out_size, mode, combine, rows) -> np.ndarray:
        """Rows ``rows = (r0, r1)`` of :meth:`to_image`'s raster."""
        size = (rows[1] - rows[0], out_size[1])
        acc = np.zeros(size, dtype=np.float64)
        cnt = np.zeros(size, dtype=np.float64)
        best = np.full(size, -np.inf)
        for k in chosen:
            v, cov = self.segments[k].sample(grids[k], out_size, mode, rows=rows)
            if combine == "first":
                take = cov & (cnt == 0)
                acc[take] = v[take]
                cnt[take] = 1
            else:
                acc[cov] += v[cov]
                cnt[cov] += 1
                best[cov] = np.maximum(best[cov], v[cov])
        out = np.full(size, np.nan, dtype=np.float32)
        have = cnt > 0
        if combine == "max":
            out[have] = best[have]
        else:
            out[have] = acc[have] / cnt[have]
        return out

    def coverage(self, out_size: tuple[int, int] | None = None) -> np.ndarray:
        """Boolean ``(H, W)``: pixels covered by at least one segment."""
        return ~np.isnan(self.to_image(np.zeros(self.n_image_tokens), out_size))

    def with_offset(self, delta: int, n_tokens: int) -> "TokenLayout":
        """The same layout with every sequence index shifted by ``delta`` inside a longer sequence."""
        return replace(
            self,
            n_tokens=n_tokens,
            segments=tuple(replace(s, seq_start=s.seq_start + delta) for s in self.segments),
            special=tuple(SpecialToken(t.index + delta, t.kind) for t in self.special),
            _cache={},
        )

    def describe(self) -> str:
        parts = [f"{s.name}: {s.rows}x{s.cols}" for s in self.segments]
        return f"{self.n_tokens} tokens, {self.n_image_tokens} image tokens ({', '.join(parts)})"

    def to_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "original_size": list(self.original_size),
            "segments": [s.to_dict() for s in self.segments],
            "special": [[t.index, t.kind] for t in self.special],
            "window_size": self.window_size,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(
            n_tokens=d["n_tokens"],
            original_size=tuple(d["original_size"]),
            segments=tuple(GridSegment.from_dict(s) for s in d["segments"]),
            special=tuple(SpecialToken(int(i), k) for i, k in d.get("special", [])),
            window_size=d.get("window_size"),
            description=d.get("description", ""),
        )

    @classmethod
    def single_grid(
        cls,
        geometry: Geometry,
        rows: int,
        cols: int,
        n_prefix: int = 1,
        prefix_kinds: Sequence[str] | None = None,
        description: str = "",
        name: str = "patches",
    ) -> "TokenLayout":
        """A plain ViT layout: ``n_prefix`` prefix tokens, then one row-major grid over the frame."""
        kinds = list(prefix_kinds) if prefix_kinds is not None else (["cls"] + ["register"] * (n_prefix - 1))[:n_prefix]
        seg = GridSegment(name=name, rows=rows, cols=cols, seq_start=n_prefix, geometry=geometry)
        return cls(
            n_tokens=n_prefix + rows * cols,
            original_size=geometry.original_size,
            segments=(seg,),
            special=tuple(SpecialToken(i, k) for i, k in enumerate(kinds)),
            description=description,
        )
