"""MaskCLIP dense similarity (Zhou, Loy & Dai, ECCV 2022; catalog B6).

The last block is rerun from its input ``x`` (captured in the trace) with the attention replaced
by the identity: ``y = x + out_proj(v)`` with ``v`` from ``in_proj(ln_1 x)``, then
``y = y + FFN(ln_2 y)``, ``ln_post`` and ``proj`` on every token. [CLS] is dropped. The map of a
prompt is the cosine similarity of each patch feature with the prompt's text embedding; with
``softmax`` the map is the prompt's probability against the other prompts at the model's logit
scale. Only the last block runs again, never the whole tower.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError


def identity_attention(adapter, q, k, v):
    """MaskCLIP's last-block attention: every token attends to itself only (output = v)."""
    return v


def dense_features(backend, trace) -> np.ndarray:
    """``(N, E)`` L2-normalised MaskCLIP features of every token of the vision sequence."""
    import torch

    last = trace.model.n_layers - 1
    with backend.lock, torch.inference_mode():
        x = backend.to_tensor(trace.hidden(last))
        y = backend.run_block(last, x, attention=identity_attention, residual=True, ffn=True)
        f = backend.project_tokens(y)[0].float()
        f = torch.nn.functional.normalize(f, dim=-1)
    return f.cpu().numpy()


def similarity_maps(features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(T, n)`` of normalised patch features ``(n, E)`` with text ``(T, E)``."""
    t = text / np.linalg.norm(text, axis=-1, keepdims=True)
    return t @ features.T


class MaskClip(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt_index: int = Field(0, ge=0, description="Which prompt's map to show.")
        mode: Literal["cosine", "softmax"] = Field(
            "cosine", description="Cosine similarity, or the prompt's probability against the other prompts.")

    def capture(self, params, model, target):
        return CaptureSpec(hidden_layers={model.n_layers - 1})

    def run(self, trace, params, *, target, cancel, backend=None):
        if backend is None:
            raise ParamError("MaskCLIP needs the loaded model")
        if trace.text is None:
            raise ParamError("MaskCLIP needs a text prompt")
        if params.prompt_index >= len(trace.text.prompts):
            raise ParamError(f"prompt_index {params.prompt_index}: only {len(trace.text.prompts)} prompt(s) given")
        yield Progress(0.1, "MaskCLIP last block")
        feats = dense_features(backend, trace)
        cancel.raise_if_cancelled()
        patches = trace.layout.gather(feats)
        sims = similarity_maps(patches, trace.text.embeddings)  # (T, n)
        if params.mode == "softmax":
            logits = sims * (trace.logit_scale or 100.0)
            logits -= logits.max(0, keepdims=True)
            p = np.exp(logits)
            values = (p / p.sum(0, keepdims=True))[params.prompt_index]
        else:
            values = sims[params.prompt_index]
        prompt = trace.text.prompts[params.prompt_index]
        return Heatmap(
            layout=trace.layout,
            token_values=values,
            label=f"MaskCLIP {params.mode}: {prompt!r}",
            meta={"prompt": prompt, "prompts": list(trace.text.prompts)},
        )
