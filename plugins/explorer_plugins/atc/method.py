"""ATC: Agglomerative Token Clustering (Haurum, Escalera, Taylor, Moeslund, ECCV 2024; official code
``https://github.com/JoakimHaurum/ATC``, ``ATC_setup/models/atc.py: agglomerative_clustering`` and
``merge_wavg``; ``tests/golden/atc.npz`` holds its outputs, which this implementation reproduces).

At a reduction block, between attention and MLP: ``metric = mean_h K[h]`` (head-mean keys of the
patch tokens), ``metric ← metric / ||metric||``, ``D = 1 - metric metricᵀ``; [CLS] is removed from
``D`` (it is its own cluster and stays first). Bottom-up agglomerative clustering with the chosen
linkage (single / complete / average) on the precomputed ``D`` until ``K`` clusters remain, and
every cluster is merged into one token by the size-weighted mean (``merge_wavg``).

The official code calls ``sklearn.cluster.AgglomerativeClustering(n_clusters=K,
metric="precomputed", linkage=...)``; here ``scipy.cluster.hierarchy.linkage`` builds the same
dendrogram and its first ``N - K`` merges give the ``K`` clusters (identical partitions for these
monotone linkages, up to the numbering). Clusters are numbered by their first patch token (the
official output tokens follow scikit-learn's numbering instead).

``K`` at stage ``i`` of ``S`` is ``int(N_patches · ρ^(i+1))`` with ``ρ = keep^(1/S)``. The merge
is always size-weighted; the official model forgets the sizes between blocks when proportional
attention is off, so its later stages then merge by the plain mean.

scipy's hierarchical clustering runs on the host: the head-mean keys ``(n, d_h)`` are the one array
that crosses; the features stay on the device.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform

from explorer.core.reduction import ReductionStep, TokenState
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams
from explorer.core.arrays import to_host
from explorer_plugins.common.selection import cluster_count, normalize_rows, parse_layers, relabel, token_metric

__all__ = ["ATC", "cosine_distances", "agglomerative_labels"]

LINKAGES = ("single", "complete", "average")


def cosine_distances(metric: np.ndarray) -> np.ndarray:
    """``D = 1 - cos`` between the rows of ``metric (n, d)``: symmetric, zero diagonal, ``>= 0``
    (host, float64: scipy's linkage runs on it)."""
    m = normalize_rows(to_host(metric, np.float64))
    D = 1.0 - m @ m.T
    D = np.clip((D + D.T) / 2.0, 0.0, None)
    np.fill_diagonal(D, 0.0)
    return D


def agglomerative_labels(D: np.ndarray, n_clusters: int, linkage: str = "average") -> np.ndarray:
    """Agglomerative clustering of a precomputed distance matrix ``D (n, n)`` into ``n_clusters``.

    Returns ``(n,)`` cluster ids ``0..K-1`` numbered by first occurrence.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    D = np.asarray(D, dtype=np.float64)
    n = D.shape[0]
    K = max(1, min(int(n_clusters), n))
    if K == n or n < 2:
        return np.arange(n, dtype=np.int64)
    Z = scipy_linkage(squareform(D, checks=False), method=linkage)
    # union-find over the first n - K merges; node n + i is the cluster formed by merge i
    parent = np.arange(2 * n - 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n - K):
        a, b = int(Z[i, 0]), int(Z[i, 1])
        parent[root(a)] = n + i
        parent[root(b)] = n + i
    return relabel(np.array([root(i) for i in range(n)]))


class ATC(ReductionMethod):
    """Agglomerative Token Clustering (module docstring)."""

    proportional_attention = True
    host_only = False  # only the head-mean keys (n, d_h) come to the host, where scipy clusters them

    def attention_need(self, params) -> str:
        return "none"

    class Params(ReductionParams):
        linkage: Literal["average", "complete", "single"] = Field("average", description=(
            "Linkage between clusters: average (official default; used for MAE and Stable Diffusion), complete "
            "(the DeiT fine-tuning runs), single (off-the-shelf SWAG / ViT-Adapter)."))
        layers: str = Field("", description=(
            "Several reduction blocks, comma separated (the paper uses 3,6,9); empty: just 'layer'. K at stage i "
            "is int(N·ρ^(i+1)) with ρ = keep^(1/stages)."))
        prop_attn: bool = Field(True, description=(
            "Proportional attention: add log(size) to the attention logits of later blocks (on in the official "
            "off-the-shelf patch, optional --proportional_attn for DeiT fine-tuning)."))

    def stages(self, params, model):
        return parse_layers(params.layers, params.layer, model.n_layers)

    def is_merging(self, params) -> bool:
        return True

    def reduce(self, state: TokenState, params) -> ReductionStep:
        K = cluster_count(params.keep, state)
        D = cosine_distances(token_metric(state, "keys"))
        return ReductionStep(merge=agglomerative_labels(D, K, params.linkage), n_groups=min(K, state.n_patches))
