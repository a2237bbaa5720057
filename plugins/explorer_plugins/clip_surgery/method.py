"""CLIP Surgery (Li et al., arXiv 2304.05653, 2023; Pattern Recognition 2025; catalog B9).

**Architecture surgery** (official ``clip/clip_surgery_model.py``: ``Attention``,
``ResidualAttentionBlock.forward``, ``VisionTransformer.forward``). The last ``n_blocks`` blocks
(6, ``for i in range(1, 7)``) run two paths from ``x = trace.hidden(L - n_blocks)`` ``(N, D)``,
both starting as copies of it. In each modified block ``l``, ``q, k, v (B, H, N, dh)`` come from
``in_proj(ln_1 x_ori)`` — the **original** path's input — and::

    x_ori <- x_ori + out_proj(softmax(s·qkᵀ) v);  x_ori <- x_ori + FFN(ln_2 x_ori)   (vanilla CLIP)
    x_new <- x_new + out_proj(softmax(s·vvᵀ) v)                                      (no FFN)

At the end the new path's [CLS] is replaced by the original path's [CLS] (so the image-level
embedding is vanilla CLIP's), then ``ln_post`` and ``proj`` on every token and L2 normalisation:
``F (N, E)``. With fewer blocks than ``n_blocks`` (the tiny test models have 3) all blocks are
modified.

**Feature surgery** (``clip/clip.py::clip_feature_surgery``), ``T (K, E)`` normalised text
embeddings of the prompts and background prompts:

* multi-prompt (``redundancy='classes'``, the default for K ≥ 2): ``p = softmax(2 · F[cls] Tᵀ)``,
  ``w = p / mean_k p``, ``E[n, k] = w_k (F_n ⊙ T_k)``, ``E <- E - mean_k E``,
  ``sim[n, k] = Σ_c E[n, k, c]``. Computed here in the algebraically equal form
  ``sim[n, k] = w_k cos[n, k] - mean_j w_j cos[n, j]`` (no ``(N, K, E)`` tensor); so
  ``Σ_k sim[n, k] = 0`` for every token.
* single prompt (``redundancy='empty'``, the default for K = 1; ``demo.py``): the redundant
  feature is the embedding ``r`` of the empty string (prompt-ensembled with the same templates)
  and ``sim = F · (T - r)ᵀ``.

The official map step (``get_similarity_map``: per-prompt min–max over patches, bilinear
upsampling) is a display step left to the canvas: the result holds the raw, signed ``sim`` of the
image tokens. ``output='labels'`` applies ``softmax(logit_scale · sim)`` over the prompts (CLIP
Surgery has no label step of its own; the arg-max does not depend on the scale).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.jobs import Progress
from explorer.core.trace import CaptureSpec, Trace
from explorer.plugin_host.api import Method, ParamError
from explorer_plugins.common.dense import DenseParams, logits_result, normalize, text_embeddings

__all__ = ["SurgeryParams", "ClipSurgery", "surgery_features", "feature_surgery"]


class SurgeryParams(DenseParams):
    n_blocks: int = Field(6, ge=1, description="Architecture surgery on this many final blocks (CLIP Surgery: 6; all blocks when the model has fewer).")
    redundancy: Literal["auto", "classes", "empty"] = Field(
        "auto", description="Feature surgery: 'classes' removes the redundancy shared by the prompts (needs 2 or more), "
                            "'empty' subtracts the empty-string text feature (single-prompt mode), 'auto' = classes "
                            "for 2 or more prompts, else empty.")
    logit_scale: float = Field(40.0, gt=0.0, description="Temperature of the softmax over prompts (softmax map and labels only; CLIP Surgery has no label step, the arg-max does not depend on it).")


def surgery_start(n_layers: int, n_blocks: int) -> int:
    """First modified block: ``max(0, n_layers - n_blocks)``."""
    return max(0, n_layers - n_blocks)


def surgery_paths(backend, x, start: int):
    """Run the dual path over blocks ``start..L-1`` from ``x (B, N, D)``: ``(x_new, x_ori)``, each
    ``(B, N, D)``; ``x_ori`` is vanilla CLIP's output of the last block."""
    import torch

    x_ori = x_new = x
    for layer in range(start, backend.info.n_layers):
        adapter, q, k, v = backend.block_qkv(layer, x_ori)
        o_ori = torch.softmax(adapter.logits(q, k), dim=-1) @ v
        o_new = torch.softmax(adapter.logits(v, v), dim=-1) @ v  # v–v attention, rows sum to 1
        x_new = x_new + backend.block_attention_output(layer, o_new)  # residual only, no FFN
        y = x_ori + backend.block_attention_output(layer, o_ori)
        x_ori = y + backend.block_mlp(layer, y)
    return x_new, x_ori


def surgery_features(backend, trace: Trace, n_blocks: int = 6) -> np.ndarray:
    """``(N, E)`` L2-normalised CLIP Surgery features; the [CLS] row is vanilla CLIP's."""
    import torch

    start = surgery_start(trace.model.n_layers, n_blocks)
    cls = trace.layout.cls_index
    if cls is None:
        raise ParamError("CLIP Surgery needs a model with a [CLS] token")
    with backend.lock, torch.inference_mode():
        x = backend.to_tensor(trace.hidden(start))
        x_new, x_ori = surgery_paths(backend, x, start)
        x_new = x_new.clone()
        x_new[:, cls] = x_ori[:, cls]
        f = torch.nn.functional.normalize(backend.project_tokens(x_new)[0].float(), dim=-1)
    return f.cpu().numpy()


def feature_surgery(features: np.ndarray, text: np.ndarray, cls_index: int = 0,
                    redundant: np.ndarray | None = None, t: float = 2.0) -> np.ndarray:
    """``sim (N, K)`` from normalised ``features (N, E)`` and ``text (K, E)`` (see module docstring).

    With ``redundant (E,)``: ``F · (T - r)ᵀ``. Otherwise the class-redundancy removal, weighted by
    ``softmax(t · F[cls_index] Tᵀ)``.
    """
    F = np.asarray(features, dtype=np.float64)
    T = np.asarray(text, dtype=np.float64)
    if redundant is not None:
        return (F @ (T - np.asarray(redundant, dtype=np.float64)[None, :]).T).astype(np.float32)
    z = t * (F[cls_index] @ T.T)
    p = np.exp(z - z.max())
    p /= p.sum()
    w = p / p.mean()
    weighted = (F @ T.T) * w[None, :]  # w_k cos[n, k] = Σ_c w_k F_nc T_kc
    return (weighted - weighted.mean(1, keepdims=True)).astype(np.float32)


def empty_text_embedding(backend, trace: Trace, params: DenseParams) -> np.ndarray:
    """``(E,)`` normalised embedding of the empty string with the prompts' templates (CLIP
    Surgery's redundant feature). ``backend.encode_text`` refuses empty prompts, so the text tower
    is called here directly through the backend's public model and tokenizer."""
    import torch

    from explorer.backends.clip import template_strings

    templates = params.templates
    if templates == "auto":
        templates = "none" if trace.model.demo else "imagenet-80"
    fmt = template_strings(None if templates == "none" else templates) or ["{}"]
    with backend.lock, torch.inference_mode():
        ids = backend.tokenizer([f.format("") for f in fmt]).to(backend.device)
        e = backend.model.encode_text(ids, normalize=True).float().cpu().numpy()
    return normalize(normalize(e).mean(0))


class ClipSurgery(Method):
    Params = SurgeryParams

    def capture(self, params, model, target):
        return CaptureSpec(hidden_layers={surgery_start(model.n_layers, params.n_blocks)})

    def run(self, trace, params, *, target, cancel, backend=None):
        if backend is None:
            raise ParamError("CLIP Surgery needs the loaded model")
        if trace.text is None:
            raise ParamError("CLIP Surgery needs a text prompt")
        names, T, n_fg = text_embeddings(trace, params, backend)
        mode = params.redundancy
        if mode == "auto":
            mode = "classes" if len(names) >= 2 else "empty"
        if mode == "classes" and len(names) < 2:
            raise ParamError("redundancy=classes needs 2 or more prompts (with one prompt every similarity is 0); "
                             "add prompts or background prompts, or use redundancy=empty")
        yield Progress(0.1, "CLIP Surgery dual path")
        feats = surgery_features(backend, trace, params.n_blocks)
        cancel.raise_if_cancelled()
        redundant = empty_text_embedding(backend, trace, params) if mode == "empty" else None
        sim = feature_surgery(feats, T, cls_index=trace.layout.cls_index, redundant=redundant)
        n_blocks = trace.model.n_layers - surgery_start(trace.model.n_layers, params.n_blocks)
        return logits_result(trace, trace.layout.gather(sim), names, n_fg, params, "CLIP Surgery", signed=True,
                             meta={"redundancy": mode, "modified_blocks": n_blocks})
