"""ToMe: Token Merging (Bolya et al., ICLR 2023; ``facebookresearch/ToMe``).

At every block from ``layer`` to the last, between attention and MLP, ``r`` tokens are merged
away by **bipartite soft matching** on the block's head-mean keys ``metric = mean_h K[h]``
``(N, d_h)``:

1. ``metric ← metric / ||metric||`` (cosine similarity);
2. alternate split over the *whole* sequence, [CLS] included at index 0: ``a = metric[0::2]``,
   ``b = metric[1::2]``;
3. ``scores = a bᵀ``; rows of protected tokens ([CLS], prefix tokens in ``a``) are ``-inf`` so
   they are never a source, columns of prefix tokens in ``b`` are ``-inf`` (the official
   distillation-token rule) so they are never a destination;
4. every ``a`` token's best match ``node_max, node_idx = scores.max(-1)``; the ``r`` ``a`` tokens
   with the highest ``node_max`` are the sources and merge into their ``b`` match;
5. ``r = min(r, (N - protected) // 2)``: at most half of the tokens per block.

The output order is the official ``cat([unmerged a (sorted), b])``; [CLS] stays first. It is
expressed as merge group ids over the *patch* tokens (full-sequence index ``j`` is patch token
``j - n_prefix``): unmerged ``a`` patch tokens take ``0..U-1`` in sequence order, the ``b`` patch
tokens ``U..G-1`` in sequence order, and a source takes its destination's id. The backend merges
by the size-weighted mean (``merge_wavg``) and adds ``log(size)`` to the attention logits of later
blocks when ``prop_attn`` is on (``apply_patch(prop_attn=True)`` is the official default).

Schedules (``tome/utils.py: parse_r``): a constant ``r``, or ``(r, inflection)`` with
``min = int(r (1 - inflection))``, ``max = 2 r - min``, linear over the blocks used
(``inflection = -1`` is the paper's decreasing schedule). With ``r = 0`` the schedule is derived
from ``keep``: ``R = N_patches - int(keep N_patches)`` tokens spread as evenly as possible over the
blocks used (earlier blocks take the remainder), each capped by the 50% rule, the catalog's
``r ≈ (1 - keep) N / L``.

Execution: every block keeps the fused attention kernel (``log(size)`` is an additive mask); the
matching runs on the device for the whole batch (:func:`explorer_plugins.common.selection.
bipartite_soft_matching`, array API) and nothing is read back until the run ends.
"""

from __future__ import annotations

from pydantic import Field

from explorer.core.arrays import as_work
from explorer.core.reduction import ReductionStep, TokenState, keep_count
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams, first_layer
from explorer_plugins.common.selection import bipartite_soft_matching, normalize_rows

__all__ = ["ToMe", "bipartite_soft_matching", "parse_r", "keep_schedule", "normalize_rows"]


def parse_r(num_layers: int, r: int, inflection: float = 0.0) -> list[int]:
    """ToMe's ``parse_r`` for ``(r, inflection)``: tokens removed at each of ``num_layers`` blocks.

    ``min = int(r (1 - inflection))``, ``max = 2 r - min``, ``r_i = int(min + i (max - min) /
    (num_layers - 1))``. One block takes ``min`` (the official code divides by zero there).
    """
    if num_layers <= 0:
        return []
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    if num_layers == 1:
        return [lo]
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


def keep_schedule(n_patches: int, n_prefix: int, n_layers: int, keep: float) -> list[int]:
    """Per-block ``r`` so that ``int(keep · n_patches)`` patch tokens remain after ``n_layers``
    blocks: the ``R`` tokens to remove are spread as evenly as possible (earlier blocks take the
    remainder), each block capped by ToMe's 50% rule (then fewer are removed)."""
    remaining = n_patches - keep_count(keep, n_patches, "floor")
    n_tok = n_patches + n_prefix
    out = []
    for i in range(n_layers):
        r = -(-remaining // (n_layers - i))
        r = max(0, min(r, (n_tok - n_prefix) // 2))
        out.append(r)
        n_tok -= r
        remaining -= r
    return out


class ToMe(ReductionMethod):
    """Token Merging by bipartite soft matching at every block from ``layer`` on (module docstring)."""

    proportional_attention = True
    host_only = False  # array API: matched on the device
    batched = True  # one matching per image, all images at once

    class Params(ReductionParams):
        keep: float = Field(0.5, gt=0.0, le=1.0, description=(
            "Used when r = 0: fraction of the patch tokens left after the last block; r per block is "
            "derived as (1 - keep)·N / blocks, spread evenly and capped at 50% per block."))
        layer: int = Field(0, description=(
            "First block that merges; ToMe merges in every block from here to the last (official: all "
            "blocks, layer 0). Negative counts from the last."), json_schema_extra={"role": "layer"})
        r: int = Field(0, ge=0, description=(
            "Tokens merged away per block (ToMe's native knob, e.g. 13 for ViT-B/16 at 224 px); capped at "
            "half of the tokens per block. 0: derive the schedule from keep."))
        inflection: float = Field(0.0, ge=-1.0, le=1.0, description=(
            "Schedule shape of parse_r((r, inflection)) when r > 0: 0 constant, -1 decreasing (2r down to 0, "
            "the paper's decreasing schedule), +1 increasing."))
        prop_attn: bool = Field(True, description=(
            "Proportional attention: add log(size) to the attention logits of later blocks (official "
            "apply_patch default; the README turns it off for off-the-shelf MAE)."))

    def stages(self, params, model):
        return list(range(first_layer(params.layer, model.n_layers), model.n_layers))

    def is_merging(self, params) -> bool:
        return True

    def schedule(self, params, n_patches: int, n_prefix: int, n_layers: int) -> list[int]:
        """Requested ``r`` per block used (before the per-block cap when ``r`` is given)."""
        if params.r > 0:
            return parse_r(n_layers, params.r, params.inflection)
        return keep_schedule(n_patches, n_prefix, n_layers, params.keep)

    def attention_need(self, params) -> str:
        return "none"  # the keys are the metric: every block keeps the fused kernel

    def reduce(self, state: TokenState, params) -> ReductionStep:
        sched = self.schedule(params, state.n_original, state.n_prefix, state.n_stages)
        r = sched[state.stage] if state.stage < len(sched) else 0
        xp = state.xp
        metric = xp.mean(as_work(state.keys, xp), axis=-3)  # head-mean keys (..., N, d_h)
        group = bipartite_soft_matching(metric, r, state.n_prefix)
        n_pat = state.n_patches
        return ReductionStep(merge=group, n_groups=n_pat - min(int(r), n_pat // 2) if r > 0 else n_pat)
