"""DivPrune: diversity-based token pruning (Alvar et al., CVPR 2025; catalog A7).

Keep the ``k`` tokens that solve the Max–Min Diversity Problem greedily on the cosine distance
``D = 1 − cos(V, V)`` of the token features, exactly as the official
``LlavaMetaForCausalLM.DivPrune`` (``vbdi/divprune``, ``llava/model/llava_arch.py``):

* ``k = int(round(ratio · n))`` (``ratio`` = the kept fraction, ``SUBSET_RATIO``);
* the first token is ``argmax_j`` of the *second-smallest* value of column ``j`` of ``D`` (its
  nearest neighbour's distance; the smallest is the zero self-distance);
* then repeatedly ``argmax_j min_{t<i} D[s_t, j]`` (farthest from the current set); the official
  loop recomputes the minimum over all selected rows (``O(k²n)``), a running minimum gives the
  same picks in ``O(kn)``;
* the kept indices are re-sorted into sequence order.

Adaptation (encoder): ``V`` = the patch tokens of the reduction block (``state.x`` after the
block's attention, [CLS] excluded), not the projected LLM input embeddings. Exactness notes: ``D``
is computed in float64 with its diagonal set to the exact 0 and negative round-off clipped to 0;
already-selected tokens are masked out of the argmax, so the ``k`` indices are distinct even when
only exact duplicates remain (where the official loop could pick a selected index again).
Zero vectors get norm ``1e-12`` (the official code would divide by zero).
"""

from __future__ import annotations

import numpy as np

from explorer.core.reduction import ReductionStep, TokenState
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams

__all__ = ["DivPrune", "cosine_distance", "divprune_select"]


def cosine_distance(v: np.ndarray) -> np.ndarray:
    """``D = 1 − cos`` of the rows of ``v (n, d)``: ``(n, n)`` float64, zero diagonal, ``≥ 0``."""
    v = np.asarray(v, dtype=np.float64)
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    d = 1.0 - u @ u.T
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, None)


def divprune_select(v: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    """
    d = cosine_distance(v)
    n = d.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} tokens")
    if n == 1:
        return np.zeros(1, np.int64), np.zeros(1), np.zeros(1)
    first = np.partition(d, 1, axis=0)[1]  # second-smallest value of every column
    s0 = int(np.argmax(first))
    order, gains = [s0], [float(first[s0])]
    selected = np.zeros(n, dtype=bool)
    selected[s0] = True
    running = d[s0].copy()
    for _ in range(1, k):
        score = np.where(selected, -np.inf, running)
        j = int(np.argmax(score))
        order.append(j)
        gains.append(float(score[j]))
        selected[j] = True
        running = np.minimum(running, d[j])
    running[selected] = 0.0
    return np.asarray(order, dtype=np.int64), np.asarray(gains), running


class DivPrune(ReductionMethod):
    """DivPrune at a block of the vision encoder (see module docstring)."""

    Params = ReductionParams

    def capture(self, params, model, target):
        first = self.stages(params, model)[0]
        return CaptureSpec(hidden_layers={first})

    def reduce(self, state: TokenState, params) -> ReductionStep:
        n = state.n_patches
        k = self.stage_keep(params, state, "round")
        order, gains, dist = divprune_select(state.x[state.n_prefix:], k)
        # display score: the greedy gain of a kept token, the distance to the kept set otherwise
        scores = dist.copy()
        scores[order] = gains
        if k >= n:
            return ReductionStep(keep=np.arange(n), scores=scores)
        return ReductionStep(keep=np.sort(order), scores=scores)
