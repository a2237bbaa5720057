"""Top-K by [CLS] attention and EViT (Liang et al., ICLR 2022; https://github.com/youweiliang/evit).

At a reduction block, after attention: score every patch token by the head-mean attention it
receives from [CLS] (``s_i = mean_h A[h, 0, i]``), keep the ``k`` highest (EViT:
``k = ceil(ρ·n)``), in descending score order (the official output order). EViT also fuses the
dropped tokens into one extra token ``Σ_{i dropped} s_i x_i`` with the raw, unnormalised [CLS]
attention weights. Several stages (EViT's blocks 4/7/10) apply the per-stage keep rate
``keep ** (1/stages)`` so that ``keep`` of the patch tokens remain at the end.

Only the [CLS] row of the block's attention is computed (the block keeps the fused kernel), and
the decision is made on the device for a whole batch at once (array API).
"""

from __future__ import annotations

from pydantic import Field

from explorer.core.arrays import as_work, namespace, stable_argsort
from explorer.core.reduction import ReductionStep, TokenState
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams
from explorer_plugins.common.selection import parse_layers


def topk_step(scores, k: int, fuse: bool = False) -> ReductionStep:
    """Keep the ``k`` highest scores, in descending order (stable for ties). ``scores (..., n)``:
    leading axes are a batch; computed in the scores' namespace (on their device)."""
    if not hasattr(scores, "dtype"):
        import numpy as np

        scores = np.asarray(scores)
    xp = namespace(scores)
    order = stable_argsort(scores, descending=True)
    keep = order[..., :k]
    fuse_w = None
    if fuse and k < scores.shape[-1]:
        w = as_work(scores, xp)
        rank = xp.argsort(order, axis=-1)  # place of every token in the descending order
        fuse_w = xp.where(rank >= k, w, xp.zeros_like(w))  # the dropped tokens' raw [CLS] attention
    return ReductionStep(keep=keep, fuse=fuse_w, scores=scores)


class TopK(ReductionMethod):
    class Params(ReductionParams):
        layers: str = Field("", description="Several reduction blocks, comma separated (e.g. 3,6,9); empty: just 'layer'.")

    fuse = False
    host_only = False  # array API: decided on the device
    batched = True  # one decision for every image of a batch

    def attention_need(self, params) -> str:
        return "cls"  # only the [CLS] row is computed (the block keeps the fused kernel)

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def reduce(self, state: TokenState, params) -> ReductionStep:
        return topk_step(state.cls_attention, self.stage_keep(params, state, "ceil"), fuse=self.fuse)


class EViT(TopK):
    fuse = True
