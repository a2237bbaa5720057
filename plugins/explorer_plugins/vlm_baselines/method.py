"""Random and spatial-pooling baselines inside a VLM's language model.

* :class:`VlmRandom` (``vlm.random``): a seeded, uniformly random subset of ``k = round(keep·n)``
  image tokens is kept before LLM layer ``layer`` (FastV's ``K = 0`` baseline draws a shuffled
  0/1 mask of ``ATTENTION_RANK`` ones; DART reports that importance-based pruning is often worse
  than this). The draw is :func:`explorer_plugins.baselines.method.random_keep` seeded by
  ``(seed, 0)``, so one seed gives one subset whatever the layer.
* :class:`VlmPool` (``vlm.pool``): average pooling of every grid segment of the layout (LLaVA-1.5:
  the one 24×24 grid; LLaVA-NeXT: the base view and the unpadded tile grid separately; Qwen2-VL:
  the merged patch grid) with kernel = stride = ``s``, executed as merge groups: each ``s×s``
  window becomes one token, the mean of its members' hidden states, at the position of its first
  (top-left) member (:class:`explorer.backends.vlm.PruneDecision` merge semantics). ``s =
  round(1/sqrt(keep))`` unless ``stride`` is set (keep 0.25 → s = 2 → LLaVA-1.5's 24×24 → 12×12 =
  144); windows never cross segments, and edge windows of a grid not divisible by ``s`` are
  smaller (ceil mode), so ``Σ_segments ceil(h/s)·ceil(w/s)`` tokens remain. This is LLaVA-NeXT's
  ``get_2dPool`` (Li et al., LLaVA-OneVision, 2024; https://github.com/LLaVA-VL/LLaVA-NeXT,
  ``llava/model/llava_arch.py``: ``avg_pool2d(frame, stride)`` per square frame) on every segment;
  on a side not divisible by ``s`` the official ``avg_pool2d`` (floor mode) drops the last rows and
  columns instead, which a merge cannot express (every token belongs to a group).

Coordinates: ``state.original`` are image-token numbers in layout order (segment by segment,
row-major inside a segment); :func:`grid_cells` turns them into ``(segment, row, col)``.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from explorer.core.generation import PruneDecision, PruneState
from explorer.plugin_host.vlm import VlmPruningMethod, VlmPruningParams
from explorer_plugins.common.selection import pool_stride, random_keep

__all__ = ["VlmRandom", "VlmPool", "grid_cells", "segment_pool_groups"]


def grid_cells(layout, original: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(segment, row, col)`` arrays of the image tokens numbered ``original`` in ``layout``."""
    original = np.asarray(original, dtype=np.int64)
    offsets = np.asarray(layout.segment_offsets(), dtype=np.int64)
    if original.size and (original.min() < 0 or original.max() >= layout.n_image_tokens):
        raise ValueError("image-token numbers outside the layout")
    seg = np.searchsorted(offsets, original, side="right") - 1
    cols = np.asarray([s.cols for s in layout.segments], dtype=np.int64)[seg]
    row, col = np.divmod(original - offsets[seg], cols)
    return seg, row, col


def segment_pool_groups(layout, original: np.ndarray, s: int) -> np.ndarray:
    """Group id ``0..G-1`` of every token: its ``s×s`` window inside its own segment; windows are
    numbered segment by segment, in raster order inside a segment."""
    if s < 1:
        raise ValueError("the pooling window must be at least 1")
    seg, row, col = grid_cells(layout, original)
    wr, wc = row // s, col // s
    width = int(max(-(-sg.cols // s) for sg in layout.segments)) + 1
    height = int(max(-(-sg.rows // s) for sg in layout.segments)) + 1
    key = (seg * height + wr) * width + wc
    return np.unique(key, return_inverse=True)[1].reshape(-1).astype(np.int64)


class VlmRandomParams(VlmPruningParams):
    keep: float = Field(0.5, gt=0.0, le=1.0, description="Fraction of the image tokens kept: k = round(keep·n) "
                        "drawn uniformly at random.")
    layer: int = Field(0, ge=0, description="LLM layer before which the tokens are dropped (0 = the LLM input; "
                       "FastV's random baseline is K = 0).")
    seed: int = Field(0, ge=0, description="Seed of the random subset (the same seed keeps the same tokens).")


class VlmRandom(VlmPruningMethod):
    """Seeded uniform random subset of the image tokens (see module docstring)."""

    Params = VlmRandomParams

    def decide(self, state: PruneState, params) -> PruneDecision:
        n = len(state.image)
        return PruneDecision(keep=random_keep(n, self.keep_count(params, n), params.seed))


class VlmPoolParams(VlmPruningParams):
    keep: float = Field(0.25, gt=0.0, le=1.0, description="Target fraction: the window is s = round(1/sqrt(keep)) "
                        "(0.25 → 2×2 windows, a quarter of the tokens; 0.5 → s = 1, no reduction).")
    layer: int = Field(0, ge=0, description="LLM layer before which the windows are pooled (0 = the LLM input, as "
                       "LLaVA-OneVision's 2-D pooling of the projected features).")
    seed: int = Field(0, ge=0, description="Unused (pooling is deterministic); kept for the common form.")
    stride: int = Field(0, ge=0, description="Window size s (kernel = stride = s); 0 derives it from keep.")


class VlmPool(VlmPruningMethod):
    """Spatial average pooling of each grid segment inside the LLM (see module docstring)."""

    Params = VlmPoolParams

    def decide(self, state: PruneState, params) -> PruneDecision:
        s = pool_stride(params.keep, params.stride)
        return PruneDecision(merge=segment_pool_groups(state.layout, state.original, s))
