"""Token layouts of vision-language models, built from what the processor returned for one image.

:func:`vlm_layout` turns the output of a transformers processor (``input_ids`` plus the image
fields) for **one** image into a :class:`~explorer.core.layout.TokenLayout` over the LLM input
sequence: one :class:`~explorer.core.layout.GridSegment` per view of the image, each with the
exact :class:`~explorer.core.layout.Geometry` (resize, crop, pad, tile extraction as axis-aligned
affine steps) from the **original** image ``(H, W)`` to that view's frame, and the remaining
tokens recorded as :class:`~explorer.core.layout.SpecialToken` s. Sizes are never assumed: grid
shapes, tile counts and frames come from the processor's output for this image and the
processor's own settings, and every derived quantity is checked against what the processor
produced (frame sizes against ``pixel_values``, token counts and positions against ``input_ids``).
A mismatch raises :class:`ValueError` naming the count or size that differed.

Image tokens, newlines and the count check
------------------------------------------
In current transformers the processor expands each image placeholder into as many image tokens
(``config.image_token_id``, alias ``image_token_index``) as the model has image features, and
the model scatters its features into exactly those positions, in order. The layout accounts for
every such position: a grid cell of a segment, or a special token of kind ``"cls"`` (a CLS
feature that LLaVA with ``vision_feature_select_strategy="full"`` keeps) or ``"newline"`` (the
``image_newline`` feature of LLaVA-NeXT/OneVision, which also occupies an ``<image>`` position).
``layout.n_image_tokens`` counts grid cells only; grid cells plus those specials must equal the
image-token positions of ``input_ids`` exactly. Other special kinds: ``"image_start"`` /
``"image_end"`` (Qwen ``<|vision_start|>`` / ``<|vision_end|>``), ``"image_boundary"``
(Idefics3/SmolVLM ``<fake_token_around_image>``), ``"tile_tag"`` (``<row_i_col_j>``),
``"global_tag"`` (``<global-img>``) and ``"text"`` for every other token.

Families and the fields read
----------------------------
``llava`` (LLaVA-1.5 and the project's demo VLM, ``LlavaForConditionalGeneration``)
    One segment ``"patches"``: ``(h/p) x (w/p)`` over the processed frame, contiguous, row-major,
    preceded by one ``"cls"`` token when the CLS feature is kept. Geometry: the image processor's
    own steps in order: LLaVA pad-to-square (``LlavaImageProcessor`` with ``do_pad``), resize
    (``do_resize``, ``size``: ``height``/``width``, ``shortest_edge`` [+ ``longest_edge``],
    ``max_height``/``max_width``), center crop (``do_center_crop``, ``crop_size``; torchvision or
    PIL rounding), bottom/right pad (``do_pad`` + ``pad_size`` of other processors). Read:
    ``pixel_values.shape[-2:]`` (must equal the predicted frame), ``processor.patch_size``,
    ``processor.num_additional_image_tokens``, ``processor.vision_feature_select_strategy``;
    config ``vision_config.patch_size``, ``image_token_id``.
``llava_next`` and ``llava_onevision`` (anyres)
    Segment ``"base"``: ``g x g`` (``g = vision_config.image_size // patch_size``) over the whole
    image squashed to ``size`` (``(height, width)`` or ``shortest_edge`` squared), then the
    per-patch ``resize(size)`` / ``center_crop(crop_size)``. Segment ``"tiles"``: the feature map of
    the ``nph x npw`` tiles of the best pinpoint resolution (original resized with aspect ratio
    kept, ``ceil`` rounding, then centred padding to the pinpoint: ``get_patch_output_size`` and
    ``_get_padding_size``), **unpadded** the way the model's ``unpad_image`` does it (in feature
    units, from ``image_sizes``), with ``row_stride = cols + 1``: one ``"newline"`` token ends each
    row. OneVision additionally downscales the unpadded map bilinearly to
    ``(int(h // r), int(w // r))`` when ``r = sqrt(h*w / (N*g^2)) > 1.1`` (``anyres_max_N``, from
    ``config.vision_aspect_ratio``); the downscaled grid covers the same rectangle (a bilinear
    ``align_corners=False`` resize puts output cell ``i`` on ``[i, i+1) * in/out``). Read:
    ``inputs["image_sizes"][0]`` (must equal ``image_size``), ``pixel_values`` shape
    ``(1, P, C, S, S)``, image processor ``image_grid_pinpoints``, ``size``, ``crop_size``,
    ``do_resize``, ``do_center_crop``; processor ``vision_feature_select_strategy`` and
    ``num_additional_image_tokens`` (NeXT) / ``num_image_tokens`` (OneVision); config
    ``image_grid_pinpoints`` (the model's tile grid; must pick the same resolution),
    ``vision_config.image_size``/``patch_size``, ``vision_aspect_ratio``, ``image_token_id``.
``qwen2_vl`` and ``qwen2_5_vl``
    One segment ``"patches"``: ``(gh/m) x (gw/m)`` merged tokens (``m = merge_size``), row-major,
    covering the whole image resized per axis to ``(gh*p, gw*p)`` (``smart_resize``; no crop, no
    pad), between ``<|vision_start|>`` and ``<|vision_end|>``. ``pixel_values`` rows are patches
    pre-permuted so that each ``m x m`` merge group is contiguous, so LLM image token ``k`` is
    merge group ``k`` in row-major order (Qwen2.5-VL's window reordering is undone inside the
    vision tower). Read: ``inputs["image_grid_thw"][0]`` (``t`` must be 1), ``pixel_values`` shape,
    image processor ``patch_size``, ``merge_size``, ``temporal_patch_size``; config
    ``vision_config.spatial_merge_size`` / ``patch_size``, ``image_token_id``,
    ``vision_start_token_id``, ``vision_end_token_id``.
``idefics3`` and ``smolvlm``
    One segment per tile ``"tile r{i}c{j}"`` (row-major) and a last segment ``"global"``, each an
    ``n x n`` grid (``n = sqrt(image_seq_len)``; pixel shuffle by ``scale_factor`` keeps the
    tokens row-major over ``scale_factor x scale_factor`` patch blocks) covering its whole frame.
    Geometry: resize so the longest edge is ``size["longest_edge"]`` (odd short side rounded up
    to even), then (``do_image_splitting``) resize to multiples of ``T = max_image_size
    ["longest_edge"]`` (``resize_for_vision_encoder``: the short side is derived from the
    *rounded-up* long side), tile ``T x T`` crops, and the global view = that image resized to
    ``T x T``. Without splitting the image is resized straight to ``T x T``. Each view's tokens are
    one contiguous run of ``image_seq_len`` image tokens after ``<fake_token_around_image>`` and
    ``<row_i_col_j>`` / ``<global-img>``. The processor drops ``rows``/``cols`` from its output,
    so the tile grid is recomputed from the processor's settings and checked against the number of
    frames in ``pixel_values``, the runs of image tokens, and the ``<row_i_col_j>`` tags when the
    tokenizer has them as single tokens. Read: ``pixel_values`` shape ``(1, F, C, T, T)``,
    ``processor.image_seq_len``, image processor ``do_resize``, ``size``, ``max_image_size``,
    ``do_image_splitting``; config ``vision_config.patch_size``, ``scale_factor``,
    ``image_token_id``.

Transformers facts this relies on (read in the transformers 5.x sources)
------------------------------------------------------------------------
* Idefics3/SmolVLM: the text expansion uses the ``rows``/``cols`` the image processor returned
  (then dropped from the processor output). ``resize_for_vision_encoder`` derives the short side
  from the *rounded-up* long side (``int(ceil(w/T)*T / aspect)``, then rounded up to ``T``),
  while ``image_processor.get_number_of_image_patches`` (used by
  ``_get_num_multimodal_tokens``) rounds the short side directly: with ``size["longest_edge"]``
  not a multiple of ``T`` (e.g. 100 with ``T = 32``, image 60x100) the real split is 3x4 tiles
  but that helper says 2x4. It is not used here. The intermediate resizes compose into one
  per-axis scale (the image is stretched slightly to whole tiles).
* ``select_best_resolution`` is shared by processor and model, but the processor uses the image
  processor's ``image_grid_pinpoints`` and the model its config's; both are read and compared.
  The model cuts tiles of ``vision_config.image_size``, the processor of ``crop_size["height"]``
  (or ``size``); they must agree.
* LLaVA-NeXT/OneVision ``image_newline`` features occupy ``<image>`` positions too (the
  processor counts ``newline_features``); OneVision's ``vision_aspect_ratio`` is parsed with
  ``str.strip("anyres_max_")``.
* LLaVA-NeXT cannot pack a kept CLS feature (``"full"`` strategy with a CLS vision tower): the
  tile reshape fails in the model, so such a configuration is rejected. LLaVA-1.5 can: the CLS
  feature is the first image token.
* Qwen2-VL ``patchify`` orders ``pixel_values`` rows as ``(gh/m, gw/m, m, m)`` row-major, each
  row ``(C, temporal_patch_size, p, p)`` (the single frame repeated); the patch merger merges
  ``m^2`` consecutive rows.
* Idefics3/SmolVLM pixel shuffle keeps the token grid row-major over blocks of
  ``scale_factor x scale_factor`` patches; ``pixel_values`` frames are the tiles row-major
  (``unfold`` over height, then width), then the global view.
* ``SmolVLMProcessor`` needs the ``num2words`` package to be constructed at all (it is used
  for video prompts only).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from explorer.core.layout import Box, Geometry, GridSegment, PreprocessStep, SpecialToken, TokenLayout

__all__ = ["FAMILIES", "family_of", "vlm_layout"]

#: The model families :func:`vlm_layout` understands, by ``config.model_type``.
FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
)


def family_of(model_config: Any) -> str:
    """The layout family of a transformers model config, from ``model_config.model_type``.

    Raises
    ------
    ValueError
        If the model type is not one of :data:`FAMILIES`.
    """
    model_type = getattr(model_config, "model_type", None)
    if model_type in FAMILIES:
        return str(model_type)
    raise ValueError(
        f"no token layout for model type {model_type!r}; supported: {', '.join(FAMILIES)}"
    )


def vlm_layout(
    family: str,
    processor: Any,
    model_config: Any,
    inputs: Mapping[str, Any],
    image_size: tuple[int, int],
) -> TokenLayout:
    """Layout of the LLM input sequence ``inputs["input_ids"][0]`` holding one image.

    Parameters
    ----------
    family
        One of :data:`FAMILIES` (see :func:`family_of`).
    processor
        The transformers processor that produced ``inputs`` (its tokenizer and image processor
        settings are read).
    model_config
        The model's config (``image_token_id``, the vision tower's sizes, packing options).
    inputs
        The processor's output for one text with exactly one image (``input_ids`` of shape
        ``(1, N)`` or ``(N,)``, ``pixel_values`` and the family's image fields), torch tensors,
        numpy arrays or lists.
    image_size
        ``(H, W)`` of the original image given to the processor.

    Notes
    -----
    The image processor's *stored* settings are read; settings passed to the processor call
    (``processor(..., size=...)``) do not show in its output. Frame sizes and token counts are
    still checked against the output, so most such overrides raise ``ValueError``, but a resize
    override hidden behind an unchanged center crop cannot be seen: set sizes on the processor.

    Returns
    -------
    TokenLayout
        ``n_tokens = N``; segments in the order their features enter the sequence.

    Raises
    ------
    ValueError
        When the processor output does not match the layout derived from it (frame sizes, tile
        counts, image-token counts or positions), or the family/configuration is unsupported.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; supported: {', '.join(FAMILIES)}")
    H, W = int(image_size[0]), int(image_size[1])
    if H <= 0 or W <= 0:
        raise ValueError(f"image_size must be a positive (H, W), got {image_size}")
    ids = _input_ids(inputs)
    image_id = _image_token_id(model_config, processor)
    if family == "llava":
        return _llava(processor, model_config, inputs, ids, image_id, (H, W))
    if family in ("llava_next", "llava_onevision"):
        return _anyres(family, processor, model_config, inputs, ids, image_id, (H, W))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen(family, processor, model_config, inputs, ids, image_id, (H, W))
    return _idefics(family, processor, model_config, inputs, ids, image_id, (H, W))


# ----------------------------------------------------------------------------- small helpers


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of a tensor/array or of a (regular) nested list of them."""
    if hasattr(x, "shape"):
        return tuple(int(v) for v in x.shape)
    if isinstance(x, (list, tuple)):
        if not x:
            return (0,)
        return (len(x),) + _shape(x[0])
    return ()


def _field(inputs: Mapping[str, Any], name: str, family: str) -> Any:
    if name not in inputs or inputs[name] is None:
        raise ValueError(f"{family}: the processor output has no {name!r}; pass the image to the processor")
    return inputs[name]


def _input_ids(inputs: Mapping[str, Any]) -> np.ndarray:
    if "input_ids" not in inputs:
        raise ValueError("the processor output has no 'input_ids'")
    ids = _to_numpy(inputs["input_ids"])
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"expected one sequence, got input_ids of shape {ids.shape}")
        ids = ids[0]
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"input_ids must be (1, N) or (N,), got shape {ids.shape}")
    return ids.astype(np.int64)


def _image_token_id(model_config: Any, processor: Any) -> int:
    tid = getattr(model_config, "image_token_id", None)
    if tid is None:
        tid = getattr(model_config, "image_token_index", None)
    if tid is None:
        raise ValueError("the model config has no image_token_id / image_token_index")
    p_tid = getattr(processor, "image_token_id", None)
    if p_tid is not None and int(p_tid) != int(tid):
        raise ValueError(
            f"the processor's image token id {int(p_tid)} differs from the model config's {int(tid)}"
        )
    return int(tid)


def _sz(size: Any, key: str) -> int | None:
    """``size[key]`` for a plain dict or a transformers ``SizeDict``; ``None`` when absent."""
    if size is None:
        return None
    if isinstance(size, Mapping):
        v = size.get(key)
    else:
        v = getattr(size, key, None)
    return None if v is None else int(v)


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    """Id of ``token`` when the tokenizer has it as one token, else ``None``."""
    if tokenizer is None or not token:
        return None
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError, TypeError):
        return None
    if tid is None or isinstance(tid, list):
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and int(tid) == int(unk) and token != getattr(tokenizer, "unk_token", None):
        return None
    return int(tid)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of True in a 1-D boolean array."""
    m = np.concatenate([[False], mask.astype(bool), [False]])
    d = np.diff(m.astype(np.int8))
    starts = np.nonzero(d == 1)[0]
    ends = np.nonzero(d == -1)[0]
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def _single_run(ids: np.ndarray, image_id: int, family: str) -> tuple[int, int]:
    runs = _runs(ids == image_id)
    if not runs:
        raise ValueError(f"{family}: input_ids contain no image token (id {image_id})")
    if len(runs) != 1:
        raise ValueError(
            f"{family}: expected one contiguous run of image tokens (id {image_id}) for one image, "
            f"found {len(runs)} runs of lengths {[n for _, n in runs]}"
        )
    return runs[0]


def _check_count(family: str, ids: np.ndarray, image_id: int, expected: int, parts: str) -> None:
    n = int((ids == image_id).sum())
    if n != expected:
        raise ValueError(
            f"{family}: input_ids hold {n} image tokens (id {image_id}) but the layout derived from "
            f"the processor output accounts for {expected} ({parts})"
        )


def _specials(n: int, grid: np.ndarray, named: Mapping[int, str]) -> tuple[SpecialToken, ...]:
    """Every non-grid position as a special token: its named kind or ``"text"``."""
    is_grid = np.zeros(n, dtype=bool)
    is_grid[grid] = True
    return tuple(SpecialToken(i, named.get(i, "text")) for i in range(n) if not is_grid[i])


def _tile(geo: Geometry, top: int, left: int, height: int, width: int, description: str) -> Geometry:
    """Extract a tile (a crop recorded as a tile step)."""
    h, w = geo.frame_size
    return geo.then(
        PreprocessStep("tile", description, (h, w), (int(height), int(width)), (1.0, 1.0), (-float(top), -float(left)))
    )


def _is_torchvision(image_processor: Any) -> bool:
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # older transformers: the fast processors are the torchvision ones
        return type(image_processor).__name__.endswith("Fast")
    return isinstance(image_processor, TorchvisionBackend)


# ----------------------------------------------------------------------------- standard steps


def _resize_target(frame: tuple[int, int], size: Any) -> tuple[int, int]:
    """Output ``(h, w)`` of the image processors' standard ``resize(size)`` (both backends)."""
    h, w = frame
    short_edge, long_edge = _sz(size, "shortest_edge"), _sz(size, "longest_edge")
    max_h, max_w = _sz(size, "max_height"), _sz(size, "max_width")
    th, tw = _sz(size, "height"), _sz(size, "width")
    if short_edge and long_edge:
        from transformers.image_transforms import get_size_with_aspect_ratio

        return tuple(int(v) for v in get_size_with_aspect_ratio((h, w), short_edge, long_edge))
    if short_edge:
        # torchvision rule, as transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = short_edge, int(short_edge * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    if max_h and max_w:
        scale = min(max_h / h, max_w / w)
        return int(h * scale), int(w * scale)
    if th and tw:
        return th, tw
    raise ValueError(f"unsupported image processor size {size}")


def _center_crop(geo: Geometry, crop_size: Any, torchvision: bool) -> Geometry:
    ch, cw = _sz(crop_size, "height"), _sz(crop_size, "width")
    if not ch or not cw:
        raise ValueError(f"center crop needs crop_size height and width, got {crop_size}")
    h, w = geo.frame_size
    if cw > w or ch > h:
        # the image is padded (zeros) to cover the crop first
        if torchvision:
            left = (cw - w) // 2 if cw > w else 0
            top = (ch - h) // 2 if ch > h else 0
            right = (cw - w + 1) // 2 if cw > w else 0
            bottom = (ch - h + 1) // 2 if ch > h else 0
        else:
            nh, nw = max(ch, h), max(cw, w)
            top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
            bottom, right = nh - h - top, nw - w - left
        geo = geo.pad(top, left, bottom, right, f"center crop: pad to {w + left + right}x{h + top + bottom}")
        h, w = geo.frame_size
        if (h, w) == (ch, cw):
            return geo
    top = (h - ch) // 2
    left = (w - cw) // 2
    return geo.crop(top, left, ch, cw, f"center crop {cw}x{ch} at (x={left}, y={top})")


def _post_steps(geo: Geometry, ip: Any) -> Geometry:
    """The image processors' per-image ``resize(size)`` then ``center_crop(crop_size)``."""
    if getattr(ip, "do_resize", False) and getattr(ip, "size", None) is not None:
        target = _resize_target(geo.frame_size, ip.size)
        if tuple(target) != tuple(geo.frame_size):
            geo = geo.resize(target)
    if getattr(ip, "do_center_crop", False) and getattr(ip, "crop_size", None) is not None:
        geo = _center_crop(geo, ip.crop_size, _is_torchvision(ip))
    return geo


# ----------------------------------------------------------------------------- LLaVA-1.5


def _llava(processor, cfg, inputs, ids, image_id, original) -> TokenLayout:
    family = "llava"
    ip = processor.image_processor
    pv = _shape(_field(inputs, "pixel_values", family))
    if len(pv) < 3:
        raise ValueError(f"{family}: unexpected pixel_values shape {pv}")
    frame = (pv[-2], pv[-1])

    geo = Geometry.identity(original)
    do_pad = bool(getattr(ip, "do_pad", False))
    if do_pad and hasattr(ip, "pad_to_square"):
        h, w = geo.frame_size
        m = max(h, w)
        top, left = (m - h) // 2, (m - w) // 2
        if m != h or m != w:
            geo = geo.pad(top, left, m - h - top, m - w - left, f"pad to square {m}x{m}")
    geo = _post_steps(geo, ip)
    if do_pad and not hasattr(ip, "pad_to_square"):
        ph, pw = _sz(getattr(ip, "pad_size", None), "height"), _sz(getattr(ip, "pad_size", None), "width")
        if ph and pw:
            h, w = geo.frame_size
            geo = geo.pad(0, 0, ph - h, pw - w, f"pad bottom/right to {pw}x{ph}")
    if tuple(geo.frame_size) != tuple(frame):
        raise ValueError(
            f"{family}: the image processor's steps give a {geo.frame_size[1]}x{geo.frame_size[0]} frame, "
            f"but pixel_values are {frame[1]}x{frame[0]}"
        )

    patch = getattr(processor, "patch_size", None) or cfg.vision_config.patch_size
    if int(patch) != int(cfg.vision_config.patch_size):
        raise ValueError(
            f"{family}: processor patch_size {patch} differs from the vision tower's {cfg.vision_config.patch_size}"
        )
    patch = int(patch)
    rows, cols = frame[0] // patch, frame[1] // patch
    strategy = getattr(processor, "vision_feature_select_strategy", None) or getattr(
        cfg, "vision_feature_select_strategy", "default"
    )
    extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0) - (1 if strategy == "default" else 0)
    if extra < 0 or extra > 1:
        raise ValueError(
            f"{family}: num_additional_image_tokens and vision_feature_select_strategy={strategy!r} leave "
            f"{extra} non-patch image tokens; only 0 or 1 (CLS) are meaningful"
        )
    start, _ = _single_run(ids, image_id, family)
    _check_count(family, ids, image_id, rows * cols + extra, f"{rows}x{cols} patches + {extra} CLS")
    seg = GridSegment("patches", rows, cols, seq_start=start + extra, geometry=geo)
    named = {start: "cls"} if extra else {}
    return TokenLayout(
        n_tokens=int(ids.size),
        original_size=original,
        segments=(seg,),
        special=_specials(int(ids.size), seg.seq_indices(), named),
        description=f"LLaVA: {rows}x{cols} patches of {patch}px; " + "; ".join(geo.describe()),
    )


# ----------------------------------------------------------------------------- LLaVA-NeXT / OneVision


def _patch_output_size(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers ``get_patch_output_size``: aspect-preserving fit into ``target`` (ceil)."""
    th, tw = target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def _unpad(h: int, w: int, fh: int, fw: int) -> tuple[int, int, int, int]:
    """Rows ``r0..r1`` and columns ``c0..c1`` of an ``fh x fw`` feature map that the model's
    ``unpad_image`` keeps for an original image of ``h x w``."""
    if w / h > fw / fh:
        new_h = int(round(h * (fw / w), 7))
        pad = (fh - new_h) // 2
        return pad, fh - pad, 0, fw
    new_w = int(round(w * (fh / h), 7))
    pad = (fw - new_w) // 2
    return 0, fh, pad, fw - pad


def _max_patches(aspect: str) -> int:
    # The model and processor use ``int(vision_aspect_ratio.strip("anyres_max_"))``.
    try:
        return int(str(aspect).strip("anyres_max_"))
    except ValueError:
        raise ValueError(
            f"llava_onevision: unsupported vision_aspect_ratio {aspect!r} (expected 'anyres_max_N')"
        ) from None


def _anyres(family, processor, cfg, inputs, ids, image_id, original) -> TokenLayout:
    from transformers.image_processing_utils import select_best_resolution

    ip = processor.image_processor
    H, W = original
    sizes = _to_numpy(_field(inputs, "image_sizes", family)).reshape(-1)
    if sizes.size != 2:
        raise ValueError(f"{family}: expected image_sizes for one image, got {sizes.size // 2}")
    if (int(sizes[0]), int(sizes[1])) != (H, W):
        raise ValueError(f"{family}: the processor saw an image of {tuple(int(v) for v in sizes)}, not {original}")
    pv = _shape(_field(inputs, "pixel_values", family))
    if len(pv) < 4:
        raise ValueError(f"{family}: unexpected pixel_values shape {pv}")
    if len(pv) == 5 and pv[0] != 1:
        raise ValueError(f"{family}: expected pixel_values for one image, got shape {pv}")
    n_views, frame = pv[-4], (pv[-2], pv[-1])

    vis = cfg.vision_config
    vis_size, vis_patch = int(vis.image_size), int(vis.patch_size)
    g = vis_size // vis_patch
    if tuple(frame) != (vis_size, vis_size):
        raise ValueError(
            f"{family}: pixel_values views are {frame[1]}x{frame[0]} but the vision tower takes {vis_size}x{vis_size}"
        )

    proc_pinpoints = [[int(a), int(b)] for a, b in ip.image_grid_pinpoints]
    model_pinpoints = [[int(a), int(b)] for a, b in (getattr(cfg, "image_grid_pinpoints", None) or proc_pinpoints)]
    best = tuple(int(v) for v in select_best_resolution((H, W), proc_pinpoints))
    best_model = tuple(int(v) for v in select_best_resolution((H, W), model_pinpoints))
    if best != best_model:
        raise ValueError(
            f"{family}: the processor tiles the image at {best} but the model's image_grid_pinpoints pick {best_model}"
        )

    size = ip.size
    if _sz(size, "height") and _sz(size, "width"):
        base_size = (_sz(size, "height"), _sz(size, "width"))
    else:
        base_size = (_sz(size, "shortest_edge"),) * 2
    crop = getattr(ip, "crop_size", None)
    tile = _sz(crop, "height") or _sz(size, "height") or _sz(size, "shortest_edge")
    if best[0] % tile or best[1] % tile:
        raise ValueError(f"{family}: best resolution {best} is not a multiple of the tile size {tile}")
    nph, npw = best[0] // vis_size, best[1] // vis_size  # the model's get_anyres_image_grid_shape
    if (best[0] // tile, best[1] // tile) != (nph, npw):
        raise ValueError(
            f"{family}: the processor cuts {best[0] // tile}x{best[1] // tile} tiles of {tile}px, "
            f"the model expects {nph}x{npw} tiles of {vis_size}px"
        )
    if n_views < 1 + nph * npw:
        raise ValueError(
            f"{family}: pixel_values hold {n_views} views, expected 1 base + {nph * npw} tiles"
        )

    # base view: the whole image squashed to ``size``, then the per-view resize/crop
    base_geo = Geometry.identity(original).resize(
        base_size, f"base view: resize {W}x{H} -> {base_size[1]}x{base_size[0]}"
    )
    base_geo = _post_steps(base_geo, ip)
    if tuple(base_geo.frame_size) != tuple(frame):
        raise ValueError(f"{family}: the base view frame {base_geo.frame_size} differs from pixel_values {frame}")
    # tiles must reach the vision tower whole (a pure rescale), else their grids would not tile
    tile_geo = _post_steps(Geometry.identity((tile, tile)), ip)
    if tuple(tile_geo.frame_size) != tuple(frame) or tile_geo.offset != (0.0, 0.0):
        raise ValueError(f"{family}: tiles are cropped or padded after extraction ({tile_geo.describe()}); unsupported")

    # tile canvas: aspect-preserving resize into the best resolution, centred zero padding
    nh, nw = _patch_output_size(H, W, best)
    py, ry = divmod(best[0] - nh, 2)
    px, rx = divmod(best[1] - nw, 2)
    canvas = Geometry.identity(original).resize(
        (nh, nw), f"anyres: resize {W}x{H} -> {nw}x{nh} (fit {best[1]}x{best[0]})"
    )
    if (py, px, py + ry, px + rx) != (0, 0, 0, 0):
        canvas = canvas.pad(py, px, py + ry, px + rx, f"anyres: pad to {best[1]}x{best[0]}")

    fh, fw = nph * g, npw * g
    r0, r1, c0, c1 = _unpad(H, W, fh, fw)
    cell = tile / g  # canvas pixels per feature
    rect = Box(c0 * cell, r0 * cell, c1 * cell, r1 * cell)
    rows, cols = r1 - r0, c1 - c0
    note = f"unpadded features rows {r0}..{r1}, cols {c0}..{c1} of {fh}x{fw}"
    if family == "llava_onevision":
        aspect = getattr(cfg, "vision_aspect_ratio", None) or getattr(processor, "vision_aspect_ratio", "anyres_max_9")
        max_n = _max_patches(aspect)
        ratio = math.sqrt(rows * cols / (max_n * g**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
            note += f", bilinear downscale by {ratio:.3f} to {rows}x{cols} ({aspect})"
        base_tokens = int(getattr(processor, "num_image_tokens", None) or g * g)
    else:
        base_tokens = g * g + int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    strategy = getattr(processor, "vision_feature_select_strategy", None) or getattr(
        cfg, "vision_feature_select_strategy", "default"
    )
    if strategy == "default":
        base_tokens -= 1
    if base_tokens != g * g:
        raise ValueError(
            f"{family}: the processor counts {base_tokens} base-view tokens, the model packs {g}x{g}={g * g} "
            f"(vision_feature_select_strategy={strategy!r}; a kept CLS feature cannot be packed)"
        )

    start, _ = _single_run(ids, image_id, family)
    n_expected = g * g + rows * (cols + 1)
    _check_count(
        family, ids, image_id, n_expected,
        f"base {g}x{g} + tiles {rows}x{cols} + {rows} newlines",
    )
    base = GridSegment("base", g, g, seq_start=start, geometry=base_geo)
    tiles = GridSegment(
        "tiles", rows, cols, seq_start=start + g * g, geometry=canvas, frame_rect=rect, row_stride=cols + 1
    )
    named = {int(i): "newline" for i in tiles.extra_indices()}
    grid = np.concatenate([base.seq_indices(), tiles.seq_indices()])
    title = "LLaVA-OneVision" if family == "llava_onevision" else "LLaVA-NeXT"
    return TokenLayout(
        n_tokens=int(ids.size),
        original_size=original,
        segments=(base, tiles),
        special=_specials(int(ids.size), grid, named),
        description=(
            f"{title}: base {g}x{g} ({'; '.join(base_geo.describe())}); tiles {nph}x{npw} of {tile}px at "
            f"{best[1]}x{best[0]} ({'; '.join(canvas.describe())}), {note}, newline after each row"
        ),
    )


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL


def _qwen(family, processor, cfg, inputs, ids, image_id, original) -> TokenLayout:
    ip = processor.image_processor
    thw = _to_numpy(_field(inputs, "image_grid_thw", family)).reshape(-1, 3)
    if thw.shape[0] != 1:
        raise ValueError(f"{family}: expected image_grid_thw for one image, got {thw.shape[0]}")
    t, gh, gw = (int(v) for v in thw[0])
    if t != 1:
        raise ValueError(f"{family}: image_grid_thw has t={t}; an image has t=1")
    patch, merge = int(ip.patch_size), int(ip.merge_size)
    vis = cfg.vision_config
    if int(getattr(vis, "spatial_merge_size", merge)) != merge:
        raise ValueError(f"{family}: processor merge_size {merge} differs from the model's {vis.spatial_merge_size}")
    if int(getattr(vis, "patch_size", patch)) != patch:
        raise ValueError(f"{family}: processor patch_size {patch} differs from the model's {vis.patch_size}")
    if gh % merge or gw % merge:
        raise ValueError(f"{family}: grid {gh}x{gw} is not a multiple of merge_size {merge}")
    pv = _shape(_field(inputs, "pixel_values", family))
    if not pv or pv[0] != gh * gw:
        raise ValueError(f"{family}: pixel_values hold {pv[0] if pv else 0} patches, image_grid_thw says {gh * gw}")
    frame = (gh * patch, gw * patch)
    geo = Geometry.identity(original)
    if tuple(frame) != tuple(original):
        geo = geo.resize(frame, f"smart_resize {original[1]}x{original[0]} -> {frame[1]}x{frame[0]}")
    rows, cols = gh // merge, gw // merge
    start, _ = _single_run(ids, image_id, family)
    _check_count(family, ids, image_id, rows * cols, f"{rows}x{cols} merged patches from image_grid_thw {[t, gh, gw]}")
    seg = GridSegment("patches", rows, cols, seq_start=start, geometry=geo)
    named: dict[int, str] = {}
    vs, ve = getattr(cfg, "vision_start_token_id", None), getattr(cfg, "vision_end_token_id", None)
    if vs is not None and start > 0 and ids[start - 1] == int(vs):
        named[start - 1] = "image_start"
    end = start + rows * cols
    if ve is not None and end < ids.size and ids[end] == int(ve):
        named[end] = "image_end"
    return TokenLayout(
        n_tokens=int(ids.size),
        original_size=original,
        segments=(seg,),
        special=_specials(int(ids.size), seg.seq_indices(), named),
        description=(
            f"{'Qwen2.5-VL' if family == 'qwen2_5_vl' else 'Qwen2-VL'}: {rows}x{cols} tokens "
            f"({merge}x{merge}-merged {patch}px patches, {merge * patch}px cells); " + "; ".join(geo.describe())
        ),
    )


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM


def _longest_edge_size(h: int, w: int, max_len: int) -> tuple[int, int]:
    """Idefics3 ``get_resize_output_image_size``: long side to ``max_len``, short side even,
    then scaled below the 4096 px cap."""
    aspect = w / h
    if w >= h:
        w = max_len
        h = int(w / aspect)
        if h % 2:
            h += 1
    else:
        h = max_len
        w = int(h * aspect)
        if w % 2:
            w += 1
    h, w = max(h, 1), max(w, 1)
    cap = 4096
    aspect = w / h
    if w >= h and w > cap:
        w = cap
        h = int(w / aspect)
    elif h > w and h > cap:
        h = cap
        w = int(h * aspect)
    return max(h, 1), max(w, 1)


def _vision_encoder_size(h: int, w: int, tile: int) -> tuple[int, int]:
    """Idefics3 ``resize_for_vision_encoder``: both sides up to multiples of ``tile``."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = int(w / aspect)
        h = math.ceil(h / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = int(h * aspect)
        w = math.ceil(w / tile) * tile
    return h, w


def _idefics(family, processor, cfg, inputs, ids, image_id, original) -> TokenLayout:
    ip = processor.image_processor
    H, W = original
    tile = _sz(getattr(ip, "max_image_size", None), "longest_edge")
    if not tile:
        raise ValueError(f"{family}: the image processor has no max_image_size['longest_edge']")
    geo = Geometry.identity(original)
    if getattr(ip, "do_resize", True):
        size = ip.size
        if _sz(size, "longest_edge"):
            target = _longest_edge_size(H, W, _sz(size, "longest_edge"))
        elif _sz(size, "height") and _sz(size, "width"):
            target = (_sz(size, "height"), _sz(size, "width"))
        else:
            raise ValueError(f"{family}: unsupported size {size}")
        if tuple(target) != tuple(geo.frame_size):
            geo = geo.resize(target, f"resize longest edge: {W}x{H} -> {target[1]}x{target[0]}")
    tiles_geo: list[Geometry] = []
    rows = cols = 0
    if getattr(ip, "do_image_splitting", True):
        h1, w1 = geo.frame_size
        h2, w2 = _vision_encoder_size(h1, w1, tile)
        if (h2, w2) != (h1, w1):
            geo = geo.resize((h2, w2), f"resize to tile multiples: {w1}x{h1} -> {w2}x{h2}")
        if h2 > tile or w2 > tile:
            rows, cols = math.ceil(h2 / tile), math.ceil(w2 / tile)
            for r in range(rows):
                for c in range(cols):
                    tiles_geo.append(_tile(geo, r * tile, c * tile, tile, tile, f"tile row {r + 1} col {c + 1}"))
            global_geo = geo.resize((tile, tile), f"global view: resize {w2}x{h2} -> {tile}x{tile}")
        else:
            global_geo = geo
    else:
        global_geo = geo.resize((tile, tile), f"resize to {tile}x{tile}")
    views = tiles_geo + [global_geo]

    pv = _shape(_field(inputs, "pixel_values", family))
    if len(pv) != 5 or pv[0] != 1:
        raise ValueError(f"{family}: expected pixel_values of shape (1, F, C, h, w), got {pv}")
    if pv[1] != len(views):
        raise ValueError(
            f"{family}: pixel_values hold {pv[1]} frames, the processor settings give {rows}x{cols} tiles + 1 global"
        )
    for v in views:
        if tuple(v.frame_size) != (pv[3], pv[4]):
            raise ValueError(f"{family}: a {v.frame_size} view was padded to {(pv[3], pv[4])}; unsupported")

    seq_len = int(getattr(processor, "image_seq_len"))
    n = math.isqrt(seq_len)
    if n * n != seq_len:
        raise ValueError(f"{family}: image_seq_len {seq_len} is not a square token grid")
    vis = cfg.vision_config
    vp, sf = int(vis.patch_size), int(getattr(cfg, "scale_factor", 1) or 1)
    if tile % vp or (tile // vp) % sf or (tile // vp) // sf != n:
        raise ValueError(
            f"{family}: {tile}px views with {vp}px patches and pixel shuffle {sf} give "
            f"{(tile // vp) // max(sf, 1)}^2 tokens per view, the processor expands image_seq_len={seq_len}"
        )

    runs = _runs(ids == image_id)
    if [r[1] for r in runs] != [seq_len] * len(views):
        raise ValueError(
            f"{family}: input_ids hold image-token runs of lengths {[r[1] for r in runs]}, expected "
            f"{len(views)} runs of {seq_len} ({rows}x{cols} tiles + global)"
        )
    _check_count(family, ids, image_id, seq_len * len(views), f"{len(views)} views x {seq_len} tokens")

    tok = getattr(processor, "tokenizer", None)
    fake = _token_id(tok, getattr(processor, "fake_image_token", "<fake_token_around_image>"))
    glob = _token_id(
        tok, getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", "<global-img>")
    )
    named: dict[int, str] = {}
    if fake is not None:
        named.update({int(i): "image_boundary" for i in np.nonzero(ids == fake)[0]})
    segments = []
    for k, ((start, _), vgeo) in enumerate(zip(runs, views)):
        if k < len(tiles_geo):
            r, c = divmod(k, cols)
            name = f"tile r{r}c{c}"
            tag = _token_id(tok, f"<row_{r + 1}_col_{c + 1}>")
            kind = "tile_tag"
        else:
            name, tag, kind = "global", glob, "global_tag"
        if tag is not None:
            if start == 0 or ids[start - 1] != tag:
                raise ValueError(f"{family}: the image tokens of view {name!r} are not preceded by their tag token")
            named[start - 1] = kind
        segments.append(GridSegment(name, n, n, seq_start=start, geometry=vgeo))
    grid = np.concatenate([s.seq_indices() for s in segments])
    title = "SmolVLM" if family == "smolvlm" else "Idefics3"
    return TokenLayout(
        n_tokens=int(ids.size),
        original_size=original,
        segments=tuple(segments),
        special=_specials(int(ids.size), grid, named),
        description=(
            f"{title}: {rows}x{cols} tiles of {tile}px + global view, {n}x{n} tokens each "
            f"(pixel shuffle {sf}); " + "; ".join(global_geo.describe())
        ),
    )
