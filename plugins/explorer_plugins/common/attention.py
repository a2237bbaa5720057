"""Helpers for attention-family methods: the query token, head fusion, sink tokens."""

from __future__ import annotations

import numpy as np

from explorer.core.layout import TokenLayout
from explorer.core.target import Target
from explorer.core.trace import Trace
from explorer.plugin_host.api import ParamError

__all__ = ["query_index", "fuse_heads", "detect_sinks", "mask_sinks"]


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


def fuse_heads(attn: np.ndarray, mode: str) -> np.ndarray:
    """``(H, ...) -> (...)`` by mean, max or min over heads."""
    if mode == "mean":
        return attn.mean(0)
    if mode == "max":
        return attn.max(0)
    if mode == "min":
        return attn.min(0)
    raise ParamError(f"unknown head fusion {mode!r}")


def detect_sinks(trace: Trace, layer: int | None = None, ratio: float = 3.0, z: float = 6.0) -> np.ndarray:
    """Image tokens (image-token numbers) that are high-norm outliers.

    High-norm tokens ("Vision Transformers Need Registers", Darcet et al., ICLR 2024) hold
    global information and soak up attention ("sinks"), which wrecks attention maps. A token is
    flagged when its hidden-state norm at ``layer`` (default: the last captured hidden state)
    is above ``ratio`` times the median norm of the image tokens AND ``z`` robust standard
    deviations (median absolute deviation) above the median.
    """
    if not trace.hidden_states:
        return np.zeros(0, dtype=np.int64)
    idx = max(trace.hidden_states) if layer is None else layer
    h = trace.layout.gather(trace.hidden(idx))
    norms = np.linalg.norm(h, axis=-1)
    med = float(np.median(norms))
    mad = float(np.median(np.abs(norms - med))) * 1.4826 + 1e-12
    return np.nonzero((norms > ratio * med) & ((norms - med) / mad > z))[0].astype(np.int64)


def mask_sinks(values: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """Copy of per-image-token ``values`` with the sink tokens set to NaN (not drawn, not ranked)."""
    out = np.array(values, dtype=np.float32)
    out[sinks] = np.nan
    return out
