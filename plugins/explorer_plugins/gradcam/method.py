"""ALBEF-style Grad-CAM on attention, adapted to CLIP (Li et al., NeurIPS 2021).

Official code: ``salesforce/ALBEF``, ``Grounding.py::val``. ALBEF's default (``itm``) mode reads
the *cross*-attention of its fusion encoder (text queries to image keys) under the ITM head; CLIP
has two separate towers, no cross-attention and no ITM head, so the counterpart implemented here is
ALBEF's ``itc`` mode: the image tower's self-attention at block ``block_num`` and the contrastive
logit as the target (ALBEF ``image_feat · text_feat / temp``; CLIP ``logit_scale * cos``)::

    cam  = attn[:, 0, 1:]                 # (H, n) [CLS] query row, image keys only
    grad = clamp(grad[:, 0, 1:], min=0)   # gradient of the logit w.r.t. the probabilities
    gradcam = (cam * grad).mean(over heads)

ALBEF's ``--block_num`` defaults to 8 of 12 blocks; the default here is ``-4`` (the same block for
a 12-block tower). Negative layers count from the last block and stop at block 0 (a model with
fewer than 4 blocks uses block 0). Result: ``(n_image_tokens,)`` in image-token order, ``≥ 0``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import as_work, namespace
from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer_plugins.common.gradients import prompt_inputs

__all__ = ["attention_gradcam", "block_index", "AttentionGradCam"]


def attention_gradcam(attention, gradient, query: int = 0):
    """``(H, N, N)`` attention and gradient -> ``mean_h attn[:, q, :] * clamp(grad[:, q, :], 0)`` ``(N,)``
    over every key of the sequence (take the image tokens with ``layout.gather``); in the arrays'
    namespace (work dtype)."""
    xp = namespace(attention, gradient)
    if tuple(attention.shape) != tuple(gradient.shape) or attention.ndim != 3:
        raise ValueError(f"attention {tuple(attention.shape)} and gradient {tuple(gradient.shape)} must both be (H, N, N)")
    a, g = as_work(attention[:, query, :], xp), as_work(gradient[:, query, :], xp)
    return xp.mean(a * xp.clip(g, 0.0, None), axis=0)


def block_index(layer: int, n_layers: int) -> int:
    """Negative layers count from the end and stop at block 0; others must exist."""
    if layer < 0:
        return max(n_layers + layer, 0)
    return resolve_layer(layer, n_layers, "layer")


class AttentionGradCam(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        layer: int = Field(
            -4, description="Block whose [CLS] attention is used (negative counts from the last; -4 = "
            "ALBEF's block 8 of 12; stops at block 0).", json_schema_extra={"role": "layer"})
        prompt_index: int = Field(0, ge=0, description="Which prompt's logit is explained.")

    def capture(self, params, model, target):
        block_index(params.layer, model.n_layers)
        return CaptureSpec()  # attention and its gradient come from the backend's gradient pass

    def run(self, trace, params, *, target, cancel, backend=None):
        layer = block_index(params.layer, trace.model.n_layers)
        prepared, emb, prompt = prompt_inputs(trace, params, backend, "Grad-CAM")
        cls = trace.layout.cls_index
        if cls is None:
            raise ParamError("Grad-CAM (ITC) reads the [CLS] query row; this model has no [CLS] token")
        yield Progress(0.0, "forward and backward pass")
        cancel.raise_if_cancelled()
        gp = backend.gradient_pass(prepared, emb, attention_layers=[layer], cancel=cancel)
        cancel.raise_if_cancelled()
        row = attention_gradcam(gp.attentions[layer], gp.attention_grads[layer], cls)
        return Heatmap(
            layout=trace.layout,
            token_values=trace.layout.gather(row),
            label=f"Grad-CAM (attention, block {layer}) for {prompt!r}",
            meta={"prompt": prompt, "layer": layer, "score": gp.score},
        )
