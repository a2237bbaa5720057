"""DivPrune: diversity-based token pruning (Alvar et al., CVPR 2025).

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
Zero vectors get norm ``1e-12`` (the official code would divide by zero). The greedy runs where
the tokens are (array API: numpy on the CPU, the model's device otherwise).
"""

from __future__ import annotations

import numpy as np

from explorer.core.arrays import index_array
from explorer.core.reduction import ReductionStep, TokenState
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams
from explorer_plugins.common.selection import cosine_distance, divprune_select

__all__ = ["DivPrune", "cosine_distance", "divprune_select"]


class DivPrune(ReductionMethod):
    """DivPrune at a block of the vision encoder (see module docstring)."""

    Params = ReductionParams
    host_only = False  # array API: the greedy runs on the device

    def attention_need(self, params) -> str:
        return "none"

    def capture(self, params, model, target):
        first = self.stages(params, model)[0]
        return CaptureSpec(hidden_layers={first})

    def reduce(self, state: TokenState, params) -> ReductionStep:
        n = state.n_patches
        k = self.stage_keep(params, state, "round")
        xp = state.xp
        order, gains, dist = divprune_select(state.x[state.n_prefix:], k)
        # display score: the greedy gain of a kept token, the distance to the kept set otherwise
        scores = xp.asarray(dist, copy=True)
        scores[order] = gains
        if k >= n:
            return ReductionStep(keep=index_array(np.arange(n), scores), scores=scores)
        return ReductionStep(keep=xp.sort(order), scores=scores)
