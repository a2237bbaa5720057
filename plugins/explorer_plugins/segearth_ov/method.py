"""SegEarth-OV dense similarity (Li et al., CVPR 2025).

The last block, as in the official ``open_clip/transformer.py::custom_attn(model_type='SegEarth')``
with ``ignore_residual=True``::

    A = softmax(s·q qᵀ) + softmax(s·k kᵀ) + softmax(s·v vᵀ)     rows sum to 3, (B, H, N, N)
    y = out_proj(A v)                                           no residual, no FFN

``q, k, v (B, H, N, dh)`` from ``in_proj(ln_1 x)`` of the block input ``x = trace.hidden(L - 1)``.
Then ``ln_post`` and ``proj`` on every token ``F (N, E)``.

**Global bias alleviation** (``segearth_segmentor.py``): the [CLS] output of the *same modified*
block, ``c = F[cls] / ||F[cls]||``, gives per-prompt logits ``c · T_kᵀ``; they are added to every
patch's logits with weight ``λ = cls_token_lambda = -0.3``:
``logits[n, k] = cos(F_n, T_k) + λ · cos(c, T_k)``. For one prompt the bias is a constant over
the patches, so each prompt's spatial ranking is unchanged; only the arg-max across prompts moves.
The official code skips the [CLS] branch when ``λ = 0``; so does this one.

The SimFeatUp upsampler (a learned joint-bilateral upsampler loaded from
``xclip_jbu_one_million_aid.ckpt``) is not supported: its architecture is not reproduced here, so
a non-empty ``simfeatup_checkpoint`` is refused with a ``ParamError`` rather than guessed at. The
map stays at token resolution (the official "feature_up=False" path). One view at the model's input
size (no 224/112 sliding window); ``logit_scale = 50``.

Official repository: https://github.com/likyoo/SegEarth-OV; the query features, logits (λ = -0.3, 0,
-2) and labels are checked against it in ``tests/golden/segearth_ov.npz``.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from explorer.core.arrays import to_host
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, LastBlockMethod, last_block_features, normalize, text_embeddings


class SegEarthParams(DenseParams):
    logit_scale: float = Field(50.0, gt=0.0, description="Temperature of the softmax over prompts (SegEarth-OV: 50).")
    prob_threshold: float = Field(
        0.0, ge=0.0, le=1.0, description="labels: tokens below this probability become background (SegEarth-OV: 0 by default).")
    cls_token_lambda: float = Field(
        -0.3, ge=-10.0, le=10.0,
        description="Global bias alleviation: weight of the [CLS]-to-prompt similarity added to every patch's "
                    "logits (SegEarth-OV: -0.3; some datasets such as xBD use 0 = off).")
    simfeatup_checkpoint: str = Field(
        "", description="Path of the SimFeatUp upsampler checkpoint (xclip_jbu_one_million_aid.ckpt). Leave "
                        "empty: the learned upsampler is not supported yet and the map stays at token resolution.")


def sss_weights(adapter, q, k, v):
    """``softmax(s·qqᵀ) + softmax(s·kkᵀ) + softmax(s·vvᵀ)``: ``(B, H, N, N)``, rows sum to 3."""
    import torch

    return (torch.softmax(adapter.logits(q, q), dim=-1) + torch.softmax(adapter.logits(k, k), dim=-1)
            + torch.softmax(adapter.logits(v, v), dim=-1))


def sss_attention(adapter, q, k, v):
    """SegEarth-OV's last-block attention output ``A v``: ``(B, H, N, dh)``."""
    return sss_weights(adapter, q, k, v) @ v


def last_block(backend: ClipTower, x):
    """The SegEarth-OV last block on ``x (B, N, D)``: ``out_proj(A v)`` ``(B, N, D)``."""
    last = backend.info.n_layers - 1
    return backend.run_block(last, x, attention=sss_attention, residual=False, ffn=False)


def dense_features(backend: ClipTower, trace) -> np.ndarray:
    """``(N, E)`` L2-normalised SegEarth-OV features of every token, [CLS] included."""
    return last_block_features(backend, trace, sss_attention, residual=False, ffn=False)


def cls_bias(trace, features, params, backend) -> np.ndarray | None:
    """``(K,)`` = ``λ · cos(F[cls], T_k)`` over the prompts and background prompts, or ``None`` when λ = 0."""
    if params.cls_token_lambda == 0:
        return None
    cls = trace.layout.cls_index
    if cls is None:
        raise ParamError("SegEarth-OV's [CLS] bias needs a model with a [CLS] token; set cls_token_lambda=0")
    _, T, _ = text_embeddings(trace, params, backend)
    c = to_host(normalize(features[cls]), np.float32)  # (E,): the one row that crosses
    return (params.cls_token_lambda * (T @ c)).astype(np.float32)


class SegEarthOV(LastBlockMethod):
    Params = SegEarthParams
    title = "SegEarth-OV"
    residual = False
    ffn = False

    def attention(self, trace, params):
        return sss_attention

    def check(self, params):
        if params.simfeatup_checkpoint.strip():
            raise ParamError(
                "simfeatup_checkpoint: the SimFeatUp upsampler is not supported yet (its learned "
                "joint-bilateral upsampler is not implemented here); leave it empty for token-resolution maps")

    def class_bias(self, trace, features, params, backend):
        return cls_bias(trace, features, params, backend)
