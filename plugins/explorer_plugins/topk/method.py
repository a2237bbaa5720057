"""Top-K by [CLS] attention (Haurum et al., Which Tokens to Use? Investigating Token Reduction in
Vision Transformers, ICCVW 2023; https://github.com/JoakimHaurum/TokenReduction ``models/topk.py``)
and EViT (Liang et al., ICLR 2022; https://github.com/youweiliang/evit).

At a reduction block, after attention: score every patch token by the head-mean attention it
receives from [CLS] (``s_i = mean_h A[h, 0, i]``), keep the ``k`` highest, in descending score
order (the official output order: ``torch.topk(..., sorted=True)``). EViT also fuses the dropped
tokens into one extra token ``Σ_{i dropped} s_i x_i`` with the raw, unnormalised [CLS] attention
weights.

Top-K's token counts (``counts="official"``, the default) follow TokenReduction's
``Attention_TopK.forward``: ``left_tokens = int(keep_rate * init_n)`` with ``init_n`` the
*original* patch count and, for a single ``keep_rate`` r over S reduction locations,
``TopKVisionTransformer`` uses ``r ** (s + 1)`` at the s-th location; here ``r = keep ** (1/S)``,
so stage ``s`` of ``S`` keeps ``floor(keep^((s+1)/S) · n_original)`` and the last one
``floor(keep · n_original)``. ``counts="total"`` is the earlier rule: ``ceil(keep^(1/S) · n)`` of
the ``n`` current tokens at the earlier stages and exactly ``ceil(keep · n_original)`` at the last
(there one token more than the official count whenever ``keep · n_original`` is not an integer).
A stage whose count equals the tokens present keeps them all (the official
``Attention_TopK.forward`` then returns a 5-tuple that ``Block_TopK.forward`` cannot unpack).

EViT's token counts (``counts="official"``, the default) follow the official code
(youweiliang/evit, ``evit.py``, ``Attention.forward``): at *every* stage
``left_tokens = math.ceil(keep_rate * (N - 1))`` with ``N - 1`` the patch tokens entering that
block, *counting the fused token appended by the previous stage* (in the official ``Block.forward``
it is concatenated after the kept tokens and is an ordinary token in later blocks: it is scored,
may be kept, or fused again), no tolerance on the ``ceil``, and nothing is pruned (no fused token)
when ``left_tokens == N - 1``. ``keep_rate`` is the same at every stage: ``keep ** (1/stages)``
(``keep`` itself with one stage), so EViT's ``keep_rate = 0.7`` at blocks 4/7/10 is
``keep = 0.343, layers = 3,6,9``; about ``keep`` of the patches remain, not exactly.
``counts="total"`` is Top-K's ``counts="total"``: the last stage keeps exactly
``ceil(keep · n_original)``, for comparing methods at one token budget.

Only the [CLS] row of the block's attention is computed (the block keeps the fused kernel), and
the decision is made on the device for a whole batch at once (array API).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from explorer.core.arrays import as_work, namespace, stable_argsort
from explorer.core.reduction import ReductionStep, TokenState, keep_count
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


def topk_keep_count(keep: float, stage: int, n_stages: int, n_original: int, n: int) -> int:
    """Patch tokens TokenReduction's Top-K keeps at stage ``stage`` of ``n_stages`` (official
    ``Attention_TopK.forward``: ``int(keep_rate * init_n)``, ``init_n`` the original patches, with
    ``keep_rate = r ** (stage + 1)`` as ``TopKVisionTransformer`` builds it from one rate ``r``;
    here ``r = keep ** (1 / n_stages)``): ``floor(keep^((stage+1)/n_stages) · n_original)``,
    at least 1 and at most the ``n`` tokens present."""
    if n_stages <= 1:
        return max(1, min(n, int(keep * n_original)))  # as the official int(), no tolerance
    return max(1, min(n, keep_count(keep ** ((stage + 1) / n_stages), n_original, "floor")))


class TopK(ReductionMethod):
    class Params(ReductionParams):
        layers: str = Field("", description="Several reduction blocks, comma separated (e.g. 3,6,9); empty: just 'layer'.")
        counts: Literal["official", "total"] = Field("official", description=(
            "Tokens kept per stage. official: floor(keep^((s+1)/S) · original patches) at stage s of S, as "
            "TokenReduction's Top-K (int(keep_rate · init_n)); total: ceil(keep^(1/S) · n) at the earlier stages "
            "and exactly ceil(keep · original patches) at the last (the earlier rule)."))

    fuse = False
    host_only = False  # array API: decided on the device
    batched = True  # one decision for every image of a batch

    def attention_need(self, params) -> str:
        return "cls"  # only the [CLS] row is computed (the block keeps the fused kernel)

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def reduce(self, state: TokenState, params) -> ReductionStep:
        if params.counts == "total":
            k = self.stage_keep(params, state, "ceil")
        else:
            k = topk_keep_count(params.keep, state.stage, state.n_stages, state.n_original, state.n_patches)
        return topk_step(state.cls_attention, k, fuse=self.fuse)


def evit_keep_count(keep_rate: float, n: int) -> int:
    """Patch tokens EViT keeps out of the ``n`` entering a block (the fused token of an earlier
    stage included), as the official ``Attention.forward``: ``math.ceil(keep_rate * (N - 1))`` with
    ``N - 1 = n``; all ``n`` (no reduction) when ``keep_rate >= 1``; at least 1."""
    if keep_rate >= 1.0:
        return n
    return max(1, min(n, math.ceil(keep_rate * n)))


def evit_stage_rate(keep: float, n_stages: int) -> float:
    """EViT's per-stage keep rate for ``keep`` of the patches after ``n_stages`` stages:
    ``keep ** (1 / n_stages)`` (``keep`` itself for one stage)."""
    return keep if n_stages <= 1 else keep ** (1.0 / n_stages)


class EViT(TopK):
    class Params(TopK.Params):
        counts: Literal["official", "total"] = Field("official", description=(
            "Tokens kept per stage. official: ceil(keep_rate·n) at every stage, n the patch tokens entering it "
            "(the previous fused token included), keep_rate = keep^(1/stages), as youweiliang/evit; "
            "total: the last stage keeps exactly ceil(keep·original patches), as Top-K's counts=total."))

    fuse = True

    def reduce(self, state: TokenState, params) -> ReductionStep:
        if params.counts == "total":
            k = self.stage_keep(params, state, "ceil")
        else:
            k = evit_keep_count(evit_stage_rate(params.keep, state.n_stages), state.n_patches)
        return topk_step(state.cls_attention, k, fuse=self.fuse)
