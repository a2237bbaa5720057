"""Token-selection algorithms shared by the pruning and merging plugins (encoder and VLM side).

Array API (:mod:`explorer.core.arrays`): the functions take numpy arrays or device tensors and
compute in their namespace (float64 on the CPU, float32 on a device), so a selection made from a
GPU trace or inside a GPU run never leaves the device. Functions marked *host* work on small
numpy arrays (positions, seeds) and return numpy; the backend moves their indices to the device.

* :func:`bipartite_soft_matching`: ToMe's matching (Bolya et al., ICLR 2023,
  ``facebookresearch/ToMe`` ``tome/merge.py``), batched over leading axes.
* :func:`divprune_select`: DivPrune's greedy max–min diversity (Alvar et al., CVPR 2025,
  ``vbdi/divprune``).
* :func:`dpc_knn`: density-peak clustering with k nearest neighbours (TCFormer, Zeng et al., CVPR
  2022; as in "Which Tokens to Use?", Haurum et al., ICCVW 2023, ``JoakimHaurum/TokenReduction``).
* :func:`top_k_sorted`: the ``k`` largest scores, returned in sequence order (FastV, SparseVLM).
* :func:`dart_pivot_order` (*host*): the order in which DART visits its pivots (Wen et al., EMNLP
  2025, ``ZichenWen1/DART``).
* :func:`random_keep`, :func:`pool_stride`, :func:`pool_groups` (*host*).
"""

from __future__ import annotations

import numpy as np

from explorer.core.arrays import as_work, device, is_host, namespace, stable_argsort
from explorer.core.reduction import TokenState, keep_count
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.reduction import first_layer

__all__ = ["normalize_rows", "bipartite_soft_matching", "random_keep", "cosine_distance", "divprune_select",
           "pairwise_distances", "dpc_knn", "assign_to_centers", "relabel", "parse_layers", "cluster_count",
           "token_metric", "attention_received", "top_k_sorted", "pool_stride", "pool_groups",
           "DART_PIVOT_ORDERS", "dart_pivot_order"]


def _as_array(a):
    return a if hasattr(a, "dtype") and hasattr(a, "shape") else np.asarray(a)


def normalize_rows(m):
    """Rows scaled to unit L2 norm (zero rows stay zero), in the work dtype of ``m``'s device."""
    m = _as_array(m)
    xp = namespace(m)
    m = as_work(m, xp)
    norm = xp.linalg.vector_norm(m, axis=-1, keepdims=True)
    return m / xp.where(norm > 0, norm, xp.ones_like(norm))


# -- ToMe -------------------------------------------------------------------------------------------
def bipartite_soft_matching(metric, r: int, n_prefix: int = 1):
    """ToMe's bipartite soft matching as merge group ids over the non-prefix tokens.

    Parameters
    ----------
    metric : (..., N, d) array
        The similarity metric of the *whole* sequence (prefix tokens first), e.g. head-mean keys;
        leading axes are a batch.
    r : int
        Tokens to merge away; capped at ``(N - n_prefix) // 2``.
    n_prefix : int
        Protected tokens at the start ([CLS], registers): never a source nor a destination.

    Returns
    -------
    (..., N - n_prefix) int64 array
        Group id of every non-prefix token, ``0..G-1`` with ``G = N - n_prefix - r``, in the
        official output order ``[unmerged a, b]``: unmerged ``a`` patch tokens first in sequence
        order, then the ``b`` patch tokens in sequence order; a source takes its destination's id.
    """
    metric = _as_array(metric)
    xp = namespace(metric)
    N = int(metric.shape[-2])
    n_pat = N - n_prefix
    if n_pat < 0:
        raise ValueError(f"{n_prefix} prefix tokens but only {N} tokens")
    r = min(int(r), n_pat // 2)
    dev = device(metric)
    lead = tuple(metric.shape[:-2])
    if r <= 0:
        return xp.broadcast_to(xp.arange(n_pat, dtype=xp.int64, device=dev), lead + (n_pat,))
    na, nb = (N + 1) // 2, N // 2
    pa, pb = (n_prefix + 1) // 2, n_prefix // 2  # protected tokens among a (even) and b (odd)
    if r > na - pa or nb - pb < 1:
        raise ValueError("not enough unprotected tokens to merge")
    m = normalize_rows(metric)
    a, b = m[..., 0::2, :], m[..., 1::2, :]
    scores = a @ xp.matrix_transpose(b)  # (..., na, nb)
    neg = xp.asarray(-xp.inf, dtype=scores.dtype, device=dev)
    rows = xp.arange(na, device=dev)[:, None] < pa
    cols = xp.arange(nb, device=dev)[None, :] < pb
    scores = xp.where(rows | cols, neg, scores)
    node_max = xp.max(scores, axis=-1)
    node_idx = xp.argmax(scores, axis=-1)
    edge = stable_argsort(node_max, descending=True)  # descending similarity, ties by sequence order
    rank = xp.argsort(edge, axis=-1)  # place of every a token in that order
    is_src = rank < r
    unmerged = xp.astype(~is_src, xp.int64)
    U = na - r - pa  # unmerged a patch tokens
    id_a = xp.where(is_src, U + xp.astype(node_idx, xp.int64) - pb, xp.cumulative_sum(unmerged, axis=-1) - 1 - pa)
    id_b = U + xp.arange(nb, dtype=xp.int64, device=dev) - pb
    id_b = xp.broadcast_to(id_b, lead + (nb,))
    if na > nb:
        id_b = xp.concat([id_b, xp.zeros(lead + (1,), dtype=xp.int64, device=dev)], axis=-1)
    full = xp.reshape(xp.stack([id_a, id_b], axis=-1), lead + (2 * na,))[..., :N]
    return full[..., n_prefix:]


# -- random (host) ----------------------------------------------------------------------------------
def random_keep(n: int, k: int, seed: int, stage: int = 0) -> np.ndarray:
    """``k`` distinct indices of ``0..n-1`` drawn uniformly (seeded by ``(seed, stage)``), sorted."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    rng = np.random.default_rng([int(seed), int(stage)])
    return np.sort(rng.permutation(n)[:k])


# -- DivPrune -----------------------------------------------------------------------------------------
def cosine_distance(v):
    """``D = 1 − cos`` of the rows of ``v (n, d)``: ``(n, n)`` in the work dtype, zero diagonal, ``≥ 0``."""
    v = _as_array(v)
    xp = namespace(v)
    v = as_work(v, xp)
    u = v / xp.clip(xp.linalg.vector_norm(v, axis=1, keepdims=True), 1e-12, None)
    d = 1.0 - u @ xp.matrix_transpose(u)
    n = d.shape[0]
    eye = xp.eye(n, dtype=xp.bool, device=device(d))
    return xp.clip(xp.where(eye, xp.zeros_like(d), d), 0.0, None)


def divprune_select(v, k: int):
    """Greedy max–min diversity selection.

    Parameters
    ----------
    v : (n, d) features. k : tokens to select, ``1 ≤ k ≤ n``.

    Returns
    -------
    order : (k,) indices in the order the greedy picked them.
    gains : (k,) the selection score of each pick (``m_0`` = second-smallest column value,
        ``m_i = max_j min_{t<i} D[s_t, j]``); non-increasing for ``i ≥ 1``.
    dist : (n,) distance of every token to the selected set (0 for the selected ones).

    The loop stays on the device (no value is read back between picks).
    """
    d = cosine_distance(v)
    xp = namespace(d)
    n = d.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} tokens")
    dev = device(d)
    if n == 1:
        return (xp.zeros(1, dtype=xp.int64, device=dev), xp.zeros(1, dtype=d.dtype, device=dev),
                xp.zeros(1, dtype=d.dtype, device=dev))
    first = xp.sort(d, axis=0)[1]  # second-smallest value of every column
    s0 = xp.argmax(first)
    order, gains = [s0], [first[s0]]
    selected = xp.zeros(n, dtype=xp.bool, device=dev)
    selected[s0] = True
    running = xp.asarray(d[s0], copy=True)
    neg = xp.asarray(-xp.inf, dtype=d.dtype, device=dev)
    for _ in range(1, k):
        score = xp.where(selected, neg, running)
        j = xp.argmax(score)
        order.append(j)
        gains.append(score[j])
        selected[j] = True
        running = xp.minimum(running, d[j])
    running = xp.where(selected, xp.zeros_like(running), running)
    return xp.astype(xp.stack(order), xp.int64), xp.stack(gains), running


# -- clustering -----------------------------------------------------------------------------------------
def pairwise_distances(X):
    """Euclidean distances ``(n, n)`` between the rows of ``X`` in the work dtype, by the Gram form
    ``sqrt(|x|² + |y|² − 2 x·y)`` (one matrix product, as ``torch.cdist`` computes them for more
    than 25 points), clipped at 0, with an exact zero diagonal."""
    X = _as_array(X)
    xp = namespace(X)
    X = as_work(X, xp)
    sq = xp.sum(X * X, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (X @ xp.matrix_transpose(X))
    d = xp.sqrt(xp.clip(d2, 0.0, None))
    n = d.shape[0]
    return xp.where(xp.eye(n, dtype=xp.bool, device=device(d)), xp.zeros_like(d), d)


def assign_to_centers(D, centers):
    """Nearest centre of every token (``argmin D[:, centers]``), each centre in its own cluster."""
    xp = namespace(D)
    assign = xp.argmin(D[:, centers], axis=1)
    assign[centers] = xp.arange(centers.shape[0], dtype=assign.dtype, device=device(D))
    return assign


def dpc_knn(X, K: int, k: int = 5):
    """Density-peak clustering with k nearest neighbours on ``X (n, C)``.

    ``d_ij = ||x_i - x_j|| / sqrt(C)``; local density ``ρ_i = exp(-mean_{j ∈ kNN(i)} d_ij²)`` over
    the ``k`` nearest neighbours (the token itself included); distance indicator ``δ_i = min_{j:
    ρ_j > ρ_i} d_ij`` (``max d`` for the densest token); ``score = ρ · δ``; the ``K`` tokens with
    the highest score are the centres; every token joins its nearest centre.

    Returns ``(labels (n,), centers (K,), score (n,))``: cluster ids ``0..K-1`` in the centres'
    score order. Equal densities are ordered by token index (the official code adds 1e-6 random
    noise instead).
    """
    X = _as_array(X)
    D = pairwise_distances(X)
    xp = namespace(D)
    n, C = X.shape
    D = D / float(np.sqrt(C))
    K = max(1, min(int(K), n))
    kk = max(1, min(int(k), n))
    nearest = xp.sort(D, axis=1)[:, :kk]
    density = xp.exp(-xp.mean(nearest ** 2, axis=1))
    order = stable_argsort(density, descending=True)  # densest first, ties by index
    rank = xp.argsort(order)  # 0 = densest
    higher = rank[None, :] < rank[:, None]  # higher[i, j]: j is denser than i
    inf = xp.asarray(xp.inf, dtype=D.dtype, device=device(D))
    dist = xp.min(xp.where(higher, D, inf), axis=1)
    dist = xp.where(xp.any(higher, axis=1), dist, xp.max(D))
    score = dist * density
    centers = xp.astype(stable_argsort(score, descending=True)[:K], xp.int64)
    return assign_to_centers(D, centers), centers, score


def relabel(labels) -> np.ndarray:
    """Cluster labels renumbered ``0..G-1`` in order of first occurrence (*host*)."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


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
    n, n_orig = state.n_patches, state.n_original
    if state.stage >= state.n_stages - 1:
        k = keep_count(keep, n_orig, "floor")
    else:
        k = keep_count(keep ** ((state.stage + 1) / state.n_stages), n_orig, "floor")
    return max(1, min(n, k))


def token_metric(state: TokenState, which: str):
    """``(..., n_patches, d)`` patch-token descriptors in the work dtype: ``"features"`` the tokens
    ``x`` (after the block's attention), ``"keys"`` the block's head-mean keys."""
    p = state.n_prefix
    xp = state.xp
    if which == "keys":
        return xp.mean(as_work(state.keys, xp), axis=-3)[..., p:, :]
    return as_work(state.x, xp)[..., p:, :]


def attention_received(state: TokenState):
    """``(n_patches,)`` attention each patch token receives: ``Σ_h Σ_q A[h, q, i]``."""
    if state.attention is None:
        raise ValueError("attention-weighted K-Medoids needs the block's attention")
    xp = state.xp
    return xp.sum(as_work(state.attention, xp), axis=(-3, -2))[..., state.n_prefix:]


# -- top-k -------------------------------------------------------------------------------------------
def top_k_sorted(scores, k: int):
    """Indices of the ``k`` largest ``scores`` (ties: lower index first), sorted ascending."""
    scores = _as_array(scores)
    xp = namespace(scores)
    order = stable_argsort(as_work(scores, xp), descending=True)
    return xp.sort(order[..., :k], axis=-1)


# -- DART pivot order (host) -------------------------------------------------------------------------
DART_PIVOT_ORDERS = ("official", "key_norm", "position")


def dart_pivot_order(positions, order: str = "official") -> list[int]:
    """The order in which DART visits its pivots, as indices into ``positions`` (*host*).

    ``positions`` are the pivots' sequence positions in the official insertion order: the image
    pivots by descending key L1 norm (``topk``), then the text pivots by descending key L1 norm.

    * ``official``: ``DART.get_retained_image_token`` (``ZichenWen1/DART``,
      ``llava/model/language_model/modeling_llama_self.py``) builds
      ``indices_set = set(image_indices + query_indices)`` from these positions and iterates
      ``list(indices_set)``, so the pivots are visited in CPython's set order (small ints hash to
      themselves: position modulo the table size, collisions probed). The same ``set`` is built here
      from the same ints in the same insertion order and iterated, which reproduces that order.
    * ``key_norm``: the insertion order itself (image pivots by descending key norm, then text).
    * ``position``: ascending sequence position.
    """
    pos = [int(p) for p in positions]
    if order == "official":
        where = {p: i for i, p in enumerate(pos)}
        if len(where) != len(pos):
            raise ValueError("DART pivot positions must be distinct")
        return [where[p] for p in set(pos)]
    if order == "key_norm":
        return list(range(len(pos)))
    if order == "position":
        return sorted(range(len(pos)), key=pos.__getitem__)
    raise ValueError(f"unknown DART pivot order {order!r}; use one of {', '.join(DART_PIVOT_ORDERS)}")


# -- pooling (host) -----------------------------------------------------------------------------------
def pool_stride(keep: float, stride: int = 0) -> int:
    """The window size: ``stride`` when set, else ``round(1/sqrt(keep))`` (at least 1)."""
    if stride > 0:
        return int(stride)
    return max(1, int(round(1.0 / np.sqrt(keep))))


def pool_groups(positions: np.ndarray, s: int) -> np.ndarray:
    """Group id of every token: its ``s×s`` window (kernel = stride = ``s``), numbered ``0..G-1``
    in raster order of the windows."""
    win = np.floor(np.asarray(positions) / s + 1e-9).astype(np.int64)
    key = win[:, 0] * (int(win[:, 1].max()) + 1) + win[:, 1]
    return np.unique(key, return_inverse=True)[1].reshape(-1)
