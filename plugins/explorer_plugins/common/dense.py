"""The shared pipeline of the training-free dense CLIP maps (catalog B6-B12).

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
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.results import Heatmap, LabelMap
from explorer.core.trace import Trace
from explorer.core.jobs import Progress
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError

__all__ = ["DenseParams", "text_embeddings", "dense_result", "logits_result", "normalize", "last_block_features",
           "LastBlockMethod"]


class DenseParams(BaseModel):
    """Parameters every dense-map method shares. A method subclasses it to change defaults to
    those of its official code (``logit_scale: float = Field(50.0, ...)``) or add fields."""

    model_config = ConfigDict(extra="forbid")
    output: Literal["map", "labels"] = Field("map", description="One prompt's map, or a label per patch over all prompts.")
    prompt_index: int = Field(0, ge=0, description="Which prompt's map to show (output=map).")
    mode: Literal["cosine", "softmax"] = Field(
        "cosine", description="map: cosine similarity, or the prompt's probability against the other prompts.")
    templates: Literal["auto", "none", "single", "imagenet-80"] = Field(
        "auto", description="Prompt templates: auto = CLIP's 80 ImageNet templates, none for the demo model.")
    background: str = Field("", description="Background prompts, comma separated (labels: drawn as background).")
    logit_scale: float = Field(40.0, gt=0.0, description="Temperature of the softmax over prompts.")
    prob_threshold: float = Field(0.0, ge=0.0, le=1.0, description="labels: tokens below this probability become background.")


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _background(params: DenseParams) -> tuple[str, ...]:
    return tuple(p.strip() for p in params.background.split(",") if p.strip())


def text_embeddings(trace: Trace, params: DenseParams, backend) -> tuple[tuple[str, ...], np.ndarray, int]:
    """``(names, T (K, E), n_foreground)``: prompts then background prompts, normalised."""
    if trace.text is None or not trace.text.prompts:
        raise ParamError("this method needs a text prompt")
    prompts = trace.text.prompts
    names = prompts + _background(params)
    templates = params.templates
    if templates == "auto":
        templates = "none" if trace.model.demo else "imagenet-80"
    if templates == "none" and not _background(params):
        emb = trace.text.embeddings
    else:
        if backend is None:
            raise ParamError("prompt templates need the loaded model")
        emb = backend.encode_text(names, templates=None if templates == "none" else templates).embeddings
    return names, normalize(np.asarray(emb, dtype=np.float32)), len(prompts)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def logits_result(trace: Trace, logits: np.ndarray, names: tuple[str, ...], n_fg: int, params: DenseParams,
                  title: str, signed: bool = False, meta: dict | None = None) -> Heatmap | LabelMap:
    """The output stage shared by every dense method, for ``logits (n_image_tokens, K)`` over
    ``names`` (prompts first, then background prompts). ``output='map'``: one prompt's logits (or
    its softmax probability); ``output='labels'``: arg-max of ``softmax(logit_scale · logits)``,
    -1 for background prompts and below ``prob_threshold``."""
    logits = np.asarray(logits, dtype=np.float32)
    meta = {"prompts": list(names), "templates": params.templates, "n_foreground": n_fg, **(meta or {})}
    if params.output == "map":
        if params.prompt_index >= n_fg:
            raise ParamError(f"prompt_index {params.prompt_index}: only {n_fg} prompt(s) given")
        if params.mode == "softmax":
            values = _softmax(params.logit_scale * logits)[:, params.prompt_index]
        else:
            values = logits[:, params.prompt_index]
        prompt = names[params.prompt_index]
        return Heatmap(layout=trace.layout, token_values=values, signed=signed and params.mode == "cosine",
                       label=f"{title} {params.mode}: {prompt!r}", meta={**meta, "prompt": prompt})
    p = _softmax(params.logit_scale * logits)
    labels = p.argmax(1)
    labels = np.where((labels >= n_fg) | (p.max(1) < params.prob_threshold), -1, labels)
    return LabelMap(layout=trace.layout, labels=labels.astype(np.int64), class_names=names[:n_fg],
                    scores=p[:, :n_fg].T.astype(np.float32), label=f"{title} labels", meta=meta)


def dense_result(trace: Trace, features: np.ndarray, params: DenseParams, backend, title: str,
                 class_bias: np.ndarray | None = None) -> Heatmap | LabelMap:
    """Turn per-token features ``(N, E)`` into the method's result (see module docstring).

    ``class_bias (K,)`` is added to every token's logits (SegEarth-OV's [CLS] bias).
    """
    names, T, n_fg = text_embeddings(trace, params, backend)
    patches = normalize(trace.layout.gather(np.asarray(features, dtype=np.float32)))
    logits = patches @ T.T  # (n, K) cosine
    if class_bias is not None:
        logits = logits + np.asarray(class_bias, dtype=np.float32)[None, :]
    return logits_result(trace, logits, names, n_fg, params, title)


def last_block_features(backend, trace: Trace, attention, residual: bool, ffn: bool) -> np.ndarray:
    """``(N, E)`` L2-normalised features of every token after rerunning the last block from its
    captured input with a replacement attention (``attention(adapter, q, k, v) -> o``, see
    ``ClipBackend.run_block``), then ``ln_post`` and ``proj``. Only that block runs again."""
    import torch

    last = trace.model.n_layers - 1
    with backend.lock, torch.inference_mode():
        x = backend.to_tensor(trace.hidden(last))
        y = backend.run_block(last, x, attention=attention, residual=residual, ffn=ffn)
        f = torch.nn.functional.normalize(backend.project_tokens(y)[0].float(), dim=-1)
    return f.cpu().numpy()


class LastBlockMethod(Method):
    """A dense method that modifies only the last block (MaskCLIP, SCLIP, ClearCLIP, NACLIP,
    SegEarth-OV): subclasses set ``title``, ``residual``, ``ffn`` and implement
    :meth:`attention`; :meth:`class_bias` optionally adds a per-prompt logit bias."""

    title = ""
    residual = True
    ffn = True

    def attention(self, trace: Trace, params: DenseParams):
        raise NotImplementedError

    def features(self, backend, trace: Trace, params: DenseParams) -> np.ndarray:
        return last_block_features(backend, trace, self.attention(trace, params), self.residual, self.ffn)

    def class_bias(self, trace: Trace, features: np.ndarray, params: DenseParams, backend) -> np.ndarray | None:
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
                            class_bias=self.class_bias(trace, feats, params, backend))
