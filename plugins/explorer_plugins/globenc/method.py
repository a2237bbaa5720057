"""GlobEnc, adapted to pre-LN vision transformers (Modarressi et al., "GlobEnc: Quantifying Global
Token Attribution by Incorporating the Whole Encoder Layer in Transformers", NAACL 2022; official code ``mohsenfayyaz/GlobEnc``).

**This is an adaptation, not the paper.** The paper decomposes post-LN BERT layers
(attention → residual → LN1 → FFN → residual → LN2). An open_clip ViT block is pre-LN::

    y = x + ls_1(out_proj(attention(ln_1(x))))        # the state before the MLP
    x' = y + ls_2(mlp(ln_2(y)))

Per block (shapes: ``N`` tokens, ``H`` heads, ``dh`` head width, ``D = H·dh``):

1. ``f^h(u_j) = (u_j W_V^h + b_V^h) W_O^h`` with ``u = ln_1(x)``: token ``j``'s value vector of
   head ``h`` (value bias included, so the sum below is exact) through head ``h``'s column slice
   of the output projection, times the layer scale ``ls_1`` when the block has one. ``(H, N, D)``.
2. ``z_ij = Σ_h α^h_ij f^h(u_j)`` with the block's attention probabilities ``α`` (from the
   trace). ``(N, N, D)``.
3. ``y_ij = z_ij + δ_ij x_i``: the residual goes to the diagonal. The output-projection bias
   ``b_O`` is in no ``y_ij`` (the official ``BertNormOutput.forward`` in ``src/modeling/modeling_bert.py`` builds
   ``residual_weighted_layer`` from ``V·W_O`` and the residual only), so ``Σ_j y_ij = y_i − b_O``
   with ``y_i = x_i + b_O + Σ_j z_ij`` the block's true state before the MLP (times ``ls_1``
   when the block has a layer scale).
4. LN2 is decomposed with the variance of the actual ``y_i`` — **the only place ``b_O``
   enters**, as in the official code (``var`` from ``pre_ln_states``); LN's bias ``β`` is dropped:
   ``ŷ_ij = γ ⊙ (y_ij − mean(y_ij)) / sqrt(Var(y_i) + ε)``, so
   ``Σ_j ŷ_ij + β = ln_2(y_i) − γ ⊙ (b_O − mean(b_O)) / sqrt(Var(y_i) + ε)``.
   ``bias_on_diagonal = true`` (not the default, not the official code) also adds ``b_O`` to
   ``y_ii``, so that ``Σ_j y_ij = y_i`` and ``Σ_j ŷ_ij + β = ln_2(y_i)`` exactly.
5. ``N_enc[i, j] = ||ŷ_ij||₂ ≥ 0``. The MLP is not decomposed (skipped, as in the paper).
   Off the diagonal the norms come from per-source Gram matrices of the heads' centred
   contributions (``||ŷ_ij||² = α_ij^T K_j α_ij / s_i²``, float64), so the ``(N, N, D)`` vectors
   are never built (they are only with ``return_parts``, for tests).

Global attribution: ``G = N_enc^(e) ⋯ N_enc^(s)`` (first block rightmost) with no identity added
and no renormalisation (the official ``pre_process`` / ``compute_joint_attention(res=False)``);
the map is ``G[q, image tokens]`` for the query ``q`` ([CLS] or the clicked token). ``ln_post``
is not applied. The authors now point to DecompX as the more faithful successor.

Supported blocks: open_clip's ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) and
``CustomResidualAttentionBlock`` without a post-attention or inner norm; layer scale and head
scale are linear and are folded in. Anything else is refused with a message.

Runs on the model's device (float64 on the CPU, float32 on a GPU); the map is the query row of
``G``, computed as a vector-matrix chain; only that row comes to the host. Cost per block: one
``N·D²`` projection of the values (``f``), the attention output ``H·N²·d_h + N·D²`` and the Gram
matrices ``N·H²·D`` — about a sixth of a block's MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import to_host
from explorer.core.jobs import Progress
from explorer.core.results import Heatmap
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.api import Method, ParamError, resolve_layer
from explorer.plugin_host.protocols import ClipTower
from explorer_plugins.common.attention import query_index

__all__ = ["BlockDecomposition", "decompose_block", "decompose_tensors", "global_attribution", "GlobEnc"]

@dataclass(frozen=True)
class BlockDecomposition:
    """One block's decomposition, float32, as the trace keeps arrays (numpy on the CPU).

    ``n_enc (N, N)``: ``||ŷ_ij||``, row ``i`` = receiving token, column ``j`` = source token.
    ``y (N, N, D)``: contributions before LN2 (``Σ_j y_ij`` = state before the MLP minus the
    output-projection bias, unless ``bias_on_diagonal``), and ``y_hat (N, N, D)``: after the LN2
    decomposition; both only with ``return_parts``.
    """

    n_enc: object
    y: object = None
    y_hat: object = None


def _decompose(backend: ClipTower, layer: int, x, attention, return_parts: bool = False,
               bias_on_diagonal: bool = False):
    """The decomposition of block ``layer`` as tensors on the model's device, in the work dtype
    (float64 on the CPU, float32 on a device): ``(n_enc (N, N), y, y_hat)``."""
    import torch

    n = int(x.shape[-2])
    if attention.ndim != 3 or tuple(attention.shape[1:]) != (n, n):
        raise ParamError(f"GlobEnc: attention of block {layer} is {tuple(attention.shape)}, expected (H, {n}, {n})")
    try:
        parts = backend.attention_output_parts(layer)
    except ValueError as exc:
        raise ParamError(f"GlobEnc: {exc}") from None
    xt = backend.to_tensor(x)
    v = backend.block_values(layer, xt)  # values of ln_1(x), value bias included
    alpha32 = backend.as_tensor(attention, torch.float32)  # (H, N, N)
    return decompose_tensors(xt[0], v[0], alpha32, parts, return_parts, bias_on_diagonal)


def decompose_tensors(x, v, attention, parts, return_parts: bool = False, bias_on_diagonal: bool = False):
    """The GlobEnc decomposition of one block from its tensors (the lowest level; no model).

    Parameters
    ----------
    x : ``(N, D)`` torch tensor, the block's input (the residual).
    v : ``(H, N, dh)`` torch tensor, the values of ``ln_1(x)`` (value bias included).
    attention : ``(H, N, N)`` torch tensor, the attention probabilities (rows = queries).
    parts : an ``OutputParts``-like object: ``out_weight (D, D)``, ``out_bias (D,) | None``,
        ``layer_scale (D,) | None``, ``head_scale (H,) | None``, ``ln2_weight (D,)``, ``ln2_eps``.
    bias_on_diagonal : ``False`` (default, the official ``BertNormOutput``): the output-projection
        bias enters only the LayerNorm variance (through the true state ``x + out_proj(...)``), not
        any ``y_ij``. ``True``: the bias is also added to the diagonal terms ``y_ii`` (this
        project's earlier variant, which makes ``Σ_j y_ij`` equal the true state).

    Returns ``(n_enc (N, N), y, y_hat)`` in the work dtype (float64 on the CPU, float32 on a
    device); ``y`` and ``y_hat`` ``(N, N, D)`` only with ``return_parts``.
    """
    import torch

    n = int(x.shape[-2])
    # the two projections through W_O (N·D² each, most of the cost) in float32; the per-token
    # norms and variances after them in the work dtype (float64 on the CPU)
    wd = torch.float64 if x.device.type == "cpu" else torch.float32
    with torch.inference_mode():
        v = v.float()  # (H, N, dh)
        H, _, dh = v.shape
        d = H * dh
        if parts.head_scale is not None:
            v = v * parts.head_scale.float().view(H, 1, 1)
        w = parts.out_weight.float()  # (D, D): columns h*dh:(h+1)*dh belong to head h
        gamma = None if parts.layer_scale is None else parts.layer_scale.float()
        bias = parts.out_bias.to(wd) if parts.out_bias is not None else torch.zeros(d, device=w.device, dtype=wd)
        f = v @ w.reshape(d, H, dh).permute(1, 2, 0)  # (H, N, D) f^h(u_j) = v^h_j W_O^h, H GEMMs
        alpha32 = attention.float()  # (H, N, N)
        # Σ_j α-terms + x_i + b_O = x_i + b_O + out_proj(merge(α v)) (the cheap order)
        attn_out = (alpha32 @ v).transpose(0, 1).reshape(n, d) @ w.T
        if gamma is not None:
            f = f * gamma
            attn_out = attn_out * gamma
            bias = bias * gamma.to(wd)
        f_t = f.transpose(0, 1).contiguous()  # (N, H, D): every source token's H contributions
        x_w = x.to(wd)
        total = x_w + bias + attn_out.to(wd)  # (N, D): the true state before the MLP (bias included)
        scale = torch.sqrt(total.var(-1, unbiased=False) + parts.ln2_eps)  # (N,)
        # the diagonal residual: x_i (official), or x_i + b_O (bias_on_diagonal)
        resid = x_w + bias if bias_on_diagonal else x_w
        # Off the diagonal ŷ_ij = γ ⊙ Σ_h α^h_ij c^h_j / s_i with c^h_j = f^h_j - mean(f^h_j), so
        # ||ŷ_ij||² = α_ij^T K_j α_ij / s_i² with the per-source Gram matrix
        # K_j[h, h'] = <γ ⊙ c^h_j, γ ⊙ c^h'_j>: O(N·H²·D + N²·H²) instead of building (N, N, D).
        c = (f_t - f_t.mean(-1, keepdim=True)).mul_(parts.ln2_weight.float())  # (N, H, D)
        gram = torch.bmm(c, c.transpose(1, 2)).to(wd)  # (N, H, H)
        a_j = alpha32.permute(2, 0, 1).to(wd).contiguous()  # (N_j, H, N_i)
        sq = (torch.bmm(gram, a_j).mul_(a_j)).sum(1).T  # (N_i, N_j)
        n_enc = torch.sqrt(sq.clamp_min(0.0)) / scale[:, None]
        # the diagonal also holds the residual: computed as vectors
        diag = torch.diagonal(alpha32, dim1=1, dim2=2).T.contiguous()  # (N, H) α^h_ii
        diag_y = torch.bmm(diag[:, None, :], f_t)[:, 0].to(wd) + resid  # (N, D)
        ln_w = parts.ln2_weight.to(wd)
        diag_hat = ln_w * (diag_y - diag_y.mean(-1, keepdim=True)) / scale[:, None]
        idx = torch.arange(n, device=n_enc.device)
        n_enc[idx, idx] = torch.linalg.vector_norm(diag_hat, dim=-1)
        if not return_parts:
            return n_enc, None, None
        alpha = alpha32.to(wd)
        y = torch.einsum("hij,hje->ije", alpha, f.to(wd))  # (N, N, D) the explicit vectors (small models, tests)
        y[idx, idx] += resid
        y_hat = ln_w * (y - y.mean(-1, keepdim=True)) / scale[:, None, None]
        return n_enc, y, y_hat


def decompose_block(backend: ClipTower, layer: int, x, attention, return_parts: bool = False,
                    bias_on_diagonal: bool = False) -> BlockDecomposition:
    """Decompose block ``layer`` of the vision tower (see the module docstring).

    Parameters
    ----------
    backend
        The loaded CLIP tower (``ClipTower``: ``block_qkv`` and ``attention_output_parts``).
    layer
        Block index.
    x
        ``(N, D)`` the block's input (``trace.hidden(layer)``), numpy or a device tensor.
    attention
        ``(H, N, N)`` the block's attention probabilities (``trace.attention(layer)``), rows =
        queries.
    return_parts
        Also return the vector contributions ``y`` and ``y_hat`` ``(N, N, D)`` (tests).
    bias_on_diagonal
        Also put the output-projection bias into the diagonal terms (not the official code; see
        :func:`decompose_tensors`).
    """
    n_enc, y, y_hat = _decompose(backend, layer, x, attention, return_parts, bias_on_diagonal)
    keep = backend.to_trace_array
    if not return_parts:
        return BlockDecomposition(keep(n_enc.float()))
    return BlockDecomposition(keep(n_enc.float()), keep(y.float()), keep(y_hat.float()))


def global_attribution(n_encs: Sequence) -> np.ndarray:
    """``G = N_enc^(last) ⋯ N_enc^(first)`` ``(N, N)`` float64, first block first in ``n_encs``;
    no identity added, no renormalisation (the official ``pre_process``)."""
    joint = None
    for m in n_encs:
        m = np.asarray(m, dtype=np.float64)
        joint = m if joint is None else m @ joint
    if joint is None:
        raise ParamError("GlobEnc needs at least one layer")
    return joint


class GlobEnc(Method):
    """GlobEnc adapted to pre-LN ViTs; see the module docstring."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        start_layer: int = Field(0, description="First block multiplied in (the paper: 0).", json_schema_extra={"role": "layer"})
        end_layer: int = Field(-1, description="Last block multiplied in (negative counts from the last).", json_schema_extra={"role": "layer"})
        scale_to_max: bool = Field(
            False, description="Divide the map by its largest value over the sequence (display only; the paper's G is unnormalised).")
        bias_on_diagonal: bool = Field(
            False, description="Also add the attention output-projection bias to the diagonal contributions "
            "(not the official code, which uses that bias only in the LayerNorm variance).")

    def _layers(self, params, n_layers: int) -> list[int]:
        s = resolve_layer(params.start_layer, n_layers, "start_layer")
        e = resolve_layer(params.end_layer, n_layers, "end_layer")
        if s > e:
            raise ParamError(f"start_layer {s} is after end_layer {e}")
        return list(range(s, e + 1))

    def capture(self, params, model, target):
        layers = self._layers(params, model.n_layers)
        return CaptureSpec(attention_layers=layers, hidden_layers=layers)  # each block's input

    def run(self, trace, params, *, target, cancel, backend=None):
        cancel.raise_if_cancelled()
        if backend is None:
            raise ParamError("GlobEnc needs the loaded model")
        if getattr(backend, "kind", None) != "clip":
            raise ParamError("GlobEnc decomposes open_clip vision blocks; this backend is not clip")
        if trace.attention_rows is not None:
            raise ParamError("GlobEnc needs every attention row; this trace kept only some")
        layers = self._layers(params, trace.model.n_layers)
        q = query_index(trace.layout, target)
        n_encs = []
        for i, l in enumerate(layers):
            cancel.raise_if_cancelled()
            n_encs.append(_decompose(backend, l, trace.hidden(l), trace.attention(l),
                                     bias_on_diagonal=params.bias_on_diagonal)[0])
            yield Progress((i + 1) / len(layers), f"GlobEnc block {l}")
        # G[q] = e_q N_e ⋯ N_s as a vector-matrix chain, on the device
        row = n_encs[-1][q]
        for m in reversed(n_encs[:-1]):
            row = row @ m
        row = to_host(row, np.float64)
        if params.scale_to_max and row.max() > 0:
            row = row / row.max()
        elif np.abs(row).max() > np.finfo(np.float32).max:
            raise ParamError("GlobEnc values overflow float32 for this many blocks; set scale_to_max=true")
        who = "[CLS]" if q == trace.layout.cls_index else f"token {q}"
        return Heatmap(
            layout=trace.layout,
            token_values=trace.layout.gather(row),
            label=f"GlobEnc (pre-LN adaptation) of {who}, layers {layers[0]}-{layers[-1]}",
            meta={"layers": layers, "query": q, "scaled_to_max": params.scale_to_max,
                  "bias_on_diagonal": params.bias_on_diagonal},
        )
