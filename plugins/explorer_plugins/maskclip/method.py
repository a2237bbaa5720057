"""MaskCLIP dense similarity (Zhou, Loy & Dai, ECCV 2022; catalog B6).

The last block is rerun from its input ``x`` (captured in the trace) with the attention replaced
by the identity: ``y = x + out_proj(v)`` with ``v`` from ``in_proj(ln_1 x)``, then
``y = y + FFN(ln_2 y)``, ``ln_post`` and ``proj`` on every token (the original MaskCLIP keeps the
residual and the FFN; the "MaskCLIP" mode of the ClearCLIP/SegEarth repositories drops them and
is a different method). [CLS] is dropped; the map of a prompt is the cosine similarity of each
patch feature with the prompt's text embedding (:mod:`explorer_plugins.common.dense`). Only the
last block runs again, never the whole tower.
"""

from __future__ import annotations

import numpy as np

from explorer.core.jobs import Progress
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError
from explorer_plugins.common.dense import DenseParams, dense_result


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
        f = torch.nn.functional.normalize(backend.project_tokens(y)[0].float(), dim=-1)
    return f.cpu().numpy()


class MaskClip(Method):
    Params = DenseParams

    def capture(self, params, model, target):
        return CaptureSpec(hidden_layers={model.n_layers - 1})

    def run(self, trace, params, *, target, cancel, backend=None):
        if backend is None:
            raise ParamError("MaskCLIP needs the loaded model")
        if trace.text is None:
            raise ParamError("MaskCLIP needs a text prompt")
        yield Progress(0.1, "MaskCLIP last block")
        feats = dense_features(backend, trace)
        cancel.raise_if_cancelled()
        return dense_result(trace, feats, params, backend, "MaskCLIP")
