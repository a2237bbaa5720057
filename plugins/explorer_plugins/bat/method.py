"""BAT: Beyond Attentive Tokens (Long et al., CVPR 2023).

No official code was found; this follows the paper's description (from its abstract), and every
concrete choice below is an assumption (listed in the manifest's ``adaptation``).

At a reduction block with a budget of ``K`` patch tokens (EViT's ``ceil`` keep count per stage):

1. split the patch tokens by the head-mean [CLS] attention ``s_i = mean_h A[h, 0, i]``: the
   ``A = K_a + r`` highest are *attentive*, the rest *inattentive*;
2. *inattentive* tokens are clustered by DPC-KNN (TCFormer, as in the "Which Tokens to Use?"
   study) on the token features into ``C`` merged tokens, ``C = round(cluster_share · K)``
   (at least 1, at most ``K - 1``), so that their diversity survives as a few tokens instead of
   EViT's single fused token;
3. among the *attentive* tokens, homogeneous ones are matched and merged by ToMe's bipartite soft
   matching (alternate split in sequence order, cosine of the head-mean keys), ``r =
   round(match_share · K_a)`` pairs, ``K_a = K - C``;
4. output ``[CLS] + attentive (unmerged, then the matching's destinations) + C clusters``:
   exactly ``K`` patch tokens, every merged token the size-weighted mean of its members.

``r`` is capped so that at least ``C`` tokens are inattentive (``r <= N - K``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.reduction import ReductionStep, TokenState
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams
from explorer.core.arrays import as_work, device, namespace, stable_argsort
from explorer_plugins.common.selection import bipartite_soft_matching, dpc_knn, parse_layers, token_metric

__all__ = ["BAT", "bat_groups", "bat_split"]


def _round(v: float) -> int:
    return int(np.floor(v + 0.5))


def bat_split(n: int, K: int, cluster_share: float, match_share: float) -> tuple[int, int, int]:
    """``(C, K_a, r)``: clusters of inattentive tokens, attentive tokens out, attentive pairs merged,
    for ``n`` patch tokens and a budget ``1 < K < n``."""
    C = min(max(1, _round(cluster_share * K)), K - 1)
    Ka = K - C
    r = max(0, min(_round(match_share * Ka), n - K, Ka))
    return C, Ka, r


def bat_groups(scores, match_metric, cluster_metric, K: int,
               cluster_share: float = 0.1, match_share: float = 0.1, k: int = 5):
    """BAT's merge groups over ``n`` patch tokens (module docstring), in the arrays' namespace.

    ``scores (n,)`` [CLS] attention, ``match_metric (n, d)`` for the attentive matching,
    ``cluster_metric (n, d')`` for the inattentive clustering, ``K`` the budget. Returns ``(n,)``
    group ids ``0..K-1``: attentive groups first, the ``C`` clusters last.
    """
    if not hasattr(scores, "dtype"):
        scores = np.asarray(scores, dtype=np.float64)
    xp = namespace(scores)
    dev = device(scores)
    n = scores.shape[0]
    K = max(1, min(int(K), n))
    if K == n:
        return xp.arange(n, dtype=xp.int64, device=dev)
    if K == 1:
        return xp.zeros(n, dtype=xp.int64, device=dev)
    C, Ka, r = bat_split(n, K, cluster_share, match_share)
    order = stable_argsort(as_work(scores, xp), descending=True)
    attentive, inattentive = xp.sort(order[:Ka + r]), xp.sort(order[Ka + r:])
    group = xp.zeros(n, dtype=xp.int64, device=dev)
    group[attentive] = bipartite_soft_matching(_arr(match_metric)[attentive], r, n_prefix=0)
    labels, _, _ = dpc_knn(_arr(cluster_metric)[inattentive], C, k)
    group[inattentive] = Ka + xp.astype(labels, xp.int64)
    return group


def _arr(a):
    return a if hasattr(a, "dtype") and hasattr(a, "shape") else np.asarray(a)


class BAT(ReductionMethod):
    """Attentive tokens kept and de-duplicated, inattentive tokens clustered (module docstring)."""

    host_only = False  # array API: decided on the device

    def attention_need(self, params) -> str:
        return "cls"

    class Params(ReductionParams):
        layers: str = Field("", description=(
            "Several reduction blocks, comma separated (e.g. 3,6,9 as EViT); empty: just 'layer'. Each stage keeps "
            "keep^(1/stages) of its tokens."))
        cluster_share: float = Field(0.1, ge=0.0, le=1.0, description=(
            "Share of the token budget given to the merged inattentive tokens (DPC-KNN clusters; at least 1). "
            "Assumed value: BAT has no official code."))
        match_share: float = Field(0.1, ge=0.0, le=0.5, description=(
            "Attentive pairs merged by bipartite matching, as a share of the attentive tokens left "
            "(more attentive tokens are selected to compensate). Assumed value."))
        k: int = Field(5, ge=1, le=1000, description="Nearest neighbours for DPC-KNN's local density (TCFormer default 5).")
        cluster_on: Literal["features", "keys"] = Field("features", description=(
            "What DPC-KNN clusters: the token features (TCFormer / the study) or the head-mean keys."))
        prop_attn: bool = Field(False, description=(
            "Add log(size) to the attention logits of later blocks (ToMe's proportional attention); off as in "
            "EViT-style pruning."))

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def is_merging(self, params) -> bool:
        return True

    def reduce(self, state: TokenState, params) -> ReductionStep:
        K = self.stage_keep(params, state, "ceil")
        scores = state.cls_attention
        group = bat_groups(scores, token_metric(state, "keys"), token_metric(state, params.cluster_on), K,
                           params.cluster_share, params.match_share, params.k)
        return ReductionStep(merge=group, scores=scores, n_groups=min(K, state.n_patches))
