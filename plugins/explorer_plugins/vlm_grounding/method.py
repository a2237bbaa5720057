"""Grounding of generated text on the image: raw attention and relevancy.

The map of generated token ``t`` uses the row of the position that produced it (the last prompt
position for the first token, token ``t-1`` after that), over the image tokens of the layout, in
image-token order; several tokens (a word) are averaged. Maps are drawn through the VLM's token
layout, so tiles and global views of every family land on their pixels.

Both follow LVLM-Interpret (Ben Melech Stan et al., CVPR Workshops 2024,
https://github.com/IntelLabs/lvlm-interpret): the attention map of one layer and head is
``utils_attn.handle_attentions_i2t``'s, the relevancy that of ``utils_relevancy.construct_relevancy_map``
(``tests/golden/vlm_grounding.npz``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer.plugin_host.vlm import generation_of, prepared_of


def selected_tokens(target, n: int) -> list[int]:
    """The generated tokens to explain (default: the first)."""
    if n == 0:
        raise ParamError("the model generated no token to explain")
    tokens = list(target.tokens) or [0]
    bad = [t for t in tokens if not 0 <= t < n]
    if bad:
        raise ParamError(f"token(s) {bad} outside the {n} generated tokens")
    return tokens


def vlm_sinks(attention: dict[int, np.ndarray], ratio: float = 5.0, z: float = 6.0) -> np.ndarray:
    """Image tokens that soak up attention whatever is asked ("visual attention sinks"): their
    attention averaged over every generated token, layer and head is above ``ratio`` times the
    median and ``z`` robust standard deviations above it. Returns image-token numbers."""
    stack = [a for a in attention.values() if a.size]
    if not stack:
        return np.zeros(0, dtype=np.int64)
    mean = np.nanmean(np.concatenate([a.reshape(-1, a.shape[-1]) for a in stack], 0), 0)
    med = float(np.nanmedian(mean))
    mad = float(np.nanmedian(np.abs(mean - med))) * 1.4826 + 1e-12
    return np.nonzero((mean > ratio * med) & ((mean - med) / mad > z))[0].astype(np.int64)


class VlmAttention(Method):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        start_layer: int = Field(0, description="First LLM layer averaged.", json_schema_extra={"role": "layer"})
        end_layer: int = Field(-1, description="Last LLM layer averaged (negative counts from the last).",
                               json_schema_extra={"role": "layer"})
        head: int = Field(-1, ge=-1, description="Attention head; -1 averages the heads.", json_schema_extra={"role": "head"})
        exclude_sinks: bool = Field(False, description=(
            "Leave out image tokens that soak up attention whatever is asked (off: the raw rows, as "
            "LVLM-Interpret shows them; on: the project's earlier default)."))

    def run(self, trace, params, *, target, cancel, backend=None):
        gen = generation_of(trace)
        L = trace.model.n_layers
        s = resolve_layer(params.start_layer, L, "start_layer")
        e = resolve_layer(params.end_layer, L, "end_layer")
        if s > e:
            raise ParamError(f"start_layer {s} is after end_layer {e}")
        tokens = selected_tokens(target, len(gen.ids))
        yield Progress(0.2, "attention of the selected tokens")
        maps = []
        layers = [l for l in range(s, e + 1) if l in gen.attention]
        if not layers:
            raise ParamError(f"no captured layer in {s}-{e} (kept: {sorted(gen.attention)})")
        for l in layers:
            a = gen.attention[l][tokens]  # (T, H, n_img)
            if params.head >= a.shape[1]:
                raise ParamError(f"head {params.head} out of range: the model has {a.shape[1]} heads")
            maps.append(a.mean(1) if params.head < 0 else a[:, params.head])
        values = np.nanmean(np.concatenate(maps, 0), 0).astype(np.float32)
        sinks = vlm_sinks(gen.attention) if params.exclude_sinks else np.zeros(0, dtype=np.int64)
        values[sinks] = np.nan
        words = " ".join(gen.tokens[t] for t in tokens).strip()
        mass = float(np.nanmean(gen.image_mass[tokens][:, s:e + 1])) if gen.image_mass.size else float("nan")
        return Heatmap(layout=trace.layout, token_values=values,
                       label=f"attention of {words!r}, layers {s}-{e}, {'mean of heads' if params.head < 0 else f'head {params.head}'}",
                       meta={"tokens": tokens, "layers": [s, e], "image_mass": mass, "sinks": sinks.tolist()})


class VlmRelevancy(Method):
    """Chefer's rule 6 over the decoder layers (see :meth:`VlmBackend.relevancy`). The defaults are
    LVLM-Interpret's ``construct_relevancy_map``: the rule-5 rows of earlier generation steps kept
    (``gradients="steps"``) and ``handle_residual``'s row normalisation (``normalize=True``);
    ``gradients="target", normalize=False`` is the project's earlier map (every row weighted by the
    explained token's gradient, ``R[-1]`` unnormalised)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        gradients: Literal["steps", "target"] = Field("steps", description=(
            "Whose gradient weights each attention row: 'steps' (LVLM-Interpret: the prompt rows by the "
            "first token's logit, the row that produced token k by token k's) or 'target' (every row "
            "by the explained token's logit). Equal for the first token."))
        normalize: bool = Field(True, description=(
            "Divide the map by the sum of the token's row of R - I "
            "(LVLM-Interpret's handle_residual); off: the raw row of R."))

    def run(self, trace, params, *, target, cancel, backend=None):
        if backend is None or getattr(backend, "kind", "") != "vlm":
            raise ParamError("relevancy needs the loaded vision-language model")
        gen = generation_of(trace)
        prepared = prepared_of(trace)
        tokens = selected_tokens(target, len(gen.ids))
        maps = []
        for i, t in enumerate(tokens):
            cancel.raise_if_cancelled()
            yield Progress(i / len(tokens), f"relevancy of token {t}")
            values, _ = backend.relevancy(prepared, gen.ids, t, cancel=cancel, gradients=params.gradients,
                                          normalize=params.normalize)
            maps.append(values)
        values = np.mean(maps, 0).astype(np.float32)
        words = " ".join(gen.tokens[t] for t in tokens).strip()
        return Heatmap(layout=trace.layout, token_values=values, label=f"relevancy of {words!r}",
                       meta={"tokens": tokens, "gradients": params.gradients, "normalize": params.normalize})
