"""GEM, the Grounding Everything Module (Bousselham et al., CVPR 2024).

Official code: ``gem/gem_utils.py`` (``SelfSelfAttention``, ``GEMResidualBlock``,
``modified_vit_forward``) and ``gem/gem_wrapper.py::GEMWrapper`` (``depth=7`` -> the last 6
blocks). From ``x = trace.hidden(L - n_blocks)`` ``(N, D)`` two paths start as copies of it. In
each modified block ``l``, with ``u = ln_1(x_ori)`` and ``q, k, v (B, H, N, dh) = in_proj(u)``::

    x_ori <- x_ori + out_proj(softmax(s·qkᵀ) v);  x_ori <- x_ori + FFN(ln_2 x_ori)   (vanilla CLIP)
    x_gem <- x_gem + out_proj( mean_{z ∈ {q, k, v}} A_z v )                           (no FFN)

where ``A_z`` is the self-self attention of ``z`` after ``iterations`` clustering steps
(``ss_attn_iter = 1``)::

    repeat iterations times:  ẑ <- normalize(ẑ);  ẑ <- softmax(τ · ẑ ẑᵀ) ẑ
    ẑ <- normalize(ẑ);  A_z = softmax(τ · ẑ ẑᵀ)          (row-stochastic, (B, H, N, N))

applied to the raw ``v``. The inverse temperature is adaptive (``ss_attn_temp=None``):
``τ = mean_n ||u_n||₂ · d_h^-1/2`` per image, ``u`` being the block's ``ln_1`` output. Then
``ln_post`` and ``proj`` on every token of the GEM path. With fewer blocks than ``n_blocks`` (the
tiny test models have 3) all blocks are modified. The original path's block inputs are the
unmodified model's hidden states, so they are read from the trace (captured for the modified
blocks) instead of being recomputed; everything runs on the model's device.

The map is the raw cosine of each patch with each prompt. The official ``GEMWrapper.forward``
min–max normalises each prompt's map to [0, 1] over the image; that is a display step left to the
canvas, which scales every map. GEM encodes prompts with the single template ``"a photo of a
{}."`` (the ``templates`` default here). For labels the official README puts pixels whose best
class probability is below **0.85** into the background (``prob_threshold``); its softmax is taken
over the min–max maps at temperature 1, which cannot reach 0.85 for two or more classes, so here
the softmax runs over the cosines at CLIP's trained scale ``logit_scale = 100`` instead.

Official repository: https://github.com/WalBouss/GEM; the features (default, fewer blocks, more
iterations, a fixed temperature), the template and the maps are checked against it in
``tests/golden/gem.npz``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.jobs import Progress
from explorer.core.trace import CaptureSpec, Trace
from explorer.plugin_host.api import Method, ParamError
from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.dense import DenseParams, dense_result, dual_path, normalize


class GemParams(DenseParams):
    n_blocks: int = Field(6, ge=1, description="GEM path over this many final blocks (GEM: 6, depth=7; all blocks when the model has fewer).")
    iterations: int = Field(1, ge=0, le=10, description="Clustering iterations of the self-self attention (GEM: ss_attn_iter=1).")
    temperature: float | None = Field(
        None, gt=0.0, description="Inverse temperature of the self-self attention; none = adaptive, the mean token norm "
                                  "of ln_1's output times d_h^-1/2 (GEM's default).")
    templates: Literal["auto", "none", "single", "imagenet-80"] = Field(
        "single", description="Prompt templates: single = 'a photo of a {}.' (GEM's own), auto = CLIP's 80 ImageNet "
                              "templates, none = as typed (use it for the demo model).")
    logit_scale: float = Field(100.0, gt=0.0, description="Temperature of the softmax over prompts (labels and softmax map; CLIP's trained scale 100).")
    prob_threshold: float = Field(
        0.85, ge=0.0, le=1.0,
        description="labels: tokens whose best probability is below this become background (GEM README: 0.85, "
                    "'depends on the number of classes').")


def gem_start(n_layers: int, n_blocks: int) -> int:
    """First block of the GEM path: ``max(0, n_layers - n_blocks)``."""
    return max(0, n_layers - n_blocks)


def self_self_weights(q, k, v, inv_temp, iterations: int = 1):
    """GEM's three self-self attention matrices ``[A_v, A_k, A_q]``, each ``(B, H, N, N)`` and
    row-stochastic, from ``q, k, v (B, H, N, dh)``; ``inv_temp`` a number or a tensor broadcasting
    to ``(B, H, N, N)``."""
    import torch
    import torch.nn.functional as F

    out = []
    for z in (v, k, q):
        for _ in range(iterations):
            z = F.normalize(z, dim=-1)
            z = torch.softmax(inv_temp * (z @ z.transpose(-1, -2)), dim=-1) @ z
        z = F.normalize(z, dim=-1)
        out.append(torch.softmax(inv_temp * (z @ z.transpose(-1, -2)), dim=-1))
    return out


def adaptive_inverse_temperature(u, dh: int):
    """``τ = mean_n ||u_n||₂ · dh^-1/2`` per image: ``u (B, N, D)`` -> ``(B, 1, 1, 1)``."""
    return (u.norm(dim=-1).mean(dim=-1) * dh ** -0.5).reshape(-1, 1, 1, 1)


def gem_paths(backend: ClipTower, x, start: int, iterations: int = 1, temperature: float | None = None, originals=None):
    """Run the GEM and original paths over blocks ``start..L-1`` from ``x (B, N, D)``:
    ``(x_gem, x_ori)``, each ``(B, N, D)``; ``x_ori`` is vanilla CLIP's last-block output.

    ``originals`` (optional): ``{layer: array (N, D)}`` the original path's input of every block
    ``start..L-1`` and its output ``L``, as a trace holds them (``trace.hidden``); the original
    path is then read, not recomputed, and only the GEM path runs (about a third of the work).
    """

    def attention(layer, x_ori, adapter, q, k, v):
        if temperature is None:
            # the norm is of ln_1's output, what the block's in-projection reads
            tau = adaptive_inverse_temperature(backend.block_input_norm(layer, x_ori), q.shape[-1])
        else:
            tau = float(temperature)
        a_v, a_k, a_q = self_self_weights(q, k, v, tau, iterations)
        return ((a_v + a_k + a_q) / 3) @ v  # mean of the three A_z v, one product

    return dual_path(backend, x, start, attention, originals)


def gem_features(backend: ClipTower, trace: Trace, n_blocks: int = 6, iterations: int = 1,
                 temperature: float | None = None):
    """``(N, E)`` L2-normalised GEM-path features of every token (``ln_post`` then ``proj``), as
    the trace keeps arrays (numpy on the CPU, the device tensor otherwise)."""
    start = gem_start(trace.model.n_layers, n_blocks)
    x_gem, _ = gem_paths(backend, trace.hidden(start), start, iterations, temperature, originals=trace.hidden_states)
    return backend.to_trace_array(normalize(backend.project_tokens(x_gem)[0].float()))


class Gem(Method):
    Params = GemParams

    def capture(self, params, model, target):
        # every modified block's input and the last output: the original path is read, not rerun
        return CaptureSpec(hidden_layers=range(gem_start(model.n_layers, params.n_blocks), model.n_layers + 1))

    def run(self, trace, params, *, target, cancel, backend=None):
        if backend is None:
            raise ParamError("GEM needs the loaded model")
        if trace.text is None:
            raise ParamError("GEM needs a text prompt")
        yield Progress(0.1, "GEM path")
        feats = gem_features(backend, trace, params.n_blocks, params.iterations, params.temperature)
        cancel.raise_if_cancelled()
        return dense_result(trace, feats, params, backend, "GEM")
