"""Chefer et al., generic attention-model explainability (ICCV 2021).

Official code: ``hila-chefer/Transformer-MM-Explainability``, ``CLIP_explainability.ipynb``
(``interpret``). One forward and backward pass of the target ``y`` (for CLIP: the image-text logit
``logit_scale * cos(image, text)`` of the chosen prompt, the diagonal entry of
``logits_per_image`` the notebook backpropagates), then per used block ``l``:

* rule 5: ``Ā_l = E_h[(∇_A y ⊙ A)^+]`` with ``A (H, N, N)`` the post-softmax attention
  probabilities and ``∇_A y`` their gradient; ``(·)^+`` clamps at 0; the mean is over heads;
* rule 6: starting from ``R = I_N``, ``R ← R + Ā_l · R`` for ``l = start_layer .. L-1``.

The map is ``R[cls, image tokens]`` (``R[0, 1:]`` for CLIP), in image-token order. The official
CLIP notebook uses only the last block (``start_layer = -1``), the default here; ``start_layer = 0``
uses every block (the ViT notebook). Invariants: ``R ≥ 0``, ``diag(R) ≥ 1``; zero gradients give
``R = I`` (an all-zero map); with one block, scaling ``y`` by ``c > 0`` scales ``R − I`` by ``c``.

The pass's attention and gradients stay on the model's device; only the [CLS] row of ``R`` is
computed (a vector-matrix chain) and comes to the host.
"""

from __future__ import annotations

from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import as_work, device, namespace
from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer_plugins.common.gradients import prompt_inputs

__all__ = ["layer_relevance", "chefer_relevance", "relevance_row", "prompt_inputs", "Chefer"]


def layer_relevance(attention, gradient):
    """Rule 5: ``(H, N, N)`` attention and its gradient -> ``Ā = mean_h clamp(grad ⊙ attn, 0)``
    ``(N, N)``, in the arrays' namespace (work dtype: float64 on the CPU, float32 on a device)."""
    xp = namespace(attention, gradient)
    if tuple(attention.shape) != tuple(gradient.shape) or attention.ndim != 3:
        raise ValueError(f"attention {tuple(attention.shape)} and gradient {tuple(gradient.shape)} must both be (H, N, N)")
    a, g = as_work(attention, xp), as_work(gradient, xp)
    return xp.mean(xp.clip(g * a, 0.0, None), axis=0)


def chefer_relevance(attentions: Sequence, gradients: Sequence):
    """Rule 6 over blocks given first block first: ``R = I``; ``R ← R + Ā_l R``. Returns ``(N, N)``."""
    if len(attentions) != len(gradients) or not attentions:
        raise ValueError("give one gradient per attention, at least one block")
    R = None
    for a, g in zip(attentions, gradients):
        rel = layer_relevance(a, g)
        if R is None:
            xp = namespace(rel)
            R = xp.eye(rel.shape[-1], dtype=rel.dtype, device=device(rel))
        R = R + rel @ R
    return R


def relevance_row(attentions: Sequence, gradients: Sequence, row: int):
    """Row ``row`` of :func:`chefer_relevance`'s ``R`` as a vector-matrix chain from the last block
    down: ``e_row (I + Ā_e) ⋯ (I + Ā_s)``, ``O(L·N²)``. ``(N,)`` in the arrays' namespace."""
    v = None
    for a, g in zip(reversed(list(attentions)), reversed(list(gradients))):
        rel = layer_relevance(a, g)
        if v is None:
            xp = namespace(rel)
            v = xp.astype(xp.arange(rel.shape[-1], device=device(rel)) == row, rel.dtype)
        v = v + v @ rel
    if v is None:
        raise ValueError("give one gradient per attention, at least one block")
    return v


class Chefer(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        start_layer: int = Field(
            -1, description="First block used (negative counts from the last; -1 = only the last block, "
            "the official CLIP notebook; 0 = every block).", json_schema_extra={"role": "layer"})
        prompt_index: int = Field(0, ge=0, description="Which prompt's logit is explained.")

    def _layers(self, params, n_layers: int) -> list[int]:
        return list(range(resolve_layer(params.start_layer, n_layers, "start_layer"), n_layers))

    def capture(self, params, model, target):
        # attention and gradients come from the backend's gradient pass, not from the trace
        self._layers(params, model.n_layers)
        return CaptureSpec()

    def run(self, trace, params, *, target, cancel, backend=None):
        layers = self._layers(params, trace.model.n_layers)
        prepared, emb, prompt = prompt_inputs(trace, params, backend, "Chefer relevance")
        cls = trace.layout.cls_index
        if cls is None:
            raise ParamError("Chefer relevance reads the [CLS] row; this model has no [CLS] token")
        yield Progress(0.0, "forward and backward pass")
        cancel.raise_if_cancelled()
        gp = backend.gradient_pass(prepared, emb, attention_layers=layers, cancel=cancel)
        yield Progress(0.7, "relevance")
        cancel.raise_if_cancelled()
        row = relevance_row([gp.attentions[l] for l in layers], [gp.attention_grads[l] for l in layers], cls)
        return Heatmap(
            layout=trace.layout,
            token_values=trace.layout.gather(row),
            label=f"Chefer relevance for {prompt!r}, blocks {layers[0]}-{layers[-1]}",
            meta={"prompt": prompt, "layers": layers, "score": gp.score},
        )
