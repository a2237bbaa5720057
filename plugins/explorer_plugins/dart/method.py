"""DART: pruning by duplication (Wen et al., EMNLP 2025), at a vision-encoder block.

Official selection (``DART.get_retained_image_token``, ``ZichenWen1/DART``, read via the
``xqy1111111/DART`` mirror and llmc's ``dart.py``):

1. pivots: the ``P_img`` image tokens with the largest **L1 norm of their keys** (keys flattened
   over heads, ``[n, H·d_h]``), plus ``P_txt`` text tokens;
2. ``valid`` = the image tokens minus the image pivots;
3. for each pivot, the ``TOKEN_TOPK`` valid tokens *least* cosine-similar to it on the normed
   hidden states (top-k of ``−cos``) are kept and leave ``valid``;
4. kept = image pivots ∪ the selected tokens, in sequence order;
   ``TOKEN_TOPK = ceil((n·keep) // (P_img + P_txt))``, so ``P_img + (P_img + P_txt)·TOKEN_TOPK``
   tokens are kept.

Encoder adaptation (stated in the manifest):

* keys = the reduction block's keys ``state.keys (H, N, d_h)`` of the patch tokens, flattened
  over heads (the official code uses the keys of layer ``K−1`` feeding the pruned layer ``K``;
  here they feed the block whose MLP then runs on fewer tokens);
* features = the block's tokens ``state.x`` (after its attention) through a **parameter-free
  LayerNorm** ``(x − mean)/sqrt(var + 1e-5)``; the official code applies the LLM's final norm
  (with its learned scale), which a numpy step cannot reach — and the cosine of parameter-free
  LN'd vectors is the Pearson correlation of the features, invariant to a per-token shift/scale;
* no text pivots: a vision encoder has no question tokens, and the [CLS] token is not used as a
  substitute (it would make the selection query-like, which DART is not in an encoder);
* pivot order (``pivot_order``): ``official`` (default) visits the pivots in the order the official
  loop ``for item in list(indices_set)`` does, ``indices_set = set(image_indices + query_indices)``
  — CPython's set order of the pivots' sequence positions, which here are the patch tokens'
  positions in the block's sequence (``n_prefix + i``), inserted by descending key norm
  (:func:`~explorer_plugins.common.selection.dart_pivot_order` builds the same set); the order
  matters because each pivot removes its picks from ``valid`` before the next one chooses.
  ``key_norm`` (this plugin's earlier documented order) visits them by descending key norm,
  ``position`` by ascending position. Ties in ``−cos`` are broken by sequence order.

Count modes: ``official`` is the formula above with ``P_txt = 0``:
``TOKEN_TOPK = floor(n·keep / P_img)``, keeping ``P_img·(1 + TOKEN_TOPK)`` (up to ``P_img`` more
than the budget); ``closest`` picks ``TOKEN_TOPK = round((k − P)/P)`` with ``k = round(keep·n)`` so
that ``P·(1 + TOKEN_TOPK)`` is the multiple of ``P`` nearest the budget; ``exact`` hands the
remainder ``(k − P) mod P`` to the first pivots (``TOKEN_TOPK + 1`` each), keeping exactly ``k``.
When ``valid`` runs out a pivot takes what is left; a budget at or above ``n`` keeps everything;
a budget ``k`` below ``P`` (closest/exact) uses the ``k`` strongest pivots alone.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.arrays import as_work, device, index_array, namespace, stable_argsort, to_host
from explorer.core.reduction import ReductionStep, TokenState, keep_count
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams
from explorer_plugins.common.selection import dart_pivot_order

__all__ = ["Dart", "dart_select", "dart_counts", "layer_norm", "key_l1"]


def _arr(a):
    return a if hasattr(a, "dtype") and hasattr(a, "shape") else np.asarray(a)


def layer_norm(x, eps: float = 1e-5):
    """Parameter-free LayerNorm over the last axis (work dtype, the array's namespace)."""
    x = _arr(x)
    xp = namespace(x)
    x = as_work(x, xp)
    mu = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + eps)


def key_l1(keys):
    """L1 norm of every token's key flattened over heads: ``keys (H, N, d_h)`` -> ``(N,)``."""
    keys = _arr(keys)
    xp = namespace(keys)
    return xp.sum(xp.abs(as_work(keys, xp)), axis=(0, 2))


def dart_counts(n: int, keep: float, pivots: int, mode: str) -> tuple[int, list[int]]:
    """``(P, per-pivot TOKEN_TOPK list)`` for ``n`` image tokens (see the module docstring)."""
    if mode == "official":
        p = min(pivots, n)
        t = int(np.ceil((n * keep) // p))
        return p, [t] * p
    k = keep_count(keep, n, "round")
    p = min(pivots, k)
    r = k - p
    if mode == "closest":
        t = int(np.floor(r / p + 0.5))
        return p, [t] * p
    if mode == "exact":
        t, extra = divmod(r, p)
        return p, [t + 1 if i < extra else t for i in range(p)]
    raise ValueError(f"unknown DART count mode {mode!r}; use closest, exact or official")


def dart_select(key_norm, feats, n_pivots: int, token_topk, *, order: str = "official", positions=None):
    """DART's retained set over ``n`` tokens, in the arrays' namespace.

    Parameters
    ----------
    key_norm : (n,) pivot scores (key L1 norms). feats : (n, d) normed features (cosine is taken
        on them). n_pivots : ``P``. token_topk : per-pivot count (an int applies to all pivots; a
        list gives one count per pivot in visiting order).
    order : the pivots' visiting order, ``official`` / ``key_norm`` / ``position``
        (:func:`~explorer_plugins.common.selection.dart_pivot_order`).
    positions : (n,) the tokens' sequence positions (host ints), whose set order ``official``
        follows; default ``0..n-1``.

    Returns
    -------
    keep : sorted retained indices. pivots : the pivot indices in visiting order.

    The candidates are kept as a mask (no shapes depend on values until the end), so the loop
    stays on the device; the tokens no longer valid rank last (``+inf``) and are never taken. Only
    the ``P`` pivot indices are read back to the host to fix their order.
    """
    key_norm, feats = _arr(key_norm), _arr(feats)
    xp = namespace(feats)
    n = feats.shape[0]
    dev = device(feats)
    ranked = to_host(stable_argsort(as_work(key_norm, xp), descending=True)[: min(n_pivots, n)]).astype(np.int64)
    pos = np.arange(n) if positions is None else np.asarray(positions).reshape(-1)
    visit = ranked[dart_pivot_order(pos[ranked], order)]
    pivots = index_array(visit, feats)
    counts = [int(token_topk)] * len(visit) if np.isscalar(token_topk) else [int(t) for t in token_topk]
    f = as_work(feats, xp)
    u = f / xp.clip(xp.linalg.vector_norm(f, axis=1, keepdims=True), 1e-8, None)  # F.cosine_similarity's eps
    valid = xp.ones(n, dtype=xp.bool, device=dev)
    valid[pivots] = False
    kept = xp.zeros(n, dtype=xp.bool, device=dev)
    kept[pivots] = True
    inf = xp.asarray(xp.inf, dtype=u.dtype, device=dev)
    for i, t in enumerate(counts):
        if t <= 0:
            continue
        cos = xp.where(valid, u @ u[int(visit[i])], inf)
        chosen = stable_argsort(cos)[:t]  # the least similar valid ones first
        ok = valid[chosen]
        kept[chosen] = kept[chosen] | ok
        valid[chosen] = False
    return xp.nonzero(kept)[0], pivots


class Dart(ReductionMethod):
    """DART at a block of the vision encoder (see module docstring)."""

    host_only = False  # array API: selected on the device

    class Params(ReductionParams):
        pivots: int = Field(4, ge=1, description="Image pivot tokens P_img: the tokens with the largest key L1 "
                            "norm (official pivot_image_token = 4).")
        count: Literal["closest", "exact", "official"] = Field(
            "closest", description="closest: TOKEN_TOPK so that P·(1 + TOKEN_TOPK) is nearest round(keep·n); "
            "exact: the remainder spread over the first pivots so exactly round(keep·n) remain; official: "
            "TOKEN_TOPK = (n·keep) // P and P + P·TOKEN_TOPK kept (no text pivots).")
        pivot_order: Literal["official", "key_norm", "position"] = Field(
            "official", description="Order in which the pivots choose (each removes its picks before the next): "
            "official: the official code's Python set order of the pivots' sequence positions; key_norm: "
            "descending key L1 norm (this plugin's earlier order); position: ascending position.")

    def attention_need(self, params) -> str:
        return "none"

    def capture(self, params, model, target):
        first = self.stages(params, model)[0]
        return CaptureSpec(hidden_layers={first})

    def reduce(self, state: TokenState, params) -> ReductionStep:
        p0 = state.n_prefix
        n = state.n_patches
        norms = key_l1(state.keys[:, p0:])
        if params.keep >= 1.0 or (params.count != "official" and keep_count(params.keep, n, "round") >= n):
            return ReductionStep(keep=index_array(np.arange(n), norms), scores=norms)
        p, topk = dart_counts(n, params.keep, params.pivots, params.count)
        keep, _ = dart_select(norms, layer_norm(state.x[p0:]), p, topk, order=params.pivot_order,
                              positions=p0 + np.arange(n))
        return ReductionStep(keep=keep, scores=norms)
