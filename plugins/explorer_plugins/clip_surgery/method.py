"""CLIP Surgery (Li et al., arXiv 2304.05653, 2023; Pattern Recognition 2025).

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
modified. The original path is the unmodified model, so its block inputs and output are read
from the trace (captured for the modified blocks) instead of being recomputed.

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

**Prompt templates** (``clip/clip.py::encode_text_with_prompt_ensemble``): every text, the empty
string included, is ensembled over the official list of 85 templates — CLIP's 80 ImageNet templates
and five scene templates (``"there is a {} in the scene."``, ...), the same set as MaskCLIP's, so
``templates='auto'`` means ``'maskclip-85'`` here (each template embedding L2-normalised, averaged,
normalised again; the order does not matter). ``templates='imagenet-80'`` gives this plugin's
earlier default, CLIP's 80 templates without the five scene ones.

The official map step (``get_similarity_map``: per-prompt min–max over patches, bilinear
upsampling) is a display step left to the canvas: the result holds the raw, signed ``sim`` of the
image tokens. ``output='labels'`` applies ``softmax(logit_scale · sim)`` over the prompts (CLIP
Surgery has no label step of its own; the arg-max does not depend on the scale).

Checked against the official code (https://github.com/xmed-lab/CLIP_Surgery): features, template
set, ensembled text features and both feature-surgery modes, ``tests/golden/clip_surgery.npz``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.arrays import as_work, asarray_like, namespace
from explorer.core.jobs import Progress
from explorer.core.trace import CaptureSpec, Trace
from explorer.plugin_host.api import Method, ParamError
from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, dual_path, logits_result, normalize, text_embeddings

__all__ = ["SurgeryParams", "ClipSurgery", "surgery_features", "feature_surgery", "OFFICIAL_TEMPLATES"]

# encode_text_with_prompt_ensemble's default list: CLIP's 80 ImageNet templates and 5 scene templates
OFFICIAL_TEMPLATES = "maskclip-85"


class SurgeryParams(DenseParams):
    n_blocks: int = Field(6, ge=1, description="Architecture surgery on this many final blocks (CLIP Surgery: 6; all blocks when the model has fewer).")
    redundancy: Literal["auto", "classes", "empty"] = Field(
        "auto", description="Feature surgery: 'classes' removes the redundancy shared by the prompts (needs 2 or more), "
                            "'empty' subtracts the empty-string text feature (single-prompt mode), 'auto' = classes "
                            "for 2 or more prompts, else empty.")
    logit_scale: float = Field(40.0, gt=0.0, description="Temperature of the softmax over prompts (softmax map and labels only; CLIP Surgery has no label step, the arg-max does not depend on it).")
    templates: Literal["auto", "none", "single", "imagenet-80", "maskclip-85"] = Field(
        "auto", description="Prompt templates, for the prompts and the empty string: auto = CLIP Surgery's own 85 "
                            "(CLIP's 80 ImageNet templates and 5 scene templates, the maskclip-85 set), imagenet-80 = "
                            "the 80 only (this plugin's earlier default), none = as typed (the demo model: auto does it).")


def surgery_start(n_layers: int, n_blocks: int) -> int:
    """First modified block: ``max(0, n_layers - n_blocks)``."""
    return max(0, n_layers - n_blocks)


def _vv_attention(layer, x_ori, adapter, q, k, v):
    import torch

    return torch.softmax((v * v.shape[-1] ** -0.5) @ v.transpose(-1, -2), dim=-1) @ v  # v–v attention, rows sum to 1


def surgery_paths(backend: ClipTower, x, start: int, originals=None):
    """Run the dual path over blocks ``start..L-1`` from ``x (B, N, D)``: ``(x_new, x_ori)``, each
    ``(B, N, D)``; ``x_ori`` is vanilla CLIP's output of the last block (read from ``originals``,
    ``{layer: (N, D)}`` as a trace holds them, when given: :func:`~explorer_plugins.common.dense.dual_path`)."""
    return dual_path(backend, x, start, _vv_attention, originals, values_only=True)


def surgery_features(backend: ClipTower, trace: Trace, n_blocks: int = 6):
    """``(N, E)`` L2-normalised CLIP Surgery features; the [CLS] row is vanilla CLIP's. Returned as
    the trace keeps arrays (numpy on the CPU, the device tensor otherwise)."""
    import torch

    start = surgery_start(trace.model.n_layers, n_blocks)
    cls = trace.layout.cls_index
    if cls is None:
        raise ParamError("CLIP Surgery needs a model with a [CLS] token")
    x_new, x_ori = surgery_paths(backend, trace.hidden(start), start, originals=trace.hidden_states)
    with torch.inference_mode():
        x_new = x_new.clone()
        x_new[:, cls] = x_ori[:, cls]
    return backend.to_trace_array(normalize(backend.project_tokens(x_new)[0].float()))


def feature_surgery(features, text, cls_index: int = 0, redundant=None, t: float = 2.0):
    """``sim (N, K)`` from normalised ``features (N, E)`` and ``text (K, E)`` (see module docstring),
    in the features' namespace (work dtype: float64 on the CPU, float32 on a device).

    With ``redundant (E,)``: ``F · (T - r)ᵀ``. Otherwise the class-redundancy removal, weighted by
    ``softmax(t · F[cls_index] Tᵀ)``.
    """
    xp = namespace(features)
    F = as_work(features if hasattr(features, "dtype") else np.asarray(features), xp)
    T = asarray_like(text, F, dtype=F.dtype)
    if redundant is not None:
        r = asarray_like(redundant, F, dtype=F.dtype)
        return F @ xp.permute_dims(T - r[None, :], (1, 0))
    z = t * (F[cls_index] @ xp.permute_dims(T, (1, 0)))
    p = xp.exp(z - xp.max(z))
    p = p / xp.sum(p)
    w = p / xp.mean(p)
    weighted = (F @ xp.permute_dims(T, (1, 0))) * w[None, :]  # w_k cos[n, k] = Σ_c w_k F_nc T_kc
    return weighted - xp.mean(weighted, axis=1, keepdims=True)


def empty_text_embedding(backend: ClipTower, trace: Trace, params: DenseParams) -> np.ndarray:
    """``(E,)`` normalised embedding of the empty string with the prompts' templates (CLIP
    Surgery's redundant feature; ``auto``: the official 85)."""
    templates = params.templates
    if templates == "auto":
        templates = "none" if trace.model.demo else OFFICIAL_TEMPLATES
    enc = backend.encode_text([""], templates=None if templates == "none" else templates, allow_empty=True)
    return enc.embeddings[0]


class ClipSurgery(Method):
    Params = SurgeryParams

    def capture(self, params, model, target):
        # every modified block's input and the last output: the original path is read, not rerun
        return CaptureSpec(hidden_layers=range(surgery_start(model.n_layers, params.n_blocks), model.n_layers + 1))

    def run(self, trace, params, *, target, cancel, backend=None):
        if backend is None:
            raise ParamError("CLIP Surgery needs the loaded model")
        if trace.text is None:
            raise ParamError("CLIP Surgery needs a text prompt")
        names, T, n_fg = text_embeddings(trace, params, backend, auto=OFFICIAL_TEMPLATES)
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
