"""ClearCLIP dense similarity (Lan et al., ECCV 2024).

Three changes to the last block only (``last_n_layers = 1``), as in the official
``open_clip/transformer.py::VisionTransformer.forward(model_type='ClearCLIP',
ignore_residual=True)`` and ``custom_attn``:

1. q–q self-self attention ``A = softmax(s · q qᵀ)`` per head (``s = d_h^-1/2``);
2. no residual connection;
3. no FFN.

The block's output is therefore ``y = out_proj(A v)`` ``(B, N, D)``, with ``q, v (B, H, N, dh)``
from ``in_proj(ln_1 x)`` of the block input ``x = trace.hidden(L - 1)``. Then ``ln_post`` and
``proj`` on every token; [CLS] is dropped and the cosine with each prompt is taken by the shared
pipeline (:mod:`explorer_plugins.common.dense`), softmax temperature ``logit_scale = 50``.
One view at the model's input size; the 448/224 sliding window of the benchmarks is not run.

Official code: https://github.com/mc-lan/ClearCLIP (its open_clip fork). ``tests/golden/clearclip.npz``
holds its patch features, grid logits and sliding-window output on a tiny OpenAI-style CLIP; this
implementation matches them to 1e-5 (``tests/plugins/test_golden_clearclip.py``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, LastBlockMethod, last_block_features


class ClearClipParams(DenseParams):
    logit_scale: float = Field(50.0, gt=0.0, description="Temperature of the softmax over prompts (ClearCLIP: 50).")
    prob_threshold: float = Field(
        0.0, ge=0.0, le=1.0,
        description="labels: tokens below this probability become background. 0 for a map; ClearCLIP's "
                    "VOC21 config uses 0.5 (dataset-specific, with a background class).")


def qq_weights(adapter, q):
    """q–q attention ``softmax(s·qqᵀ)``: ``(B, H, N, N)``, rows sum to 1."""
    import torch

    return torch.softmax(adapter.logits(q, q), dim=-1)


def qq_attention(adapter, q, k, v):
    """ClearCLIP's last-block attention output ``softmax(s·qqᵀ) v``: ``(B, H, N, dh)``."""
    return qq_weights(adapter, q) @ v


def last_block(backend: ClipTower, x):
    """The ClearCLIP last block on ``x (B, N, D)``: ``out_proj(softmax(s·qqᵀ) v)``, ``(B, N, D)``."""
    last = backend.info.n_layers - 1
    return backend.run_block(last, x, attention=qq_attention, residual=False, ffn=False)


def dense_features(backend: ClipTower, trace) -> np.ndarray:
    """``(N, E)`` L2-normalised ClearCLIP features of every token of the vision sequence."""
    return last_block_features(backend, trace, qq_attention, residual=False, ffn=False)

class ClearClip(LastBlockMethod):
    Params = ClearClipParams
    title = "ClearCLIP"
    residual = False
    ffn = False

    def attention(self, trace, params):
        return qq_attention
