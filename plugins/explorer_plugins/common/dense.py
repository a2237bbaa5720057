"""The shared pipeline of the training-free dense CLIP maps.

Every method produces L2-normalised features ``F (N, E)`` for the vision sequence (its own
modified last block(s), then ``ln_post`` and ``proj``). This module turns them into a result the
same way for all of them (SCLIP's ``clip_segmentor.py`` pipeline, single view):

* text: each prompt embedded as typed or with templates (CLIP's 80 ImageNet templates, averaged
  and renormalised), plus optional background prompts;
* ``logits = F_patches · Tᵀ`` (cosine), ``(n_image_tokens, K)``;
* ``output='map'``: the cosine map of one prompt (or its softmax probability against the others);
* ``output='labels'``: ``softmax(logit_scale · logits)`` over prompts and background prompts, the
  arg-max per token, ``-1`` for background prompts and for tokens whose best probability is below
  ``prob_threshold`` -> a :class:`LabelMap` with the class names for the legend.

Views: one pass at the model's own input (its preprocessing decides the covered region); the
sliding-window protocol of the segmentation benchmarks is not run.

Where it runs: the rerun block and the logits stay where the trace lives (numpy on the CPU, the
model's device otherwise; array API); only the ``(n_image_tokens,)`` map or label map and its
``(K, n)`` scores come to the host.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import asarray_like, namespace
from explorer.core.results import Heatmap, LabelMap
from explorer.core.trace import Trace
from explorer.core.jobs import Progress
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError
from explorer.plugin_host.protocols import ClipTower

__all__ = ["DenseParams", "text_embeddings", "dense_result", "logits_result", "normalize", "last_block_features",
           "LastBlockMethod", "dual_path"]


class DenseParams(BaseModel):
    """Parameters every dense-map method shares. A method subclasses it to change defaults to
    those of its official code (``logit_scale: float = Field(50.0, ...)``) or add fields."""

    model_config = ConfigDict(extra="forbid")
    output: Literal["map", "labels"] = Field("map", description="One prompt's map, or a label per patch over all prompts.")
    prompt_index: int = Field(0, ge=0, description="Which prompt's map to show (output=map).")
    mode: Literal["cosine", "softmax"] = Field(
        "cosine", description="map: cosine similarity, or the prompt's probability against the other prompts.")
    templates: Literal["auto", "none", "single", "imagenet-80", "maskclip-85"] = Field(
        "auto", description="Prompt templates: auto = the method's own set (MaskCLIP and CLIP Surgery: the 85 of "
                            "their official code, the others: CLIP's 80 ImageNet templates), none for the demo model.")
    background: str = Field("", description="Background prompts, comma separated (labels: drawn as background).")
    logit_scale: float = Field(40.0, gt=0.0, description="Temperature of the softmax over prompts.")
    prob_threshold: float = Field(0.0, ge=0.0, le=1.0, description="labels: tokens below this probability become background.")


def normalize(x, axis: int = -1):
    """Rows scaled to unit L2 norm (norms below 1e-12 clamped), in ``x``'s namespace."""
    xp = namespace(x)
    return x / xp.clip(xp.linalg.vector_norm(x, axis=axis, keepdims=True), 1e-12, None)


def _background(params: DenseParams) -> tuple[str, ...]:
    return tuple(p.strip() for p in params.background.split(",") if p.strip())


def text_embeddings(trace: Trace, params: DenseParams, backend,
                    auto: str = "imagenet-80") -> tuple[tuple[str, ...], np.ndarray, int]:
    """``(names, T (K, E), n_foreground)``: prompts then background prompts, normalised;
    ``templates='auto'`` means ``auto`` (the method's official template set) on a real model."""
    if trace.text is None or not trace.text.prompts:
        raise ParamError("this method needs a text prompt")
    prompts = trace.text.prompts
    names = prompts + _background(params)
    templates = params.templates
    if templates == "auto":
        templates = "none" if trace.model.demo else auto
    if templates == "none" and not _background(params):
        emb = trace.text.embeddings
    else:
        if backend is None:
            raise ParamError("prompt templates need the loaded model")
        emb = backend.encode_text(names, templates=None if templates == "none" else templates).embeddings
    return names, normalize(np.asarray(emb, dtype=np.float32)), len(prompts)


def _softmax(z):
    xp = namespace(z)
    z = z - xp.max(z, axis=1, keepdims=True)
    p = xp.exp(z)
    return p / xp.sum(p, axis=1, keepdims=True)


def logits_result(trace: Trace, logits, names: tuple[str, ...], n_fg: int, params: DenseParams,
                  title: str, signed: bool = False, meta: dict | None = None) -> Heatmap | LabelMap:
    """The output stage shared by every dense method, for ``logits (n_image_tokens, K)`` over
    ``names`` (prompts first, then background prompts). ``output='map'``: one prompt's logits (or
    its softmax probability); ``output='labels'``: arg-max of ``softmax(logit_scale · logits)``,
    -1 for background prompts and below ``prob_threshold``."""
    xp = namespace(logits)
    if not hasattr(logits, "dtype"):
        logits = np.asarray(logits, dtype=np.float32)
    elif logits.dtype != xp.float32:
        logits = xp.astype(logits, xp.float32)
    meta = {"prompts": list(names), "templates": params.templates, "n_foreground": n_fg, **(meta or {})}
    if params.output == "map":
        if params.prompt_index >= n_fg:
            raise ParamError(f"prompt_index {params.prompt_index}: only {n_fg} prompt(s) given")
        if params.mode == "softmax":
            if logits.shape[1] < 2:
                raise ParamError("mode=softmax needs two prompts or more (or a background prompt): over one prompt "
                                 "every patch has probability 1")
            values = _softmax(params.logit_scale * logits)[:, params.prompt_index]
        else:
            values = logits[:, params.prompt_index]
        prompt = names[params.prompt_index]
        return Heatmap(layout=trace.layout, token_values=values, signed=signed and params.mode == "cosine",
                       label=f"{title} {params.mode}: {prompt!r}", meta={**meta, "prompt": prompt})
    p = _softmax(params.logit_scale * logits)
    labels = xp.argmax(p, axis=1)
    labels = xp.where((labels >= n_fg) | (xp.max(p, axis=1) < params.prob_threshold), -1, labels)
    return LabelMap(layout=trace.layout, labels=labels, class_names=names[:n_fg],
                    scores=xp.permute_dims(p[:, :n_fg], (1, 0)), label=f"{title} labels", meta=meta)


def dense_result(trace: Trace, features, params: DenseParams, backend, title: str,
                 class_bias=None, auto_templates: str = "imagenet-80") -> Heatmap | LabelMap:
    """Turn per-token features ``(N, E)`` into the method's result (see module docstring).

    ``class_bias (K,)`` is added to every token's logits (SegEarth-OV's [CLS] bias).
    """
    names, T, n_fg = text_embeddings(trace, params, backend, auto_templates)
    xp = namespace(features)
    if features.dtype != xp.float32:
        features = xp.astype(features, xp.float32)
    patches = normalize(trace.layout.gather(features))
    logits = patches @ asarray_like(T.T, patches, dtype=patches.dtype)  # (n, K) cosine
    if class_bias is not None:
        logits = logits + asarray_like(class_bias, patches, dtype=patches.dtype)[None, :]
    return logits_result(trace, logits, names, n_fg, params, title)


def last_block_features(backend: ClipTower, trace: Trace, attention, residual: bool, ffn: bool, values_only: bool = False):
    """``(N, E)`` L2-normalised float32 features of every token after rerunning the last block
    from its captured input with a replacement attention (``attention(adapter, q, k, v) -> o``,
    see ``ClipTower.run_block``; ``values_only`` when it reads only ``v``), then ``ln_post`` and
    ``proj``. Only that block runs again, on the model's device; the features are returned as the
    trace keeps arrays."""
    last = trace.model.n_layers - 1
    y = backend.run_block(last, trace.hidden(last), attention=attention, residual=residual, ffn=ffn,
                          values_only=values_only)
    f = backend.project_tokens(y)[0]
    return backend.to_trace_array(normalize(f.float()))


def dual_path(backend: ClipTower, x, start: int, attention, originals=None, values_only: bool = False):
    """The two paths of CLIP Surgery and GEM over blocks ``start..L-1`` from ``x (B, N, D)``:
    ``(x_new, x_ori)``, each ``(B, N, D)``.

    The original path is vanilla CLIP. In each block ``l`` the new path adds the output projection
    of ``attention(l, x_ori, adapter, q, k, v) -> o (B, H, N, dh)`` (residual only, no FFN), where
    ``q, k, v`` come from the *original* path's input. ``originals`` (optional): ``{layer: (N, D)}``
    holding the original path's input of every block ``start..L-1`` and its output ``L``, as a
    trace holds them (``trace.hidden``); the original path is then read, not recomputed, and with
    ``values_only`` (the new path reads only ``v``) ``q`` and ``k`` are not computed either.
    """
    import torch

    L = backend.info.n_layers
    read = originals is not None and all(l in originals for l in range(start, L + 1))
    x_ori = x_new = backend.to_tensor(x)
    for layer in range(start, L):
        if read:
            x_ori = backend.to_tensor(originals[layer])
        if read and values_only:
            adapter, q, k, v = None, None, None, backend.block_values(layer, x_ori)
        else:
            adapter, q, k, v = backend.block_qkv(layer, x_ori)
        with torch.inference_mode():
            o_new = attention(layer, x_ori, adapter, q, k, v)
        x_new = x_new + backend.block_attention_output(layer, o_new)
        if not read:
            with torch.inference_mode():
                o_ori = torch.softmax(adapter.logits(q, k), dim=-1) @ v
            y = x_ori + backend.block_attention_output(layer, o_ori)
            x_ori = y + backend.block_mlp(layer, y)
    if read:
        x_ori = backend.to_tensor(originals[L])
    return x_new, x_ori


class LastBlockMethod(Method):
    """A dense method that modifies only the last block (MaskCLIP, SCLIP, ClearCLIP, NACLIP,
    SegEarth-OV): subclasses set ``title``, ``residual``, ``ffn`` and implement
    :meth:`attention`; :meth:`class_bias` optionally adds a per-prompt logit bias."""

    title = ""
    residual = True
    ffn = True
    values_only = False  # the attention reads only v: q and k are not computed
    templates = "imagenet-80"  # the prompt templates of the official code (params.templates='auto')

    def attention(self, trace: Trace, params: DenseParams):
        raise NotImplementedError

    def features(self, backend: ClipTower, trace: Trace, params: DenseParams):
        return last_block_features(backend, trace, self.attention(trace, params), self.residual, self.ffn,
                                   self.values_only)

    def class_bias(self, trace: Trace, features, params: DenseParams, backend):
        return None

    def check(self, params: DenseParams) -> None:
        """Refuse parameter values the method cannot honour (before any work)."""

    def capture(self, params, model, target):
        return CaptureSpec(hidden_layers={model.n_layers - 1})

    def run(self, trace, params, *, target, cancel, backend=None):
        self.check(params)
        if backend is None:
            raise ParamError(f"{self.title} needs the loaded model")
        if trace.text is None:
            raise ParamError(f"{self.title} needs a text prompt")
        yield Progress(0.1, f"{self.title} last block")
        feats = self.features(backend, trace, params)
        cancel.raise_if_cancelled()
        return dense_result(trace, feats, params, backend, self.title,
                            class_bias=self.class_bias(trace, feats, params, backend), auto_templates=self.templates)
