"""HiRED: High-Resolution Early Dropping (Arif et al., arXiv 2408.10945).

Official code (``hasanar1f/HiRED``): ``HiRED_token_selection`` and ``HiRED_sub_img_budgets`` in
``transformers/.../llava_next/modeling_llava_next.py`` (the single-partition variant in
``.../llava/modeling_llava.py``); defaults from ``accuracy_benchmarks/*.sh``:
``token_budget_rate = 0.2``, ``alpha = 0.5``, ViT layers 0 (top) and 22 (bottom).

Inputs: the vision tower's **[CLS] attention** over the patches of every view, summed over the
heads, at the *top* layer (budget distribution) and the *bottom* layer (selection), from
``backend.vision_cls_attention`` (:meth:`VlmHired.extras`). Text-agnostic; the decision is taken
at the LLM input (``layer = 0``). ``n_v`` = patches per view (576 for CLIP-L/336).

* **One partition** (LLaVA-1.5): keep the top ``min(n_v, int(n_v·rate))`` patches by the bottom
  attention.
* **P = 1 + tiles partitions** (LLaVA-NeXT anyres):

  1. ``total = int(P·n_v·rate)``; ``full = min(int(total·α), n_v)``;
     ``sub = min(total − full, (P−1)·n_v)``;
  2. the base view keeps its top ``full`` patches by the bottom attention;
  3. budget distribution: mark the top ``int(n_v·(1−α))`` base patches by the *top*-layer
     attention and count the marks per sub-image; ``budget_j = int(count_j / Σcount · sub)``,
     clamped to ``n_v``, computed as the official ``HiRED_sub_img_budgets`` does: the ratio and
     the product in **float32** (torch's default dtype for an integer division), truncated by
     ``.int()`` (:func:`hired_sub_budgets`; ``budget_dtype = "float64"`` keeps this project's
     earlier float64 floor, which differs by one token in some tiles); ``distribution = "row_bands"`` is the official code, whose reshape of the
     flat ``n_v`` marks to ``[nh, nw, −1]`` gives sub-image ``j`` the ``j``-th contiguous raster
     chunk of the base grid (row bands, not quadrants; chunks by ``np.array_split`` when ``n_v`` is
     not divisible); ``"2d"`` counts the marks whose base-patch centre falls inside tile ``j`` of
     the anyres canvas (the faithful 2-D version);
  4. tile ``j`` keeps its top ``budget_j`` patches by its own bottom attention.

Mapping to the layout: partition 0 is the ``base`` segment; tile ``j`` (raster order of the
``nh × nw`` tile grid, as the model orders the views) covers rows ``ti·g..`` and columns ``tj·g..``
of the tile feature map, of which the ``tiles`` segment holds the unpadded window. Tile patches
that the unpadding removed are not in the layout: ``padding = "lost"`` (official: the tile's
top-``budget_j`` is taken over all its ``n_v`` patches and the picks in the padding are lost,
as ``pack_HiRED_image_features`` unpads the mask) or ``"skip"`` (the top-``budget_j`` among the
tile's patches that are in the layout). The anyres newline tokens are always kept (the official
packing drops them: ``image_newline=None``). Survivors keep their original position ids (the
official code packs them into a contiguous sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.generation import PruneDecision, PruneState
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.vlm import VlmPruningMethod, VlmPruningParams
from explorer.plugin_host.protocols import VlmModel

__all__ = ["VlmHired", "Partitions", "hired_partitions", "hired_select", "hired_sub_budgets", "feature_attention_layer"]


def feature_attention_layer(vision_feature_layer) -> int:
    """The vision layer (index into the encoder layers, possibly negative) whose output the VLM
    uses as features: ``hidden_states[f]`` is the output of ``layers[f]`` for ``f < 0`` and of
    ``layers[f − 1]`` for ``f > 0`` (LLaVA's ``-2`` → layer 22 of 24, HiRED's bottom layer)."""
    f = vision_feature_layer
    if isinstance(f, (list, tuple)):
        f = f[-1]
    f = int(f)
    if f == 0:
        raise ParamError("the model uses the patch embeddings as features: there is no attention layer")
    return f if f < 0 else f - 1


@dataclass
class Partitions:
    """Where the patches of each view sit in the layout.

    ``numbers (P, n_v)``: image-token number of patch ``p`` of view ``j`` (``−1``: unpadded away);
    ``base_tile (n_v,)``: for every base patch, the tile (``0..P−2``) its centre falls in on the
    anyres canvas (empty for one partition); ``grid``: ``(nh, nw)`` tiles.
    """

    numbers: np.ndarray
    base_tile: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    grid: tuple[int, int] = (0, 0)


def hired_partitions(layout, views: int, n_v: int) -> Partitions:
    """Map the ``views`` vision-tower views of ``n_v`` patches onto ``layout``'s image tokens."""
    g = math.isqrt(n_v)
    if g * g != n_v:
        raise ValueError(f"{n_v} patches per view is not a square grid")
    if views == 1:
        if len(layout.segments) != 1 or layout.segments[0].n_tokens != n_v:
            raise ParamError("HiRED: the image tokens are not the vision tower's patches one to one")
        return Partitions(numbers=np.arange(n_v, dtype=np.int64)[None])
    names = [s.name for s in layout.segments]
    if names != ["base", "tiles"] or layout.segments[0].n_tokens != n_v:
        raise ParamError(f"HiRED: expected a LLaVA-NeXT base view and tile grid, got segments {names}")
    base, tiles = layout.segments
    hc, wc = tiles.geometry.frame_size
    nh = int(round(math.sqrt((views - 1) * hc / wc)))
    nw = (views - 1) // max(nh, 1)
    if nh < 1 or nh * nw != views - 1 or abs(hc / nh - wc / nw) > 1e-6:
        raise ParamError(f"HiRED: {views - 1} tiles do not fit the {wc}x{hc} anyres canvas")
    cell = hc / (nh * g)
    rect = tiles.rect
    r0, c0 = int(round(rect.y0 / cell)), int(round(rect.x0 / cell))
    numbers = np.full((views, n_v), -1, dtype=np.int64)
    numbers[0] = np.arange(n_v)
    a, b = np.divmod(np.arange(n_v), g)
    for j in range(1, views):
        ti, tj = divmod(j - 1, nw)
        r, c = ti * g + a - r0, tj * g + b - c0
        inside = (r >= 0) & (r < tiles.rows) & (c >= 0) & (c < tiles.cols)
        numbers[j, inside] = n_v + r[inside] * tiles.cols + c[inside]
    # the tile of the anyres canvas under the centre of every base patch
    boxes = [base.cell_box(int(r), int(c)) for r, c in zip(a, b)]
    cx = np.array([(bx.x0 + bx.x1) / 2 for bx in boxes])
    cy = np.array([(bx.y0 + bx.y1) / 2 for bx in boxes])
    fx, fy = tiles.geometry.to_frame(cx, cy)
    ti = np.clip(np.floor(fy / (hc / nh)).astype(np.int64), 0, nh - 1)
    tj = np.clip(np.floor(fx / (wc / nw)).astype(np.int64), 0, nw - 1)
    return Partitions(numbers=numbers, base_tile=ti * nw + tj, grid=(nh, nw))


def _top(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` largest scores (ties: lower index), among ``allowed`` when given."""
    idx = np.arange(len(scores)) if allowed is None else np.nonzero(allowed)[0]
    order = idx[np.argsort(-np.asarray(scores, dtype=np.float64)[idx], kind="stable")]
    return order[:max(0, int(k))]


def hired_sub_budgets(marks: np.ndarray, sub: int, n_v: int,
                      dtype: Literal["float32", "float64"] = "float32") -> np.ndarray:
    """Per-tile budgets from the per-tile mark counts, as the official ``HiRED_sub_img_budgets``:
    ``clamp((marks / marks.sum() * sub).int(), max=n_v)``. The counts are an integer tensor, so
    the division and the product are float32 (each rounded to float32) and ``.int()`` truncates;
    ``dtype = "float64"`` computes them in float64 instead (not the official code)."""
    marks = np.asarray(marks, dtype=np.int64)
    total = marks.sum()
    if total <= 0:
        return np.zeros(len(marks), dtype=np.int64)
    ft = np.float32 if dtype == "float32" else np.float64
    ratio = marks.astype(ft) / ft(total)  # one rounding to ft
    budgets = np.trunc(ratio * ft(sub)).astype(np.int64)  # one rounding to ft, then .int()
    return np.minimum(budgets, n_v)


def hired_select(top: np.ndarray, bottom: np.ndarray, parts: Partitions, rate: float, alpha: float,
                 distribution: Literal["row_bands", "2d"] = "row_bands",
                 padding: Literal["lost", "skip"] = "lost",
                 budget_dtype: Literal["float32", "float64"] = "float32") -> tuple[np.ndarray, dict]:
    """The HiRED selection.

    Parameters
    ----------
    top, bottom : (P, n_v) head-summed [CLS] attention of every view at the top / bottom layer.
    parts : the views' places in the layout (:func:`hired_partitions`).
    budget_dtype : float32 (official, :func:`hired_sub_budgets`) or float64 for the tile budgets.

    Returns
    -------
    numbers : sorted image-token numbers kept.
    info : ``total``, ``full_budget``, ``sub_budget``, ``marks`` (per tile), ``budgets`` (per
        tile), ``picked`` (per partition: patch indices selected before the padding is removed).
    """
    P, n_v = bottom.shape
    if P == 1:
        k = min(n_v, int(n_v * rate))
        pick = _top(bottom[0], k)
        info = {"total": k, "full_budget": k, "sub_budget": 0, "marks": np.zeros(0, np.int64),
                "budgets": np.zeros(0, np.int64), "picked": [pick]}
        return np.sort(parts.numbers[0, pick]), info
    total = int(P * n_v * rate)
    full = min(int(total * alpha), n_v)
    sub = min(total - full, (P - 1) * n_v)
    picked = [_top(bottom[0], full)]
    marks = np.zeros(P - 1, dtype=np.int64)
    budgets = np.zeros(P - 1, dtype=np.int64)
    if sub > 0:
        marked = np.zeros(n_v, dtype=bool)
        marked[_top(top[0], int(n_v * (1 - alpha)))] = True
        if distribution == "row_bands":
            marks = np.array([m.sum() for m in np.array_split(marked, P - 1)], dtype=np.int64)
        else:
            marks = np.bincount(parts.base_tile[marked], minlength=P - 1).astype(np.int64)
        budgets = hired_sub_budgets(marks, sub, n_v, budget_dtype)
    for j in range(1, P):
        allowed = None if padding == "lost" else parts.numbers[j] >= 0
        picked.append(_top(bottom[j], budgets[j - 1], allowed))
    numbers = np.concatenate([parts.numbers[j, p] for j, p in enumerate(picked)])
    info = {"total": total, "full_budget": full, "sub_budget": sub, "marks": marks, "budgets": budgets,
            "picked": picked}
    return np.sort(numbers[numbers >= 0]), info


class VlmHiredParams(VlmPruningParams):
    keep: float = Field(0.2, gt=0.0, le=1.0, description="token_budget_rate: the budget is int(P·n_v·rate) "
                        "patches over the P views (one view: int(n_v·rate)).")
    layer: int = Field(0, ge=0, description="LLM layer before which the tokens are dropped (0 = the LLM input; "
                       "HiRED drops them before the LLM).")
    seed: int = Field(0, ge=0, description="Unused (HiRED is deterministic); kept for the common form.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Share of the budget for the full (base) image; "
                         "int(n_v·(1−alpha)) base patches are marked to distribute the rest over the tiles.")
    top_layer: int = Field(0, description="Vision layer of the [CLS] attention that distributes the budget over "
                           "the tiles (the official 0; negative counts from the end).")
    bottom_layer: int | None = Field(None, description="Vision layer of the [CLS] attention that selects the "
                                     "patches; none = the layer whose output the model uses as features "
                                     "(vision_feature_layer −2 → layer 22 of CLIP-L, the official choice).")
    distribution: Literal["row_bands", "2d"] = Field("row_bands", description="row_bands: the official reshape "
                                                     "(tile j gets the j-th contiguous raster chunk of the base "
                                                     "marks); 2d: the marks inside each tile's rectangle.")
    padding: Literal["lost", "skip"] = Field("lost", description="Tile patches removed by LLaVA-NeXT's unpadding: "
                                             "lost = picked over the whole tile, picks in the padding are lost "
                                             "(official); skip = picked among the patches the model keeps.")
    budget_dtype: Literal["float32", "float64"] = Field("float32", description="Precision of the per-tile budgets "
                                                        "int(count_j/Σcount·sub): float32 truncation as the official "
                                                        "code (default), or float64 (may differ by one token per tile).")


class VlmHired(VlmPruningMethod):
    """HiRED (see module docstring)."""

    Params = VlmHiredParams

    def extras(self, backend: VlmModel, prepared, params) -> dict:
        bottom = params.bottom_layer
        if bottom is None:
            bottom = feature_attention_layer(backend.vision_feature_layer())
        try:
            attn = backend.vision_cls_attention(prepared, [params.top_layer, bottom])
        except ValueError as exc:
            raise ParamError(f"HiRED needs a vision tower with a [CLS] token: {exc}") from None
        top_a, bottom_a = attn[params.top_layer].sum(axis=1), attn[bottom].sum(axis=1)  # (views, n_v)
        parts = hired_partitions(prepared.layout, bottom_a.shape[0], bottom_a.shape[1])
        return {"hired_top": top_a, "hired_bottom": bottom_a, "hired_partitions": parts}

    def decide(self, state: PruneState, params) -> PruneDecision:
        top, bottom, parts = state.extras["hired_top"], state.extras["hired_bottom"], state.extras["hired_partitions"]
        numbers, _ = hired_select(top, bottom, parts, params.keep, params.alpha, params.distribution, params.padding,
                                  params.budget_dtype)
        n_total = state.layout.n_image_tokens
        where = np.full(n_total, -1, dtype=np.int64)
        where[state.original] = np.arange(len(state.original))
        keep = where[numbers]
        if (keep < 0).any():
            raise ValueError("HiRED kept an image token that is no longer in the sequence")
        by_number = np.zeros(n_total, dtype=np.float64)
        ok = parts.numbers >= 0
        by_number[parts.numbers[ok]] = bottom[ok]
        if keep.size == 0:  # a budget that rounds to nothing still keeps the strongest base patch
            keep = where[parts.numbers[0, _top(bottom[0], 1)]]
        return PruneDecision(keep=np.sort(keep), scores=by_number[state.original])
