"""DivPrune at the LLM input (Alvar et al., CVPR 2025).

As the official ``LlavaMetaForCausalLM.DivPrune`` (``vbdi/divprune``, ``llava/model/llava_arch.py``,
called at the end of ``prepare_inputs_labels_for_multimodal``; ``run_Divprune.sh``:
``LAYER_INDEX=0 SUBSET_RATIO=0.098``): the visual tokens *after the projector*, i.e. the image rows
of the LLM input embeddings ``state.hidden[state.image]``, are reduced to ``k = round(ratio·n)``
by the greedy max–min diversity selection on ``D = 1 − cos`` (first the token whose nearest
neighbour is farthest, then repeatedly the token farthest from the kept set), kept in sequence
order with their original position ids. The greedy is the shared
:func:`explorer_plugins.common.selection.divprune_select` (running minimum, already-selected tokens
masked out of the argmax; float64 on the CPU, float32 on a device, where the model runs).
Text-agnostic; no attention.

``layer > 0`` applies the same selection to the hidden states entering that LLM layer (llmc's
``divprune_post_hook`` variant); the paper's setting is ``layer = 0``.
"""

from __future__ import annotations

from pydantic import Field

from explorer.core.generation import PruneDecision, PruneState
from explorer.plugin_host.vlm import VlmPruningMethod, VlmPruningParams
from explorer.core.arrays import namespace, take
from explorer_plugins.common.selection import divprune_select

__all__ = ["VlmDivPrune"]


class VlmDivPruneParams(VlmPruningParams):
    keep: float = Field(0.098, gt=0.0, le=1.0, description="SUBSET_RATIO: fraction of the image tokens kept, "
                        "k = round(keep·n) (0.098 keeps 56 of LLaVA-1.5's 576).")
    layer: int = Field(0, ge=0, description="LAYER_INDEX: LLM layer before which the tokens are selected on its "
                       "input hidden states (0 = the projected visual tokens at the LLM input, the paper's setting).")
    seed: int = Field(0, ge=0, description="Unused (the greedy is deterministic); kept for the common form.")


class VlmDivPrune(VlmPruningMethod):
    """DivPrune inside the VLM (see module docstring)."""

    Params = VlmDivPruneParams

    def decide(self, state: PruneState, params) -> PruneDecision:
        v = take(state.hidden, state.image, axis=0)  # the image rows, where the model runs
        n = v.shape[0]
        k = self.keep_count(params, n)
        order, gains, dist = divprune_select(v, k)
        xp = namespace(dist)
        scores = xp.asarray(dist, copy=True)
        scores[order] = gains  # display: the greedy gain of a kept token, else its distance to the kept set
        return PruneDecision(keep=xp.sort(order), scores=scores)
