"""K-Medoids and DPC-KNN token clustering as in "Which Tokens to Use?" (Haurum et al., ICCVW 2023;
catalog A2; ``JoakimHaurum/TokenReduction``, ``models/kmedoids.py`` and ``models/dpcknn.py``).

Both cluster the current patch tokens ([CLS] excluded) into ``K`` clusters and merge every cluster
into one token (size-weighted mean, executed by the backend). ``K`` at stage ``i`` of ``S`` is the
study's ``int(N_patches · ρ^(i+1))`` with the per-stage rate ``ρ = keep^(1/S)`` (the last stage
uses ``int(keep · N_patches)`` exactly), ``N_patches`` the original number of patch tokens.

**K-Medoids** (``k_medoids_fit``): Euclidean distances ``d_ij`` between the token features. The
token weights ``w_i`` are the attention each token receives (``Σ_h Σ_q A[h, q, i]``, the column
sums of the block's attention); the initial medoids are the ``K`` tokens with the largest ``w``.
Then ``iterations`` times (study default 3): assign every token to its nearest medoid, and for
each cluster ``k`` pick the member minimising ``w_i Σ_j d_ij``; in the study's code the sum runs
over *all* tokens ``j`` (``update="study"``), ``update="cluster"`` sums over the members of the
cluster only (the textbook alternate update, with ``w_j`` weighting the members). A final
assignment gives the clusters. With ``weighting="uniform"`` (the study's ``--equal_weight``) the
initial medoids come from the study's farthest rule: a seeded random start, then repeatedly the
token whose largest distance to a chosen medoid is largest.

**DPC-KNN** (``cluster_dpc_knn``, from TCFormer): ``d_ij = ||x_i - x_j|| / sqrt(C)``; local
density ``ρ_i = exp(-mean_{j ∈ kNN(i)} d_ij²)`` over the ``k`` nearest neighbours (the token
itself included, as ``topk`` of the distance row does); distance indicator ``δ_i = min_{j: ρ_j >
ρ_i} d_ij`` (``max d`` for the densest token); ``score = ρ · δ``; the ``K`` tokens with the
highest score are the centres; every token joins its nearest centre and each centre its own
cluster. Cluster ids follow the centres' score order.

Every medoid / centre is assigned to its own cluster, so there are exactly ``K`` non-empty clusters.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from scipy.spatial.distance import cdist

from explorer.core.reduction import ReductionStep, TokenState, keep_count
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams, first_layer

__all__ = ["KMedoids", "DPCKNN", "k_medoids", "dpc_knn", "cluster_count", "parse_layers", "relabel",
           "token_metric", "attention_received"]


# -- shared helpers (also used by the ATC and BAT plugins) ------------------------------------------
def parse_layers(layers: str, layer: int, n_layers: int) -> list[int]:
    """Reduction blocks from a comma-separated list (``"3,6,9"``), or ``[layer]`` when empty."""
    if not layers.strip():
        return [first_layer(layer, n_layers)]
    try:
        return sorted({first_layer(int(v), n_layers) for v in layers.split(",") if v.strip()})
    except ValueError:
        raise ParamError(f"layers {layers!r} must be comma-separated block numbers") from None


def cluster_count(keep: float, state: TokenState) -> int:
    """Clusters at this stage: ``int(N_patches · ρ^(stage+1))`` with ``ρ = keep^(1/n_stages)``
    (the TokenReduction / ATC rule), the last stage exactly ``int(keep · N_patches)``; at least
    1 and at most the current number of patch tokens."""
    n, n_orig = state.n_patches, state.assign.shape[0]
    if state.stage >= state.n_stages - 1:
        k = keep_count(keep, n_orig, "floor")
    else:
        k = keep_count(keep ** ((state.stage + 1) / state.n_stages), n_orig, "floor")
    return max(1, min(n, k))


def relabel(labels: np.ndarray) -> np.ndarray:
    """Cluster labels renumbered ``0..G-1`` in order of first occurrence."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def token_metric(state: TokenState, which: str) -> np.ndarray:
    """``(n_patches, d)`` patch-token descriptors: ``"features"`` the tokens ``x`` (after the
    block's attention), ``"keys"`` the block's head-mean keys."""
    p = state.n_prefix
    if which == "keys":
        return np.asarray(state.keys, dtype=np.float64).mean(0)[p:]
    return np.asarray(state.x, dtype=np.float64)[p:]


def attention_received(state: TokenState) -> np.ndarray:
    """``(n_patches,)`` attention each patch token receives: ``Σ_h Σ_q A[h, q, i]``."""
    if state.attention is None:
        raise ValueError("attention-weighted K-Medoids needs the block's attention")
    return np.asarray(state.attention, dtype=np.float64).sum(axis=(0, 1))[state.n_prefix:]


# -- K-Medoids -------------------------------------------------------------------------------------
def _assign(D: np.ndarray, centers: np.ndarray) -> np.ndarray:
    assign = D[:, centers].argmin(1)
    assign[centers] = np.arange(centers.size)
    return assign


def k_medoids(X: np.ndarray, K: int, iterations: int = 3, weights: np.ndarray | None = None,
              seed: int = 0, update: str = "study") -> tuple[np.ndarray, np.ndarray]:
    """The study's K-Medoids on ``X (n, d)``: ``(medoids (K,), assignment (n,))`` (module docstring).

    ``weights (n,)`` (attention received) choose the initial medoids and weight the medoid cost;
    ``None`` means uniform weights and the seeded farthest initialisation.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    K = max(1, min(int(K), n))
    D = cdist(X, X)
    if weights is None:
        w = np.ones(n)
        rng = np.random.default_rng(seed)
        centers = [int(rng.integers(n))]
        for _ in range(1, K):
            dd = D[:, centers].copy()
            dd[centers, :] = 0.0
            centers.append(int(np.argmax(dd.max(1))))
        centers = np.array(centers, dtype=np.int64)
    else:
        w = np.asarray(weights, dtype=np.float64)
        centers = np.argsort(-w, kind="stable")[:K].astype(np.int64)
    for _ in range(iterations):
        assign = _assign(D, centers)
        for k in range(K):
            members = np.flatnonzero(assign == k)
            if update == "study":
                cost = w[members] * D[members].sum(1)
            elif update == "cluster":
                cost = D[np.ix_(members, members)] @ w[members]
            else:
                raise ValueError(f"unknown medoid update {update!r}")
            centers[k] = members[int(np.argmin(cost))]
    return centers, _assign(D, centers)


# -- DPC-KNN ---------------------------------------------------------------------------------------
def dpc_knn(X: np.ndarray, K: int, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Density-peak clustering with k nearest neighbours on ``X (n, C)`` (module docstring).

    Returns ``(labels (n,), centers (K,), score (n,))``: cluster ids ``0..K-1`` in the centres'
    score order, the centre indices, and ``density · distance`` per token. Equal densities are
    ordered by token index (the official code adds 1e-6 random noise instead).
    """
    X = np.asarray(X, dtype=np.float64)
    n, C = X.shape
    K = max(1, min(int(K), n))
    D = cdist(X, X) / np.sqrt(C)
    kk = max(1, min(int(k), n))
    nearest = np.sort(D, axis=1)[:, :kk]
    density = np.exp(-(nearest ** 2).mean(1))
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), -density))] = np.arange(n)  # 0 = densest
    higher = rank[None, :] < rank[:, None]  # higher[i, j]: j is denser than i
    dist = np.where(higher, D, np.inf).min(1)
    dist[~higher.any(1)] = D.max()
    score = dist * density
    centers = np.argsort(-score, kind="stable")[:K].astype(np.int64)
    return _assign(D, centers), centers, score


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

    class Params(_ClusterParams):
        iterations: int = Field(3, ge=0, le=100, description="Assignment / medoid-update rounds (study default 3).")
        weighting: Literal["attention", "uniform"] = Field("attention", description=(
            "attention: medoids start at the tokens receiving the most attention and the medoid cost is "
            "weighted by it (study default); uniform: equal weights and the study's seeded farthest start "
            "(--equal_weight)."))
        update: Literal["study", "cluster"] = Field("study", description=(
            "Medoid update: study = the member minimising w_i·Σ_j d_ij over all tokens (the study's code); "
            "cluster = the member minimising the weighted distance to its own cluster's members."))

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def is_merging(self, params) -> bool:
        return True

    def reduce(self, state: TokenState, params) -> ReductionStep:
        K = cluster_count(params.keep, state)
        weights = attention_received(state) if params.weighting == "attention" else None
        if K >= state.n_patches:  # nothing to merge: keep the tokens in place
            return ReductionStep(merge=np.arange(state.n_patches), scores=weights)
        _, assign = k_medoids(token_metric(state, params.metric), K, params.iterations, weights,
                              seed=params.seed + state.stage, update=params.update)
        return ReductionStep(merge=assign, scores=weights)


class DPCKNN(ReductionMethod):
    """DPC-KNN token clustering (module docstring)."""

    class Params(_ClusterParams):
        k: int = Field(5, ge=1, le=1000, description="Nearest neighbours for the local density (official default 5).")

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def is_merging(self, params) -> bool:
        return True

    def reduce(self, state: TokenState, params) -> ReductionStep:
        K = cluster_count(params.keep, state)
        if K >= state.n_patches:  # nothing to merge: keep the tokens in place
            return ReductionStep(merge=np.arange(state.n_patches))
        labels, _, score = dpc_knn(token_metric(state, params.metric), K, params.k)
        return ReductionStep(merge=labels, scores=score)
