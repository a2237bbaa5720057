"""NACLIP: neighbour-aware CLIP (Hajimiri, Ben Ayed & Dolz, WACV 2025).

The last block, ``arch='reduced'`` of the official ``clip/model.py::VisionTransformer``
(``custom_attn`` with ``attn_strategy='naclip'``)::

    A = softmax(s · k kᵀ + ω)        s = d_h^-1/2,  A: (B, H, N, N)
    y = out_proj(A v)                no residual, no FFN

``k, v (B, H, N, dh)`` come from ``in_proj(ln_1 x)`` of the block input ``x = trace.hidden(L - 1)``.
``ω (N, N)`` is the same for every head: ``ω[i, j] = exp(-||p_i - p_j||² / (2σ²))`` for two patches
at grid coordinates ``p = (row, col)``, σ = ``gaussian_std`` (5), and 0 on the [CLS] row and
column (the official code builds it by convolving a ``(2h-1)×(2w-1)`` Gaussian window with one-hot
maps, ``gaussian_window`` and ``get_attention_addition``; the closed form here is the same
matrix). Then ``ln_post`` and ``proj`` on every token, and the shared pipeline
(:mod:`explorer_plugins.common.dense`) with NACLIP's ``logit_scale = 40``.

PAMR refinement (on by default in the official code, 10 steps, dilations 8 and 16) is **not
implemented**: it refines pixel-resolution logits with the image, which this token-level result
does not carry. One view at the model's input size (no 224/112 sliding window).

Official code: https://github.com/sinahmr/NACLIP. ``tests/golden/naclip.npz`` holds its ω, features
(std 5 and 2), grid logits and sliding-window output (without PAMR) on a tiny OpenAI-style CLIP;
this implementation matches them to 1e-5 (``tests/plugins/test_golden_naclip.py``).
"""

from __future__ import annotations

import functools

import numpy as np
from pydantic import Field

from explorer.core.layout import TokenLayout
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, LastBlockMethod, last_block_features


class NaclipParams(DenseParams):
    gaussian_std: float = Field(5.0, gt=0.0, description="Standard deviation (in patches) of the Gaussian neighbourhood added to the k-k attention logits (NACLIP: 5).")
    logit_scale: float = Field(40.0, gt=0.0, description="Temperature of the softmax over prompts (NACLIP: 40).")
    prob_threshold: float = Field(
        0.0, ge=0.0, le=1.0,
        description="labels: tokens below this probability become background (NACLIP uses 0.1 on VOC21 with background).")


@functools.lru_cache(maxsize=16)
def grid_gaussian(rows: int, cols: int, std: float) -> np.ndarray:
    """``(rows*cols, rows*cols)`` float32: ``exp(-||p_i - p_j||² / (2 std²))`` over row-major grid
    coordinates ``p = (row, col)`` (read-only, cached per grid size and std)."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    out = np.exp(-d2 / (2.0 * float(std) ** 2)).astype(np.float32)
    out.flags.writeable = False
    return out


def neighbourhood_bias(layout: TokenLayout, std: float) -> np.ndarray:
    """NACLIP's ω for a vision sequence: ``(N, N)`` float32, the grid Gaussian between image tokens
    and 0 on every row and column of a prefix token ([CLS])."""
    if len(layout.segments) != 1:
        raise ParamError("NACLIP needs a single patch grid")
    seg = layout.segments[0]
    idx = seg.seq_indices()
    omega = np.zeros((layout.n_tokens, layout.n_tokens), dtype=np.float32)
    omega[np.ix_(idx, idx)] = grid_gaussian(seg.rows, seg.cols, float(std))
    return omega


def naclip_weights(adapter, k, omega):
    """``softmax(s·kkᵀ + ω)``: ``(B, H, N, N)`` with ``omega (N, N)`` a tensor; rows sum to 1."""
    import torch

    return torch.softmax(adapter.logits(k, k) + omega.to(k.dtype), dim=-1)


def last_block(backend: ClipTower, x, omega):
    """The NACLIP last block on ``x (B, N, D)``: ``out_proj(softmax(s·kkᵀ + ω) v)``, ``(B, N, D)``."""
    last = backend.info.n_layers - 1
    return backend.run_block(last, x, attention=lambda a, q, k, v: naclip_weights(a, k, omega) @ v,
                             residual=False, ffn=False)


def naclip_attention(omega_np: np.ndarray):
    """NACLIP's last-block attention for a fixed neighbourhood bias ``omega (N, N)``."""
    import torch

    def attention(adapter, q, k, v):
        return naclip_weights(adapter, k, torch.as_tensor(omega_np, device=k.device)) @ v

    return attention


def dense_features(backend: ClipTower, trace, gaussian_std: float = 5.0) -> np.ndarray:
    """``(N, E)`` L2-normalised NACLIP features of every token of the vision sequence."""
    return last_block_features(backend, trace, naclip_attention(neighbourhood_bias(trace.layout, gaussian_std)),
                               residual=False, ffn=False)


class Naclip(LastBlockMethod):
    Params = NaclipParams
    title = "NACLIP"
    residual = False
    ffn = False

    def attention(self, trace, params):
        return naclip_attention(neighbourhood_bias(trace.layout, params.gaussian_std))
