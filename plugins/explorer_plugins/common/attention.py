"""Helpers for attention-family methods: the query token, head fusion, the residual-augmented
attention of rollout and flow, sink tokens.

Array API (:mod:`explorer.core.arrays`): every function takes numpy arrays or device tensors and
computes in their namespace, so a trace on a GPU is never copied to the host for these steps.
"""

from __future__ import annotations

import numpy as np

from explorer.core.arrays import as_work, device, namespace, stable_argsort, to_host
from explorer.core.layout import TokenLayout
from explorer.core.target import Target
from explorer.core.trace import Trace
from explorer.plugin_host.api import ParamError

__all__ = ["query_index", "fuse_heads", "residual_augment", "rollout_row", "detect_sinks", "mask_sinks"]


def query_index(layout: TokenLayout, target: Target) -> int:
    """Sequence index of the query token: the target's token, else [CLS]."""
    if target.query is not None:
        if not 0 <= target.query < layout.n_tokens:
            raise ParamError(f"query token {target.query} outside a sequence of {layout.n_tokens}")
        return int(target.query)
    cls = layout.cls_index
    if cls is None:
        raise ParamError("this model has no [CLS] token: click a patch to choose the query")
    return cls


def fuse_heads(attn, mode: str):
    """``(H, ...) -> (...)`` by mean, max or min over heads (in the array's namespace)."""
    xp = namespace(attn)
    if mode == "mean":
        return xp.mean(attn, axis=0)
    if mode == "max":
        return xp.max(attn, axis=0)
    if mode == "min":
        return xp.min(attn, axis=0)
    raise ParamError(f"unknown head fusion {mode!r}")


def residual_augment(a, discard_ratio: float = 0.0, keep: int | None = 0):
    """``(Ā + I) / rowsum`` of a head-fused attention ``a (N, N)``, after zeroing the lowest
    ``discard_ratio`` of its entries (never in column ``keep``). Computed in the work dtype of
    ``a``'s device (float64 on the CPU)."""
    xp = namespace(a)
    a = as_work(a, xp)
    n = a.shape[-1]
    if discard_ratio > 0:
        k = int(a.shape[-2] * n * discard_ratio)
        if k:
            flat = xp.reshape(a, (-1,))
            order = stable_argsort(flat)
            rank = xp.argsort(order)  # position of every entry in the ascending order
            col = xp.arange(flat.shape[0], device=device(flat)) % n
            zero = rank < k
            if keep is not None:
                zero = zero & (col != keep)
            a = xp.reshape(xp.where(zero, xp.zeros_like(flat), flat), a.shape)
    a = a + xp.eye(n, dtype=a.dtype, device=device(a))
    return a / xp.sum(a, axis=-1, keepdims=True)


def rollout_row(a_hats, query: int):
    """Row ``query`` of ``Â_e ⋯ Â_s`` for residual-augmented attentions given first block first,
    computed as a vector-matrix chain from the last block down (``O(L·N²)`` instead of
    ``O(L·N³)``; equal to the row of the full product). ``(N,)`` in the arrays' namespace."""
    if not a_hats:
        raise ParamError("rollout needs at least one layer")
    v = a_hats[-1][query]
    for a in reversed(a_hats[:-1]):
        v = v @ a
    return v


def detect_sinks(trace: Trace, layer: int | None = None, ratio: float = 3.0, z: float = 6.0) -> np.ndarray:
    """Image tokens (image-token numbers) that are high-norm outliers.

    High-norm tokens ("Vision Transformers Need Registers", Darcet et al., ICLR 2024) hold
    global information and soak up attention ("sinks"), which wrecks attention maps. A token is
    flagged when its hidden-state norm at ``layer`` (default: the last captured hidden state)
    is above ``ratio`` times the median norm of the image tokens AND ``z`` robust standard
    deviations (median absolute deviation) above the median. The norms are computed where the
    trace lives; only the ``(n_image_tokens,)`` norms come to the host.
    """
    if not trace.hidden_states:
        return np.zeros(0, dtype=np.int64)
    idx = max(trace.hidden_states) if layer is None else layer
    h = trace.layout.gather(trace.hidden(idx))
    xp = namespace(h)
    norms = to_host(xp.linalg.vector_norm(as_work(h, xp), axis=-1), np.float64)
    med = float(np.median(norms))
    mad = float(np.median(np.abs(norms - med))) * 1.4826 + 1e-12
    return np.nonzero((norms > ratio * med) & ((norms - med) / mad > z))[0].astype(np.int64)


def mask_sinks(values, sinks: np.ndarray) -> np.ndarray:
    """Host copy of per-image-token ``values`` with the sink tokens set to NaN (not drawn, not ranked)."""
    out = np.array(to_host(values), dtype=np.float32)
    out[sinks] = np.nan
    return out
