"""Attention adapters and the attention probe for open_clip vision blocks.

An :class:`AttentionAdapter` exposes the three pieces of one attention module that every method
needs: ``qkv(x)`` (per-head queries, keys and values), ``logits(q, k)`` (pre-softmax scores the way
that module computes them) and ``output(o)`` (merge heads and apply the output projection). With
them the probe recomputes nothing: for the layers asked for, the module's forward is replaced
*for the duration of one pass* by an explicit computation that keeps the probabilities; every other
layer keeps the fused kernel. Dense-map methods (MaskCLIP and relatives) use the same adapters to
run a block with a different attention.

Shapes: ``x (B, N, D)``; ``q, k, v (B, H, N, dh)``; logits and probabilities ``(B, H, Nq, N)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionAdapter", "adapter_for", "AttentionProbe", "probe_attention"]


class AttentionAdapter:
    """Uniform access to an attention module's projections (self-attention only)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.module
        B, N, D = x.shape
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        H = self.num_heads
        return tuple(t.reshape(B, N, H, D // H).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """The values alone ``(B, H, N, dh)``: a third of the in-projection (methods that read
        only ``v``: MaskCLIP's identity attention, CLIP Surgery's v-v path, GlobEnc)."""
        m = self.module
        B, N, D = x.shape
        w, b = m.in_proj_weight[2 * D:], None if m.in_proj_bias is None else m.in_proj_bias[2 * D:]
        H = self.num_heads
        return F.linear(x, w, b).reshape(B, N, H, D // H).transpose(1, 2)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        B, H, N, dh = o.shape
        return o.transpose(1, 2).reshape(B, N, H * dh)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """``o (B, H, N, dh)`` -> ``(B, N, D)`` through the output projection."""
        m = self.module
        return F.linear(self.merge_heads(o), m.out_proj.weight, m.out_proj.bias)

    def fused(self, q, k, v, attn_mask=None) -> torch.Tensor:
        """Attention output with the fused kernel (no probabilities)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class _MHAAdapter(AttentionAdapter):
    """``torch.nn.MultiheadAttention`` with packed in-projection (open_clip's default block)."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        super().__init__(module)
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise ValueError("MultiheadAttention with separate q/k/v projections or bias_k/add_zero_attn is not supported")
        if not module.batch_first:
            raise ValueError("MultiheadAttention must be batch_first (open_clip >= 2.21 builds it so)")


class _OpenClipAttentionAdapter(AttentionAdapter):
    """open_clip's own ``Attention`` (qk-norm, scaled-cosine attention, head scale, inner norm)."""

    def logits(self, q, k):
        m = self.module
        if m.logit_scale is not None:
            scale = torch.clamp(m.logit_scale, max=m.logit_scale_max).exp()
            return (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)) * scale.view(1, -1, 1, 1)
        q, k = m.ln_q(q), m.ln_k(k)
        return (q * m.scale) @ k.transpose(-1, -2)

    def output(self, o):
        m = self.module
        if m.head_scale is not None:
            o = o * m.head_scale
        x = self.merge_heads(o)
        x = m.ln_inner(x)
        return m.out_proj(x)

    def fused(self, q, k, v, attn_mask=None):
        probs = self.logits(q, k)
        if attn_mask is not None:
            probs = probs + attn_mask
        return probs.softmax(-1) @ v


def adapter_for(module: nn.Module) -> AttentionAdapter:
    """The adapter for an attention module, or ``ValueError`` naming the unsupported type."""
    if isinstance(module, nn.MultiheadAttention):
        return _MHAAdapter(module)
    if type(module).__name__ == "Attention" and hasattr(module, "in_proj_weight") and hasattr(module, "ln_inner"):
        return _OpenClipAttentionAdapter(module)
    raise ValueError(f"unsupported attention module {type(module).__name__}")


@dataclass
class AttentionProbe:
    """Captured probabilities of one pass: ``probs[layer]`` is ``(B, H, Nq, N)``."""

    rows: Sequence[int] | None = None
    keep_graph: bool = False
    probs: dict[int, torch.Tensor] = field(default_factory=dict)


def _probe_forward(adapter: AttentionAdapter, layer: int, probe: AttentionProbe):
    module = adapter.module
    is_mha = isinstance(module, nn.MultiheadAttention)

    def forward(*args, **kwargs):
        x = args[0] if args else kwargs.get("query", kwargs.get("x"))
        if is_mha:
            key = args[1] if len(args) > 1 else kwargs.get("key")
            if key is not None and key is not x:
                raise ValueError("the attention probe supports self-attention only")
        attn_mask = kwargs.get("attn_mask")
        q, k, v = adapter.qkv(x)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        if probe.rows is None:
            logits = adapter.logits(q, k)
            if attn_mask is not None:
                logits = logits + attn_mask
            probs = logits.softmax(-1)
            o = probs @ v
        else:
            o = adapter.fused(q, k, v, attn_mask)
            rows = torch.as_tensor(list(probe.rows), device=q.device, dtype=torch.long)
            logits = adapter.logits(q.index_select(2, rows), k)
            if attn_mask is not None:
                logits = logits + (attn_mask.index_select(-2, rows) if attn_mask.dim() >= 2 else attn_mask)
            probs = logits.softmax(-1)
        if probe.keep_graph and probs.requires_grad:
            probs.retain_grad()
        probe.probs[layer] = probs if probe.keep_graph else probs.detach()
        out = adapter.output(o)
        return (out, None) if is_mha else out

    return forward


@contextlib.contextmanager
def probe_attention(
    attn_modules: Sequence[nn.Module],
    layers: Sequence[int],
    rows: Sequence[int] | None = None,
    keep_graph: bool = False,
) -> Iterator[AttentionProbe]:
    """Keep the attention probabilities of ``layers`` during the passes run inside the block.

    ``attn_modules[l]`` is block ``l``'s attention module. The override is an instance attribute
    installed here and removed in ``finally``, so nothing stays attached after an exception.
    With ``keep_graph`` the probabilities stay in the autograd graph (``.grad`` after backward).
    """
    probe = AttentionProbe(rows=None if rows is None else list(rows), keep_graph=keep_graph)
    installed: list[nn.Module] = []
    try:
        for layer in sorted(set(layers)):
            if not 0 <= layer < len(attn_modules):
                raise IndexError(f"layer {layer} out of range for {len(attn_modules)} blocks")
            module = attn_modules[layer]
            adapter = adapter_for(module)
            module.forward = _probe_forward(adapter, layer, probe)  # instance override
            installed.append(module)
        yield probe
    finally:
        for module in installed:
            module.__dict__.pop("forward", None)


def is_probed(module: nn.Module) -> bool:
    """True while a probe override is attached to ``module`` (for tests and assertions)."""
    return "forward" in module.__dict__


def head_dim_scale(dh: int) -> float:
    return 1.0 / math.sqrt(dh)
