"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024).

Official code (https://github.com/pkunlp-icler/FastV, ``LlamaModel.forward`` with ``USE_FAST_V`` /
``FASTV_INPLACE``, and its llava-hf ``fastv_forward``; llmc's ``fastv.py``):

* before LLM layer ``K`` (``fast_v_agg_layer``), score every image token by the attention the
  **last prompt token** pays it at layer ``K−1``, averaged over the heads:
  ``s_i = mean_h A^{(K−1)}[−1, s0 + i]`` (``state.last_row``: the backend's probe recomputes
  that one row from the layer's post-RoPE queries and keys, so fused kernels stay on);
* keep the top ``ATTENTION_RANK = round(n·(1 − R))`` image tokens (llmc's rounding; ``keep =
  1 − R``), drop the rest from the sequence for every later layer and decoding step (the in-place
  mode); the survivors keep their original position ids; layers ``< K`` keep every token (their
  KV cache too);
* ``K = 0``: a random subset of ``ATTENTION_RANK`` tokens (FastV's built-in baseline; the official
  code masks them in the attention, here they are removed — same outputs), seeded by ``seed``.

Ties in the attention are broken by image-token order (stable sort). ``keep = 1`` (``R = 0``)
keeps every token and reproduces the unpruned model exactly. The ranking runs where the model runs
(array API); only the ``k`` kept indices are read back.

Checked against the official selection lines (``tests/golden/fastv.npz``): identical kept sets on
seeded attention and on the tiny demo VLM end to end.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from explorer.core.generation import PruneDecision, PruneState
from explorer.plugin_host.vlm import VlmPruningMethod, VlmPruningParams
from explorer_plugins.common.selection import random_keep, top_k_sorted

__all__ = ["VlmFastV", "top_k"]


def top_k(scores, k: int):
    """Indices of the ``k`` largest ``scores`` (ties: lower index first), sorted ascending, in the
    scores' namespace (on their device)."""
    return top_k_sorted(scores if hasattr(scores, "dtype") else np.asarray(scores, dtype=np.float64), k)


class VlmFastVParams(VlmPruningParams):
    keep: float = Field(0.5, gt=0.0, le=1.0, description="1 − R: fraction of the image tokens kept, ATTENTION_RANK "
                        "= round(n·keep). The paper's headline is R = 50%; the HF demo uses R = 75% (keep 0.25).")
    layer: int = Field(2, ge=0, description="K (fast_v_agg_layer): the tokens are dropped before LLM layer K, "
                       "ranked by the last prompt token's attention at layer K−1. K = 0: a random subset.")
    seed: int = Field(0, ge=0, description="Seed of the random subset used when K = 0.")


class VlmFastV(VlmPruningMethod):
    """FastV inside the language model (see module docstring)."""

    Params = VlmFastVParams

    def decide(self, state: PruneState, params) -> PruneDecision:
        n = len(state.image)
        k = self.keep_count(params, n)
        if state.layer == 0:
            return PruneDecision(keep=random_keep(n, k, params.seed))
        if state.last_row is None or state.last_row.shape[-1] != n:
            raise ValueError("FastV needs the last prompt token's attention of the previous layer")
        return PruneDecision(keep=top_k(state.last_row, k), scores=state.last_row)
