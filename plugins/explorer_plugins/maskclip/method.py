"""MaskCLIP dense similarity (Zhou, Loy & Dai, ECCV 2022).

The last block is rerun from its input ``x`` (captured in the trace) with the attention replaced
by the identity: ``y = x + out_proj(v)`` with ``v`` from ``in_proj(ln_1 x)``, then
``y = y + FFN(ln_2 y)``, ``ln_post`` and ``proj`` on every token (the original MaskCLIP keeps the
residual and the FFN; the "MaskCLIP" mode of the ClearCLIP/SegEarth repositories drops them and
is a different method). [CLS] is dropped; the map of a prompt is the cosine similarity of each
patch feature with the prompt's text embedding (:mod:`explorer_plugins.common.dense`). Only the
last block runs again, never the whole tower.

Official code: https://github.com/chongzhou96/MaskCLIP (mmseg: the ViT backbone's ``return_qkv``
value path and ``MaskClipHead``). ``tests/golden/maskclip_maps.npz`` holds its features, logits and
resized logits on the tiny test CLIP; this implementation matches them to 1e-5
(``tests/plugins/test_golden_maskclip_maps.py``). Its mmseg ViT is a port of CLIP built with exact
GELU and LayerNorm eps 1e-6 in every block (OpenAI's CLIP: QuickGELU, 1e-5); this plugin runs the
loaded model's own blocks, so on OpenAI weights it follows CLIP, not the port.
"""

from __future__ import annotations

import numpy as np

from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, LastBlockMethod, last_block_features


def identity_attention(adapter, q, k, v):
    """MaskCLIP's last-block attention: every token attends to itself only (output = v)."""
    return v


def dense_features(backend: ClipTower, trace) -> np.ndarray:
    """``(N, E)`` L2-normalised MaskCLIP features of every token of the vision sequence."""
    return last_block_features(backend, trace, identity_attention, residual=True, ffn=True, values_only=True)


class MaskClip(LastBlockMethod):
    Params = DenseParams
    title = "MaskCLIP"
    values_only = True  # the identity attention reads v alone
    templates = "maskclip-85"  # the official prompt engineering: CLIP's 80 and five scene templates

    def attention(self, trace, params):
        return identity_attention
