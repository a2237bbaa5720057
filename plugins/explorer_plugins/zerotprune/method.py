"""Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024) as far as the paper specifies it.

No official code was found; this follows the abstract and the paper as
remembered (marked [unverified] there). Implemented:

* **I-stage** (importance): every head's attention ``A (N, N)`` (row = query, column = key) is
  the adjacency of a directed graph over all tokens ([CLS] included) and a weighted PageRank
  runs on it: ``s⁽⁰⁾ = 1/N``, ``s⁽ᵗ⁺¹⁾_j ∝ Σ_i A_ij s⁽ᵗ⁾_i`` (importance flows from the tokens
  that attend to ``j``), renormalised to sum 1 at every step (the paper's ``1/N`` factor only
  shrinks the sum), for ``iterations`` steps. Heads are aggregated by their mean. The
  ``r_I`` least important patch tokens are pruned.
* **S-stage** (similarity): the surviving patch tokens are split by importance into the more
  important half ``A`` (``ceil(m/2)`` tokens) and the rest ``B``; every token of ``B`` is matched
  to its most similar token of ``A`` (cosine of the head-mean keys, ToMe's metric); the ``r_S``
  tokens of ``B`` with the highest similarity are pruned (not merged).

``r_I + r_S = n − k`` with ``k = ceil(keep · n)``; ``r_I = round(importance_share · (n − k))``,
raised when ``B`` is too small for ``r_S``. Kept tokens are returned in sequence order.

Not implemented (the description in the abstract is not enough to reproduce them): the variance-based
head filter and the emphasis on informative regions; the split of the budget between the two
stages (``importance_share``), the importance-guided partition (more important half vs the rest)
and the default iteration count are this implementation's choices, not verified against the
paper.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from explorer.core.arrays import as_work, device, namespace, stable_argsort
from explorer.core.reduction import ReductionStep, TokenState
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams

__all__ = ["ZeroTPrune", "weighted_pagerank", "split_budget", "s_stage_drop"]


def weighted_pagerank(attention, iterations: int = 30):
    """Per-head weighted PageRank on attention graphs, in the array's namespace (work dtype).

    Parameters
    ----------
    attention : (H, N, N) or (N, N) row-stochastic attention (row = query).
    iterations : power-iteration steps ``s ← Aᵀ s`` (renormalised to sum 1 each step).

    Returns
    -------
    (H, N) (or (N,)) non-negative scores, each row summing to 1.
    """
    if not hasattr(attention, "dtype"):
        attention = np.asarray(attention, dtype=np.float64)
    xp = namespace(attention)
    a = as_work(attention, xp)
    single = a.ndim == 2
    if single:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"attention must be (H, N, N), got {tuple(a.shape)}")
    if iterations < 0:
        raise ValueError("iterations must be non-negative")
    n = a.shape[-1]
    s = xp.full((a.shape[0], 1, n), 1.0 / n, dtype=a.dtype, device=device(a))
    for _ in range(iterations):
        s = s @ a  # s_j ← Σ_i s_i A_ij
        s = s / xp.clip(xp.sum(s, axis=-1, keepdims=True), 1e-300, None)
    s = s[:, 0, :]
    return s[0] if single else s


def split_budget(n: int, k: int, share: float) -> tuple[int, int]:
    """``(r_I, r_S)``: tokens pruned by the I-stage and by the S-stage for ``n → k``."""
    r = n - k
    r_i = int(np.floor(share * r + 0.5))
    r_s = r - r_i
    while r_s > (n - r_i) // 2:  # the S-stage prunes at most the less important half
        r_i, r_s = r_i + 1, r_s - 1
    return r_i, r_s


def s_stage_drop(survivors, metric, r_s: int):
    """Tokens the S-stage prunes.

    ``survivors`` are token indices sorted by descending importance; ``metric (n, d)`` the
    similarity features of all tokens. The more important ``ceil(m/2)`` form group A, the rest B;
    the ``r_s`` tokens of B most cosine-similar to their best match in A are returned.
    """
    if not hasattr(survivors, "dtype"):
        survivors = np.asarray(survivors, dtype=np.int64)
    xp = namespace(survivors)
    if r_s <= 0:
        return xp.zeros(0, dtype=xp.int64, device=device(survivors))
    m = survivors.shape[0]
    a_idx, b_idx = survivors[: (m + 1) // 2], survivors[(m + 1) // 2:]
    if r_s > b_idx.shape[0]:
        raise ValueError(f"the S-stage cannot prune {r_s} of {b_idx.shape[0]} tokens")
    metric = metric if hasattr(metric, "dtype") else np.asarray(metric)
    u = as_work(metric, namespace(metric))
    u = u / xp.clip(xp.linalg.vector_norm(u, axis=1, keepdims=True), 1e-12, None)
    redundancy = xp.max(u[b_idx] @ xp.matrix_transpose(u[a_idx]), axis=1)
    return b_idx[stable_argsort(redundancy, descending=True)[:r_s]]


class ZeroTPrune(ReductionMethod):
    """Zero-TPrune's I-stage and S-stage at one block (see module docstring)."""

    host_only = False  # array API: decided on the device

    class Params(ReductionParams):
        iterations: int = Field(30, ge=1, le=1000, description="Weighted-PageRank power iterations on each "
                                "head's attention graph (renormalised every step) [default not verified].")
        importance_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of the pruned tokens removed "
                                        "by the I-stage (least important); the S-stage removes the rest "
                                        "(most redundant of the less important half) [not verified].")

    def reduce(self, state: TokenState, params) -> ReductionStep:
        if state.attention is None:
            raise ValueError("Zero-TPrune needs the block's attention")
        xp = state.xp
        p0, n = state.n_prefix, state.n_patches
        importance = xp.mean(weighted_pagerank(state.attention, params.iterations), axis=0)[p0:]
        k = self.stage_keep(params, state, "ceil")
        if k >= n:
            return ReductionStep(keep=xp.arange(n, device=device(importance)), scores=importance)
        r_i, r_s = split_budget(n, k, params.importance_share)
        ranked = stable_argsort(importance, descending=True)
        survivors = ranked[: n - r_i]
        metric = xp.mean(as_work(state.keys, xp), axis=0)[p0:]  # head-mean keys (ToMe's metric)
        dropped = s_stage_drop(survivors, metric, r_s)
        keep = xp.zeros(n, dtype=xp.bool, device=device(importance))
        keep[survivors] = True
        keep[dropped] = False
        return ReductionStep(keep=xp.nonzero(keep)[0], scores=importance)
