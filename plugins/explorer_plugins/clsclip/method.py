"""ClsCLIP, "[CLS] Token is All You Need for Zero-Shot Semantic Segmentation" (Wu et al., arXiv
2304.06212, 2023). **Experimental adaptation**: no official code was found and the
paper's details are unverified; this plugin implements the idea the abstract describes, with
every assumption stated here and in the manifest's ``adaptation``.

Idea ("one-way [CLS] navigation"): the text encoder's global token for a category replaces the
visual [CLS] token in the shallow blocks of the CLIP ViT, so that the patches attend to the
category before the dense features are read out. One vision pass per prompt.

What is assumed, for each prompt (and background prompt) ``k`` with normalised text embedding
``T_k (E,)`` (the EOT token after ``text_projection``, prompt-ensembled like the other methods):

1. **Mapping to the visual width**: ``c_k = T_k · pinv(visual.proj)`` ``(D,)`` (the minimum-norm
   ``c`` with ``c · proj = T_k``), rescaled at each block to the norm of the visual [CLS] token it
   replaces, so that the residual stream keeps its scale.
2. **Replacement**: at the input of each of the first ``shallow_layers`` blocks the [CLS] row of
   the sequence is set to ``c_k``; after them the [CLS] evolves normally. ``shallow_layers`` is
   clipped to the blocks before the last one (the readout block).
3. **Readout**: MaskCLIP-style last block: identity attention with residual and FFN
   (``y = x + out_proj(v)``, ``y = y + FFN(ln_2 y)``), then ``ln_post`` and ``proj``; the map of
   prompt ``k`` is the cosine of the patch features *of pass k* with ``T_k``.

The passes start from the embeddings ``trace.hidden(0)`` (``ln_pre`` output, ``(N, D)``), so the
image is not encoded again. ClsCLIP+ (region zoom-in) is not implemented.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import Field

from explorer.core.arrays import asarray_like, to_host
from explorer.core.jobs import Progress
from explorer.core.trace import CaptureSpec, Trace
from explorer.plugin_host.api import Method, ParamError
from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, dense_result, logits_result, normalize, text_embeddings


class ClsClipParams(DenseParams):
    shallow_layers: int = Field(
        3, ge=1, description="The text [CLS] replaces the visual [CLS] at the input of this many first blocks "
                             "(an assumption: the paper's 'shallow layers' are unverified; clipped to the blocks "
                             "before the last).")


def identity_attention(adapter, q, k, v):
    """MaskCLIP's readout attention: every token attends to itself only (output = v)."""
    return v


def text_to_visual(backend: ClipTower, text_embedding: np.ndarray):
    """``T_k (E,)`` -> ``c_k (D,)`` tensor via the pseudo-inverse of the tower's projection ``(D, E)``."""
    import torch

    proj = backend.projection()
    if proj is None:
        raise ParamError("ClsCLIP needs a vision tower with a projection (visual.proj)")
    t = torch.as_tensor(np.asarray(text_embedding, dtype=np.float32), device=proj.device)
    return t @ torch.linalg.pinv(proj.float())


def used_shallow_layers(n_layers: int, shallow_layers: int) -> int:
    return max(0, min(shallow_layers, n_layers - 1))


def clsclip_features(backend: ClipTower, trace: Trace, text_embedding: np.ndarray, shallow_layers: int):
    """``(N, E)`` L2-normalised features of one ClsCLIP pass for one prompt (see module docstring),
    as the trace keeps arrays. The blocks run through ``ClipTower.run_block`` (the block's own
    computation when no attention is given), the [CLS] replaced before the shallow ones."""
    import torch

    L = trace.model.n_layers
    if L < 2:
        raise ParamError("ClsCLIP needs a model with at least 2 blocks")
    cls = trace.layout.cls_index
    if cls is None:
        raise ParamError("ClsCLIP needs a model with a [CLS] token")
    s = used_shallow_layers(L, shallow_layers)
    with torch.inference_mode():
        c = text_to_visual(backend, text_embedding)
        x = backend.to_tensor(trace.hidden(0))
        c = c.to(x.dtype)
        for layer in range(L - 1):
            if layer < s:
                x = x.clone()
                x[:, cls] = c * (x[:, cls].norm(dim=-1, keepdim=True) / c.norm().clamp_min(1e-12))
            x = backend.run_block(layer, x)
        y = backend.run_block(L - 1, x, attention=identity_attention, residual=True, ffn=True)
        f = normalize(backend.project_tokens(y)[0].float())
    return backend.to_trace_array(f)


class ClsClip(Method):
    Params = ClsClipParams

    def capture(self, params, model, target):
        return CaptureSpec(hidden_layers={0})

    def run(self, trace, params, *, target, cancel, backend=None):
        if backend is None:
            raise ParamError("ClsCLIP needs the loaded model")
        if trace.text is None:
            raise ParamError("ClsCLIP needs a text prompt")
        names, T, n_fg = text_embeddings(trace, params, backend)
        if params.output == "map" and params.prompt_index >= n_fg:
            raise ParamError(f"prompt_index {params.prompt_index}: only {n_fg} prompt(s) given")
        s = used_shallow_layers(trace.model.n_layers, params.shallow_layers)
        meta = {"shallow_layers": s, "experimental": True}
        if params.output == "map" and params.mode == "cosine":
            passes = [params.prompt_index]  # the cosine map of one prompt needs only its own pass
        else:
            passes = list(range(len(names)))
        columns = {}
        feats = None
        for i, k in enumerate(passes):
            cancel.raise_if_cancelled()
            yield Progress(0.05 + 0.9 * i / len(passes), f"ClsCLIP pass {i + 1}/{len(passes)}: {names[k]!r}")
            feats = clsclip_features(backend, trace, T[k], params.shallow_layers)
            patches = normalize(trace.layout.gather(feats))
            columns[k] = to_host(patches @ asarray_like(T[k], patches, dtype=patches.dtype))
        cancel.raise_if_cancelled()
        if len(passes) == 1:
            result = dense_result(trace, feats, params, backend, "ClsCLIP (experimental)")
            return dataclasses.replace(result, meta={**result.meta, **meta})
        logits = np.stack([columns[k] for k in range(len(names))], axis=1)
        return logits_result(trace, logits, names, n_fg, params, "ClsCLIP (experimental)", meta=meta)
