"""SCLIP correlative self-attention (Wang, Mei & Yuille, ECCV 2024).

The last block is rerun from its input ``x`` (``trace.hidden(L - 1)``, ``(N, D)``) with the
attention weights replaced by Correlative Self-Attention, per head::

    A = softmax(s · q qᵀ) + softmax(s · k kᵀ)        s = d_h^-1/2,  A: (B, H, N, N)

(the two softmaxes are summed without renormalisation, so each row of ``A`` sums to 2), then
``y = x + out_proj(A v)`` and ``y = y + FFN(ln_2 y)``: the residual and the FFN are kept, as in
the official ``clip/model.py::VisionTransformer.custom_attn(csa=True)`` and ``forward``. ``q, k,
v (B, H, N, dh)`` come from the block's own ``in_proj(ln_1 x)``. Then ``ln_post`` and ``proj`` on
every token; [CLS] is dropped by the shared dense pipeline (:mod:`explorer_plugins.common.dense`),
whose softmax temperature defaults to SCLIP's ``logit_scale = 40``. One view at the model's input
size; the benchmark's 224/112 sliding window is not run.

Official code: https://github.com/wangf3014/SCLIP. ``tests/golden/sclip.npz`` holds its features,
grid logits and sliding-window output on a tiny OpenAI-style CLIP; this implementation matches
them to 1e-5 (``tests/plugins/test_golden_sclip.py``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, LastBlockMethod, last_block_features


class SclipParams(DenseParams):
    logit_scale: float = Field(40.0, gt=0.0, description="Temperature of the softmax over prompts (SCLIP: 40).")
    prob_threshold: float = Field(
        0.0, ge=0.0, le=1.0,
        description="labels: tokens below this probability become background (SCLIP uses 0.1 on VOC21 with background).")


def csa_weights(adapter, q, k):
    """Correlative self-attention ``softmax(s·qqᵀ) + softmax(s·kkᵀ)``: ``(B, H, N, N)``, rows sum to 2."""
    import torch

    return torch.softmax(adapter.logits(q, q), dim=-1) + torch.softmax(adapter.logits(k, k), dim=-1)


def csa_attention(adapter, q, k, v):
    """SCLIP's last-block attention output ``A v``: ``(B, H, N, dh)``."""
    return csa_weights(adapter, q, k) @ v


def last_block(backend: ClipTower, x):
    """The SCLIP last block on ``x (B, N, D)`` -> ``(B, N, D)`` (residual and FFN kept)."""
    last = backend.info.n_layers - 1
    return backend.run_block(last, x, attention=csa_attention, residual=True, ffn=True)


def dense_features(backend: ClipTower, trace) -> np.ndarray:
    """``(N, E)`` L2-normalised SCLIP features of every token of the vision sequence."""
    return last_block_features(backend, trace, csa_attention, residual=True, ffn=True)

class Sclip(LastBlockMethod):
    Params = SclipParams
    title = "SCLIP"
    residual = True
    ffn = True

    def attention(self, trace, params):
        return csa_attention
