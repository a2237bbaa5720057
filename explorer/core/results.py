"""Typed results that methods return and the canvas draws through a :class:`TokenLayout`.

Results are plain data (numpy arrays and strings): they can be saved (:func:`save_result`),
compared and exported. Per-image-token arrays are in image-token order (see
:mod:`explorer.core.layout`); pixel arrays are ``(H, W)`` on the original image.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np

from .arrays import to_host
from .atomic import atomic_write
from .layout import Box, TokenLayout

__all__ = [
    "Heatmap",
    "TokenSelection",
    "RegionMask",
    "LabelMap",
    "Caption",
    "Series",
    "Curve",
    "Metrics",
    "Reconstruction",
    "TokenScores",
    "CodebookUsage",
    "Result",
    "save_result",
    "load_result",
    "jsonable",
]


def _f32(a) -> np.ndarray:
    """float32 numpy copy of a result array (device tensors come to the host here: results are
    small and drawn, so they are plain numpy data)."""
    return np.ascontiguousarray(to_host(a, np.float32))


def _host(a, dtype) -> np.ndarray:
    return np.asarray(to_host(a), dtype=dtype)


@dataclass(frozen=True)
class Heatmap:
    """A map over the image: per image token (``token_values``) or per pixel (``pixel_values``).

    Parameters
    ----------
    layout
        Layout of the tokens the values belong to.
    token_values
        ``(n_image_tokens,)`` float32 in image-token order, or ``None``.
    pixel_values
        ``(H, W)`` float32 on the original image (NaN = no value), or ``None``.
    signed
        True when negative values are meaningful (draw with a diverging colormap).
    label
        Short description for legends ("rollout, layers 0-11").
    """

    layout: TokenLayout
    token_values: np.ndarray | None = None
    pixel_values: np.ndarray | None = None
    signed: bool = False
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.token_values is None and self.pixel_values is None:
            raise ValueError("a heatmap needs token_values or pixel_values")
        if self.token_values is not None:
            tv = _f32(self.token_values).reshape(-1)
            if tv.shape[0] != self.layout.n_image_tokens:
                raise ValueError(
                    f"heatmap has {tv.shape[0]} token values, the layout has {self.layout.n_image_tokens} image tokens"
                )
            object.__setattr__(self, "token_values", tv)
        if self.pixel_values is not None:
            pv = _f32(self.pixel_values)
            if pv.shape != tuple(self.layout.original_size):
                raise ValueError(f"pixel heatmap is {pv.shape}, the image is {self.layout.original_size}")
            object.__setattr__(self, "pixel_values", pv)

    @property
    def value_range(self) -> tuple[float, float]:
        """``(min, max)`` over finite values; symmetric around 0 for signed maps."""
        v = self.token_values if self.token_values is not None else self.pixel_values
        v = v[np.isfinite(v)]
        if v.size == 0:
            return (0.0, 1.0)
        lo, hi = float(v.min()), float(v.max())
        if self.signed:
            m = max(abs(lo), abs(hi)) or 1.0
            return (-m, m)
        if hi <= lo:
            hi = lo + 1.0
        return (lo, hi)

    def to_image(self, out_size: tuple[int, int] | None = None, mode: str = "bilinear",
                 rows: tuple[int, int] | None = None) -> np.ndarray:
        """``(H, W)`` float32 raster over the original image (NaN outside the covered area).

        ``rows = (r0, r1)`` returns only those rows of the raster (``(r1 - r0, W)``), to draw a
        large image in bands without the whole raster in memory.
        """
        if self.pixel_values is not None and (out_size is None or tuple(out_size) == self.pixel_values.shape):
            return self.pixel_values if rows is None else self.pixel_values[rows[0]:rows[1]]
        if self.pixel_values is not None:
            from .render import resize_nearest

            return resize_nearest(self.pixel_values, out_size, rows=rows)
        return self.layout.to_image(self.token_values, out_size, mode=mode, rows=rows)

    def grids(self) -> list[np.ndarray]:
        """Per-segment ``(rows, cols)`` grids of the token values."""
        if self.token_values is None:
            raise ValueError("this heatmap has pixel values only")
        return self.layout.split(self.token_values)


@dataclass(frozen=True)
class TokenSelection:
    """Which image tokens a pruning or merging method keeps.

    ``kept`` is ``(n_image_tokens,)`` bool; ``scores`` optional ``(n_image_tokens,)`` importance;
    ``order`` the kept tokens' image-token numbers in the method's own order; ``groups`` (merging)
    the group id of every original token, ``-1`` for dropped; ``layer`` the block where the
    reduction happens.
    """

    layout: TokenLayout
    kept: np.ndarray
    scores: np.ndarray | None = None
    order: np.ndarray | None = None
    groups: np.ndarray | None = None
    label: str = ""
    layer: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kept = _host(self.kept, bool).reshape(-1)
        if kept.shape[0] != self.layout.n_image_tokens:
            raise ValueError(f"selection has {kept.shape[0]} flags, layout has {self.layout.n_image_tokens} image tokens")
        object.__setattr__(self, "kept", kept)
        if self.scores is not None:
            object.__setattr__(self, "scores", _f32(self.scores).reshape(-1))
        if self.groups is not None:
            object.__setattr__(self, "groups", _host(self.groups, np.int64).reshape(-1))
        if self.order is not None:
            object.__setattr__(self, "order", _host(self.order, np.int64).reshape(-1))

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())


@dataclass(frozen=True)
class RegionMask:
    """A region of the original image: ``mask (H, W)`` bool, its box and a score."""

    mask: np.ndarray
    box: Box | None = None
    score: float | None = None
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = np.asarray(self.mask, dtype=bool)
        if m.ndim != 2:
            raise ValueError(f"region mask must be (H, W), got {m.shape}")
        object.__setattr__(self, "mask", m)
        if self.box is None and m.any():
            rows = np.nonzero(m.any(1))[0]
            cols = np.nonzero(m.any(0))[0]
            object.__setattr__(self, "box", Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)))


@dataclass(frozen=True)
class LabelMap:
    """Open-vocabulary segmentation: a class per image token (or pixel) with its scores.

    ``labels`` ``(n_image_tokens,)`` int (or ``(H, W)`` when ``per_pixel``), ``-1`` = background /
    below threshold; ``scores`` ``(K, n)`` class probabilities; ``class_names`` length K.
    """

    layout: TokenLayout
    labels: np.ndarray
    class_names: tuple[str, ...]
    scores: np.ndarray | None = None
    per_pixel: bool = False
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _host(self.labels, np.int64))
        if self.scores is not None:
            object.__setattr__(self, "scores", _f32(self.scores))


@dataclass(frozen=True)
class Caption:
    """Generated text with its tokens and optional per-token heatmaps (keyed by token position)."""

    text: str
    tokens: tuple[str, ...] = ()
    token_heatmaps: Mapping[int, Heatmap] = field(default_factory=dict)
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Series:
    name: str
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Curve:
    """Named x/y series for plots (deletion curves, sweeps)."""

    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metrics:
    """Named numbers (embedding cosine, AUC, seconds...)."""

    values: Mapping[str, float]
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reconstruction:
    """An image a tokenizer decoded from some of its tokens.

    ``rgb`` ``(S, S, 3)`` float32 in [0, 1] is in the model's frame (the crop it encoded);
    ``error`` is a :class:`Heatmap` of the per-pixel error against the encoded input (mean absolute
    difference over the channels) drawn through a one-cell-per-pixel layout of that frame; ``ids``
    are the token ids decoded (``-1`` where a token stood aside), ``k`` how many were used, ``psnr``
    the reconstruction's PSNR in dB against the input.
    """

    rgb: np.ndarray
    error: Heatmap
    ids: np.ndarray
    k: int
    psnr: float
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rgb", _f32(self.rgb))
        object.__setattr__(self, "ids", _host(self.ids, np.int64))

    @property
    def layout(self) -> TokenLayout:
        return self.error.layout


@dataclass(frozen=True)
class TokenScores:
    """A score per token of a tokenizer (``scores (N,)``, in the tokens' order), e.g. how much of
    each token's influence lands inside a region; ``order`` ranks them, best first."""

    layout: TokenLayout
    scores: np.ndarray
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", _f32(self.scores))

    @property
    def order(self) -> np.ndarray:
        s = np.where(np.isfinite(self.scores), self.scores, -np.inf)
        return np.argsort(-s, kind="stable")


@dataclass(frozen=True)
class CodebookUsage:
    """How a tokenizer uses its codebook over a folder of images.

    ``counts (K,)`` int64: how many tokens of the folder's images got each code; ``regions`` ``(K,
    R, R)`` float32 or None: for each code, the mean over the tokens that got it of their influence
    maps, each normalised to sum 1 and resampled to ``R x R`` over the model's frame (row 0 at the
    top; NaN for a code never used); ``images`` how many images were encoded, ``skipped`` the files
    that could not be read (with why). ``map`` is what the canvas draws: the mean region of the code
    the picked token of the current image got, through the current frame, relative to an even
    spread (1: the influence lands evenly over the frame; a :class:`Heatmap`);
    ``ids`` the current image's ids.
    """

    counts: np.ndarray
    map: Heatmap
    ids: np.ndarray
    images: int
    regions: np.ndarray | None = None
    skipped: tuple[str, ...] = ()
    label: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", _host(self.counts, np.int64))
        object.__setattr__(self, "ids", _host(self.ids, np.int64))
        if self.regions is not None:
            object.__setattr__(self, "regions", _f32(self.regions))
        object.__setattr__(self, "skipped", tuple(self.skipped))

    @property
    def layout(self) -> TokenLayout:
        return self.map.layout

    @property
    def dead(self) -> np.ndarray:
        """Indices of the codes no token used."""
        return np.flatnonzero(self.counts == 0)

    @property
    def perplexity(self) -> float:
        """``exp`` of the entropy of the code distribution: the number of equally used codes it is
        worth (K when every code is used equally, 1 when one code takes every token)."""
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0] / total
        return float(np.exp(-(p * np.log(p)).sum()))


Result = (Heatmap | TokenSelection | RegionMask | LabelMap | Caption | Curve | Metrics | Reconstruction
          | TokenScores | CodebookUsage)


def jsonable(v: Any, strict: bool = False) -> Any:
    """``v`` as plain JSON values (arrays -> lists, numpy scalars -> Python, boxes, layouts and
    dataclasses -> their fields). ``strict``: non-finite floats become ``None`` (valid JSON)."""
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist(), strict) if strict else v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return jsonable(v.item(), strict)
    if isinstance(v, float):
        return None if strict and not np.isfinite(v) else v
    if isinstance(v, Box):
        return list(v.as_tuple())
    if isinstance(v, TokenLayout):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {str(k): jsonable(x, strict) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x, strict) for x in v]
    if is_dataclass(v) and not isinstance(v, type):
        return {k: jsonable(x, strict) for k, x in asdict(v).items()}
    return v


def save_result(result: Result, path: str | Path | BinaryIO, extra_meta: Mapping[str, Any] | None = None) -> Path | BinaryIO:
    """Save a result as ``.npz``: its arrays, plus a JSON ``meta`` entry (type, layout, labels).

    For heatmaps, ``pixels`` holds the map rasterised on the original image as well. A file is
    written atomically (:func:`~explorer.core.atomic.atomic_write`): a failure raises
    :class:`~explorer.core.atomic.OutputError` (one line) and leaves an earlier file untouched.
    ``path`` may also be an open binary file (``io.BytesIO``), written as it is.
    """
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"type": type(result).__name__}
    for name in result.__dataclass_fields__:
        value = getattr(result, name)
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif isinstance(value, TokenLayout):
            meta[name] = value.to_dict()
        elif name == "series":
            for i, s in enumerate(value):
                arrays[f"series{i}_x"] = np.asarray(s.x)
                arrays[f"series{i}_y"] = np.asarray(s.y)
                meta.setdefault("series_names", []).append(s.name)
        elif isinstance(value, Heatmap):  # a Reconstruction's error map
            arrays[f"{name}_values"] = value.token_values
            meta[f"{name}_layout"] = value.layout.to_dict()
            meta[f"{name}_label"] = value.label
        elif name == "token_heatmaps":
            for pos, hm in value.items():
                arrays[f"token{pos}_values"] = hm.token_values if hm.token_values is not None else hm.pixel_values
        else:
            meta[name] = jsonable(value)
    if isinstance(result, Heatmap):
        arrays["pixels"] = result.to_image()
    if extra_meta:
        meta.update(jsonable(dict(extra_meta)))
    arrays["meta"] = np.array(json.dumps(meta))
    if hasattr(path, "write"):
        np.savez_compressed(path, **arrays)
        return path
    with atomic_write(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return Path(path)


def load_result(path: str | Path) -> Result:
    """Read back a :class:`Heatmap`, :class:`LabelMap`, :class:`TokenSelection`,
    :class:`Reconstruction`, :class:`TokenScores` or :class:`CodebookUsage` written by :func:`save_result` (``ValueError``
    for another type or a damaged file)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{Path(path).name}: not a saved result ({exc})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
        kind = meta["type"]
        layout = TokenLayout.from_dict(meta["layout"]) if "layout" in meta else None
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{Path(path).name}: its metadata is damaged ({exc})") from None
    common = {"label": meta.get("label", ""), "meta": meta.get("meta", {})}
    if kind == "Heatmap":
        return Heatmap(layout=layout, token_values=arrays.get("token_values"), pixel_values=arrays.get("pixel_values"),
                       signed=bool(meta.get("signed", False)), **common)
    if kind == "LabelMap":
        return LabelMap(layout=layout, labels=arrays["labels"], class_names=tuple(meta.get("class_names", ())),
                        scores=arrays.get("scores"), per_pixel=bool(meta.get("per_pixel", False)), **common)
    if kind == "TokenSelection":
        return TokenSelection(layout=layout, kept=arrays["kept"], scores=arrays.get("scores"), order=arrays.get("order"),
                              groups=arrays.get("groups"), layer=meta.get("layer"), **common)
    if kind == "TokenScores":
        return TokenScores(layout=layout, scores=arrays["scores"], **common)
    if kind == "Reconstruction":
        error = Heatmap(layout=TokenLayout.from_dict(meta["error_layout"]), token_values=arrays["error_values"],
                        label=meta.get("error_label", ""))
        return Reconstruction(rgb=arrays["rgb"], error=error, ids=arrays["ids"], k=int(meta["k"]),
                              psnr=float(meta["psnr"]), **common)
    if kind == "CodebookUsage":
        hm = Heatmap(layout=TokenLayout.from_dict(meta["map_layout"]), token_values=arrays["map_values"],
                     label=meta.get("map_label", ""))
        return CodebookUsage(counts=arrays["counts"], map=hm, ids=arrays["ids"], images=int(meta["images"]),
                             regions=arrays.get("regions"), skipped=tuple(meta.get("skipped", ())), **common)
    raise ValueError(f"{Path(path).name}: a {kind} cannot be read back")


def heatmap_from_grid(layout: TokenLayout, grids: Sequence[np.ndarray], **kw) -> Heatmap:
    """Build a heatmap from per-segment grids (inverse of :meth:`TokenLayout.split`)."""
    flat = np.concatenate([np.asarray(g, dtype=np.float32).reshape(-1) for g in grids])
    return Heatmap(layout=layout, token_values=flat, **kw)
