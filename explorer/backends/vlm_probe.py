"""Attention probe for transformers models: selected rows only, fused kernels kept.

A custom attention function is registered once with transformers' ``AttentionInterface`` (and
the SDPA mask function with ``AttentionMaskInterface``, so masks are built as for SDPA). It
computes every output with SDPA, and additionally, only for the attention modules and query rows
asked for, the post-softmax rows ``softmax(q_rows · Kᵀ · scale)`` (keys after RoPE and
``repeat_kv``), keeping just the key columns asked for (the image tokens). What to capture lives
in a context variable set by :func:`capture`, so concurrent passes of other models are untouched.
With ``keep_graph`` the full probabilities of the selected modules stay in the autograd graph
(relevancy needs their gradients) and the output is computed from them.

Shapes: query ``(B, H, q, d)``, key/value ``(B, H_kv, k, d)``; captured rows ``(B, H, r, c)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["PROBE_NAME", "ensure_registered", "ProbeRequest", "capture", "current"]

PROBE_NAME = "explorer_probe"
_STATE: contextvars.ContextVar["ProbeRequest | None"] = contextvars.ContextVar("explorer_probe_state", default=None)
_REGISTERED = False


@dataclass
class ProbeRequest:
    """What to keep during the passes run inside :func:`capture`.

    ``modules``: attention module -> name (e.g. ``"llm.3"``, ``"vit.0"``) of the modules probed;
    ``rows``: name -> query rows to keep (indices into the current query block; ``-1`` = last row;
    ``None`` = every row); ``columns``: name -> key columns kept (``None`` = all);
    ``keep_keys``: names whose post-RoPE keys are stored; ``keep_graph``: full probabilities in
    the graph (relevancy). Results accumulate in ``rows_out[name]`` (one entry per call),
    ``keys_out`` and ``probs_out``.
    """

    modules: dict[int, str] = field(default_factory=dict)
    rows: dict[str, list[int] | None] = field(default_factory=dict)
    columns: dict[str, torch.Tensor | None] = field(default_factory=dict)
    keep_keys: set[str] = field(default_factory=set)
    keep_graph: bool = False
    rows_out: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    keys_out: dict[str, torch.Tensor] = field(default_factory=dict)
    probs_out: dict[str, torch.Tensor] = field(default_factory=dict)

    def unwatch(self, module: torch.nn.Module) -> None:
        """Stop keeping anything of ``module`` (what it kept so far stays in the outputs)."""
        self.modules.pop(id(module), None)

    def watch(self, module: torch.nn.Module, name: str, rows: list[int] | None = (-1,), columns=None,
              keys: bool = False) -> None:
        self.modules[id(module)] = name
        self.rows[name] = None if rows is None else list(rows)
        self.columns[name] = columns
        if keys:
            self.keep_keys.add(name)


def current() -> ProbeRequest | None:
    return _STATE.get()


@contextlib.contextmanager
def capture(request: ProbeRequest) -> Iterator[ProbeRequest]:
    token = _STATE.set(request)
    try:
        yield request
    finally:
        _STATE.reset(token)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups <= 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def probe_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            is_causal=None, **kwargs):
    """The registered attention function (see module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    req = _STATE.get()
    name = None if req is None else req.modules.get(id(module))
    if name is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    k = _repeat_kv(key, groups)
    v = _repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len, k_len = query.shape[2], k.shape[2]
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and attention_mask is None
    if name in req.keep_keys:
        req.keys_out[name] = k.detach()

    def row_logits(qr: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
        logits = (qr @ k.transpose(-1, -2)) * scale
        if attention_mask is not None:
            m = attention_mask
            if m.dtype == torch.bool:
                m = torch.zeros_like(m, dtype=logits.dtype).masked_fill(~m, float("-inf"))
            logits = logits + m.index_select(-2, row_index) if m.shape[-2] == q_len else logits + m
        elif causal and q_len > 1:
            # query i sits at key position k_len - q_len + i
            pos = (k_len - q_len) + row_index
            allowed = torch.arange(k_len, device=logits.device)[None, :] <= pos[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits

    if req.keep_graph:
        idx = torch.arange(q_len, device=query.device)
        probs = torch.softmax(row_logits(query, idx).float(), dim=-1).to(query.dtype)
        if probs.requires_grad:
            probs.retain_grad()
        req.probs_out[name] = probs
        out = (probs @ v).transpose(1, 2).contiguous()
        return out, None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, **kwargs)
    rows = req.rows.get(name)
    idx = torch.arange(q_len, device=query.device) if rows is None else torch.tensor(
        [r % q_len for r in rows], device=query.device, dtype=torch.long)
    with torch.no_grad():
        probs = torch.softmax(row_logits(query.index_select(2, idx), idx).float(), dim=-1)
        cols = req.columns.get(name)
        kept = probs if cols is None else probs.index_select(-1, cols.to(probs.device))
        req.rows_out.setdefault(name, []).append(kept.detach())  # (B, H, r, c), on the device
    return out, None


def ensure_registered() -> None:
    """Register the probe with transformers (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE_NAME, probe_attention_forward)
    if PROBE_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)
    _REGISTERED = True
