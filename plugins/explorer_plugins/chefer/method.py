"""Chefer et al., generic attention-model explainability (ICCV 2021; catalog B2).

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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer

__all__ = ["layer_relevance", "chefer_relevance", "Chefer"]


def layer_relevance(attention: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Rule 5: ``(H, N, N)`` attention and its gradient -> ``Ā = mean_h clamp(grad ⊙ attn, 0)`` ``(N, N)``."""
    a = np.asarray(attention, dtype=np.float64)
    g = np.asarray(gradient, dtype=np.float64)
    if a.shape != g.shape or a.ndim != 3:
        raise ValueError(f"attention {a.shape} and gradient {g.shape} must both be (H, N, N)")
    return np.clip(g * a, 0.0, None).mean(0)


def chefer_relevance(attentions: Sequence[np.ndarray], gradients: Sequence[np.ndarray]) -> np.ndarray:
    """Rule 6 over blocks given first block first: ``R = I``; ``R ← R + Ā_l R``. Returns ``(N, N)``."""
    if len(attentions) != len(gradients) or not attentions:
        raise ValueError("give one gradient per attention, at least one block")
    n = np.asarray(attentions[0]).shape[-1]
    R = np.eye(n)
    for a, g in zip(attentions, gradients):
        R = R + layer_relevance(a, g) @ R
    return R


def prompt_inputs(trace, params, backend, title: str):
    """``(prepared image, text embedding (E,), prompt)`` for a gradient method's run."""
    if backend is None:
        raise ParamError(f"{title} needs the loaded model")
    if trace.text is None or not trace.text.prompts:
        raise ParamError(f"{title} needs a text prompt")
    n = len(trace.text.prompts)
    if params.prompt_index >= n:
        raise ParamError(f"prompt_index {params.prompt_index}: only {n} prompt(s) given")
    prepared = backend.prepared_for(trace)
    return prepared, np.asarray(trace.text.embeddings[params.prompt_index]), trace.text.prompts[params.prompt_index]


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
        R = np.eye(trace.layout.n_tokens)
        for i, l in enumerate(layers):
            cancel.raise_if_cancelled()
            R = R + layer_relevance(gp.attentions[l], gp.attention_grads[l]) @ R
            yield Progress(0.7 + 0.3 * (i + 1) / len(layers), f"relevance block {l}")
        return Heatmap(
            layout=trace.layout,
            token_values=trace.layout.gather(R[cls]),
            label=f"Chefer relevance for {prompt!r}, blocks {layers[0]}-{layers[-1]}",
            meta={"prompt": prompt, "layers": layers, "score": gp.score},
        )
