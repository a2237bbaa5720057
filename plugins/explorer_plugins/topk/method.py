"""Top-K by [CLS] attention and EViT (Liang et al., ICLR 2022; catalog A1).

At a reduction block, after attention: score every patch token by the head-mean attention it
receives from [CLS] (``s_i = mean_h A[h, 0, i]``), keep the ``k`` highest (EViT:
``k = ceil(ρ·n)``), in descending score order (the official output order). EViT also fuses the
dropped tokens into one extra token ``Σ_{i dropped} s_i x_i`` with the raw, unnormalised [CLS]
attention weights. Several stages (EViT's blocks 4/7/10) apply the per-stage keep rate
``keep ** (1/stages)`` so that ``keep`` of the patch tokens remain at the end.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from explorer.core.reduction import ReductionStep, TokenState
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams, first_layer


def topk_step(scores: np.ndarray, k: int, fuse: bool = False) -> ReductionStep:
    """Keep the ``k`` highest scores, in descending order (stable for ties)."""
    order = np.argsort(-scores, kind="stable")
    keep = order[:k]
    fuse_w = None
    if fuse:
        fuse_w = np.zeros_like(scores, dtype=np.float64)
        dropped = order[k:]
        fuse_w[dropped] = scores[dropped]
        if not dropped.size:
            fuse_w = None
    return ReductionStep(keep=keep, fuse=fuse_w, scores=scores)


class TopK(ReductionMethod):
    class Params(ReductionParams):
        layers: str = Field("", description="Several reduction blocks, comma separated (e.g. 3,6,9); empty: just 'layer'.")

    fuse = False

    def stages(self, params, model):
        if params.layers.strip():
            try:
                blocks = sorted({first_layer(int(v), model.n_layers) for v in params.layers.split(",") if v.strip()})
            except ValueError:
                from explorer.plugin_host.api import ParamError

                raise ParamError(f"layers {params.layers!r} must be comma-separated block numbers") from None
            return blocks
        return super().stages(params, model)

    def reduce(self, state: TokenState, params) -> ReductionStep:
        return topk_step(state.cls_attention, self.stage_keep(params, state, "ceil"), fuse=self.fuse)


class EViT(TopK):
    fuse = True
