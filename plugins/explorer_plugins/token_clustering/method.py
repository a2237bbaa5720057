"""K-Medoids and DPC-KNN token clustering as in "Which Tokens to Use?" (Haurum et al., ICCVW 2023;
official code ``https://github.com/JoakimHaurum/TokenReduction``, ``models/kmedoids.py:
k_medoids_fit`` and ``models/dpcknn.py: cluster_dpc_knn``; DPC-KNN comes from TCFormer, Zeng et al.,
CVPR 2022, ``https://github.com/zengwang430521/TCFormer``, ``tcformer_module/tcformer_utils.py``).

Both cluster the current patch tokens ([CLS] excluded) into ``K`` clusters. ``K`` at stage ``i`` of
``S`` is the study's ``int(N_patches · ρ^(i+1))`` with the per-stage rate ``ρ = keep^(1/S)`` (the
last stage uses ``int(keep · N_patches)`` exactly), ``N_patches`` the original number of patch tokens.

**K-Medoids** (``k_medoids_fit``): Euclidean distances ``d_ij`` between the token features. The
token weights ``w_i`` are the attention each token receives (``Σ_h Σ_q A[h, q, i]``, the column
sums of the block's attention); the initial medoids are the ``K`` tokens with the largest ``w``.
Then ``iterations`` times (study default 3): assign every token to its nearest medoid, and for
each cluster ``k`` pick the member minimising ``w_i Σ_j d_ij``; in the study's code the sum runs
over *all* tokens ``j`` (``update="study"``), ``update="cluster"`` sums over the members of the
cluster only (the textbook alternate update, with ``w_j`` weighting the members). A final
assignment gives the clusters. With ``weighting="uniform"`` (the study's ``--equal_weight``) the
initial medoids come from the study's farthest rule: a random start (here a numpy generator seeded
by ``seed`` + stage, officially ``np.random.choice`` on the global generator), then repeatedly the
token whose largest distance to a chosen medoid is largest. As in the study, the medoid tokens go
on and the others are dropped (``output="medoids"``, the default: ``KMedoids`` returns the cluster
centres' features); ``output="merge"`` (the project's earlier behaviour) merges every cluster into
one token by the size-weighted mean instead and keeps every token's cluster for display.

**DPC-KNN** (``cluster_dpc_knn``, from TCFormer): ``d_ij = ||x_i - x_j|| / sqrt(C)``; local
density ``ρ_i = exp(-mean_{j ∈ kNN(i)} d_ij²)`` over the ``k`` nearest neighbours (the token
itself included, as ``topk`` of the distance row does); distance indicator ``δ_i = min_{j: ρ_j >
ρ_i} d_ij`` (``max d`` for the densest token); ``score = ρ · δ``; the ``K`` tokens with the
highest score are the centres; every token joins its nearest centre and each centre its own
cluster. Cluster ids follow the centres' score order. Every cluster is merged into one token by
the size-weighted mean (the study's ``--equal_weight`` ``merge_tokens``, a plain mean, equal to it
while every token has size 1, i.e. at the first stage).

Differences from the official code, all on ties only: equal densities are ordered by token index
(the official code adds ``torch.rand · 1e-6``, which float32 does not always resolve, so exact
duplicate tokens can both become centres); every medoid is assigned to its own cluster, so there
are exactly ``K`` non-empty clusters (with exact duplicate medoids the official assignment gives
the tie to the lower cluster and leaves the other cluster empty, whose medoid then becomes token
0). ``tests/golden/kmedoids.npz`` and ``tests/golden/dpcknn.npz`` hold the official outputs,
duplicates included. Both run where the tokens are (array API); distances by the Gram form, as
``torch.cdist`` computes them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.arrays import device, namespace, stable_argsort
from explorer.core.reduction import ReductionStep, TokenState
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams
from explorer_plugins.common.selection import (assign_to_centers, attention_received, cluster_count, dpc_knn,
                                               pairwise_distances, parse_layers, relabel, token_metric)

__all__ = ["KMedoids", "DPCKNN", "k_medoids", "dpc_knn", "cluster_count", "parse_layers", "relabel",
           "token_metric", "attention_received"]


# -- K-Medoids -------------------------------------------------------------------------------------
def k_medoids(X, K: int, iterations: int = 3, weights=None, seed: int = 0, update: str = "study"):
    """The study's K-Medoids on ``X (n, d)``: ``(medoids (K,), assignment (n,))`` (module docstring).

    ``weights (n,)`` (attention received) choose the initial medoids and weight the medoid cost;
    ``None`` means uniform weights and the seeded farthest initialisation. Every medoid update is
    one vectorised step over all clusters (a ``(K, n)`` membership mask, the cheapest member of
    each cluster by ``argmin``), in ``X``'s namespace.
    """
    D = pairwise_distances(X)
    xp = namespace(D)
    dev = device(D)
    n = D.shape[0]
    K = max(1, min(int(K), n))
    if weights is None:
        w = xp.ones(n, dtype=D.dtype, device=dev)
        rng = np.random.default_rng(seed)
        first = int(rng.integers(n))
        chosen = xp.zeros(n, dtype=xp.bool, device=dev)
        chosen[first] = True
        far = xp.asarray(D[:, first], copy=True)
        picks = [xp.asarray(first, device=dev)]
        for _ in range(1, K):
            j = xp.argmax(xp.where(chosen, xp.zeros_like(far), far))  # largest distance to a chosen medoid
            picks.append(j)
            chosen[j] = True
            far = xp.maximum(far, D[:, j])
        centers = xp.astype(xp.stack(picks), xp.int64)
    else:
        w = xp.astype(weights, D.dtype) if hasattr(weights, "dtype") else xp.asarray(weights, dtype=D.dtype, device=dev)
        centers = xp.astype(stable_argsort(w, descending=True)[:K], xp.int64)
    ks = xp.arange(K, device=dev)
    inf = xp.asarray(xp.inf, dtype=D.dtype, device=dev)
    for _ in range(iterations):
        assign = assign_to_centers(D, centers)
        members = assign[None, :] == ks[:, None]  # (K, n)
        if update == "study":
            cost = xp.broadcast_to((w * xp.sum(D, axis=1))[None, :], members.shape)
        elif update == "cluster":
            cost = (xp.astype(members, D.dtype) * w[None, :]) @ D  # cost[k, i] = Σ_j∈k w_j d_ji
        else:
            raise ValueError(f"unknown medoid update {update!r}")
        centers = xp.astype(xp.argmin(xp.where(members, cost, inf), axis=1), xp.int64)
    return centers, assign_to_centers(D, centers)


# -- the plugins ------------------------------------------------------------------------------------
class _ClusterParams(ReductionParams):
    layers: str = Field("", description=(
        "Several reduction blocks, comma separated (the study uses 3,6,9); empty: just 'layer'. K at stage i "
        "is int(N·ρ^(i+1)) with ρ = keep^(1/stages)."))
    metric: Literal["features", "keys"] = Field("features", description=(
        "What is clustered: the token features (the study's code) or the block's head-mean keys (as ToMe/ATC)."))
    prop_attn: bool = Field(False, description=(
        "Add log(size) to the attention logits of later blocks (ToMe's proportional attention; the study "
        "does not use it for these methods)."))


class KMedoids(ReductionMethod):
    """K-Medoids token clustering (module docstring)."""

    host_only = False

    def attention_need(self, params) -> str:
        return "full" if params.weighting == "attention" else "none"

    class Params(_ClusterParams):
        iterations: int = Field(3, ge=0, le=100, description="Assignment / medoid-update rounds (study default 3).")
        weighting: Literal["attention", "uniform"] = Field("attention", description=(
            "attention: medoids start at the tokens receiving the most attention and the medoid cost is "
            "weighted by it (study default); uniform: equal weights and the study's seeded farthest start "
            "(--equal_weight)."))
        update: Literal["study", "cluster"] = Field("study", description=(
            "Medoid update: study = the member minimising w_i·Σ_j d_ij over all tokens (the study's code); "
            "cluster = the member minimising the weighted distance to its own cluster's members."))
        output: Literal["medoids", "merge"] = Field("medoids", description=(
            "What goes on: medoids = the K medoid tokens in cluster order, the others dropped (the study's code); "
            "merge = every cluster merged into one token by the size-weighted mean (earlier project behaviour; "
            "every token keeps its cluster for display)."))

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def is_merging(self, params) -> bool:
        return params.output == "merge"

    def reduce(self, state: TokenState, params) -> ReductionStep:
        K = cluster_count(params.keep, state)
        weights = attention_received(state) if params.weighting == "attention" else None
        if K >= state.n_patches:  # nothing to reduce: keep the tokens in place
            if params.output == "medoids":
                return ReductionStep(keep=np.arange(state.n_patches), scores=weights)
            return ReductionStep(merge=np.arange(state.n_patches), scores=weights, n_groups=state.n_patches)
        medoids, assign = k_medoids(token_metric(state, params.metric), K, params.iterations, weights,
                                    seed=params.seed + state.stage, update=params.update)
        if params.output == "medoids":  # the study's KMedoids: the cluster centres' features, in cluster order
            return ReductionStep(keep=medoids, scores=weights)
        return ReductionStep(merge=assign, scores=weights, n_groups=K)


class DPCKNN(ReductionMethod):
    """DPC-KNN token clustering (module docstring)."""

    host_only = False

    def attention_need(self, params) -> str:
        return "none"

    class Params(_ClusterParams):
        k: int = Field(5, ge=1, le=1000, description="Nearest neighbours for the local density (official default 5).")

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def is_merging(self, params) -> bool:
        return True

    def reduce(self, state: TokenState, params) -> ReductionStep:
        K = cluster_count(params.keep, state)
        if K >= state.n_patches:  # nothing to merge: keep the tokens in place
            return ReductionStep(merge=np.arange(state.n_patches), n_groups=state.n_patches)
        labels, _, score = dpc_knn(token_metric(state, params.metric), K, params.k)
        return ReductionStep(merge=labels, scores=score, n_groups=K)
