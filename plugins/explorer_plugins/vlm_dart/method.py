"""DART inside the language model (Wen et al., EMNLP 2025).

"Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More".
Official selection (``ZichenWen1/DART``, ``DART.get_retained_image_token`` in
``llava/model/language_model/modeling_llama_self.py``, read via the ``xqy1111111/DART`` mirror;
llmc's ``dart.py``), run once before LLM layer ``K`` (``pruned_layer = 2``):

1. ``any_states`` = the **keys of layer K−1** (post-RoPE, after ``repeat_kv``) flattened over the
   heads ``[N, H·d_h]`` (``state.keys``, captured by the backend's probe);
   ``last_layer_state = norm(h)``: the output of layer ``K−1`` (``state.hidden``) through the
   model's **final RMSNorm** (its weight and epsilon come from ``VlmModel.final_norm`` via
   :meth:`VlmDart.extras`; computed where the model runs, float64 on the CPU);
2. pivots: the ``P_img`` image tokens and the ``P_txt`` tokens *after the image block* (the
   question and the assistant prompt, ``state.text``) with the largest **L1 norm of their keys**;
3. ``valid`` = the image tokens minus the image pivots; for each pivot in turn, the
   ``TOKEN_TOPK`` valid tokens **least** cosine-similar to it on the normed hidden states are kept
   and leave ``valid``;
4. kept = image pivots ∪ the selected tokens (text pivots are never dropped: only image tokens
   are pruned), in sequence order, with their original position ids;
   ``TOKEN_TOPK = ceil((M if max_num_trunction else n·keep) // (P_img + P_txt))``, so
   ``P_img + (P_img + P_txt)·TOKEN_TOPK`` image tokens remain (132 for LLaVA-1.5's "128").

Pivot order (``pivot_order``): the official loop ``for item in list(indices_set)`` with
``indices_set = set(image_indices + query_indices)`` visits the pivots in CPython's set order of
their sequence positions, and the order matters because each pivot removes its picks from
``valid`` before the next one chooses. ``official`` (default) reproduces it by building the same
set from the same positions in the same insertion order (image pivots, then text pivots, each by
descending key norm; :func:`~explorer_plugins.common.selection.dart_pivot_order`); ``position``
(this plugin's earlier order) visits them in ascending sequence order (image pivots, then text
pivots); ``key_norm`` in the insertion order. Ties in ``−cos`` and in the key norms are broken by
position. When a
prompt has fewer than ``P_txt`` tokens after the image (or fewer than ``P_img`` image tokens),
the counts use the pivots that exist. ``count = "exact"`` keeps exactly ``k = round(keep·n)``: the
``k − P_img`` selections are spread over the pivots (the first ones take the remainder); a budget
``k ≤ P_img`` keeps the ``k`` strongest image pivots alone.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from explorer.core.arrays import as_work, asarray_like, device, index_array, namespace, stable_argsort, take, to_host
from explorer.core.generation import PruneDecision, PruneState
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.vlm import VlmPruningMethod, VlmPruningParams
from explorer.plugin_host.protocols import VlmModel
from explorer_plugins.common.selection import dart_pivot_order, top_k_sorted

__all__ = ["VlmDart", "rms_norm", "key_l1", "dart_token_topk", "dart_select"]


def _arr(a):
    return a if hasattr(a, "dtype") and hasattr(a, "shape") else np.asarray(a)


def rms_norm(h, weight, eps: float):
    """Llama/Qwen RMSNorm ``h / sqrt(mean(h²) + eps) · weight`` over the last axis, in the work dtype
    of ``h``'s namespace (float64 on the CPU)."""
    h = _arr(h)
    xp = namespace(h)
    h = as_work(h, xp)
    out = h / xp.sqrt(xp.mean(h * h, axis=-1, keepdims=True) + eps)
    return out if weight is None else out * asarray_like(weight, out, dtype=out.dtype)


def key_l1(keys, positions):
    """L1 norm of the keys ``(H, N, d)`` of the sequence ``positions``, flattened over the heads."""
    keys = _arr(keys)
    xp = namespace(keys)
    return xp.sum(xp.abs(as_work(take(keys, positions, axis=1), xp)), axis=(0, 2))


def dart_token_topk(n: int, keep: float, n_pivots: int, max_num_trunction: int | None = None) -> int:
    """The official ``TOKEN_TOPK = ceil(base // (P_img + P_txt))``, ``base = M`` or ``n·keep``."""
    if n_pivots < 1:
        raise ValueError("DART needs at least one pivot")
    base = float(max_num_trunction) if max_num_trunction is not None else n * keep
    return int(math.ceil(base // n_pivots))


def _unit(x):
    xp = namespace(x)
    x = as_work(x, xp)
    return x / xp.clip(xp.linalg.vector_norm(x, axis=-1, keepdims=True), 1e-12, None)


def dart_select(img_feats, img_l1, txt_feats, txt_l1, p_img: int, p_txt: int, counts: int | Sequence[int], *,
                order: str = "official", img_pos=None, txt_pos=None):
    """The DART selection, in the arrays' namespace (the loop keeps its candidates as a mask, so
    nothing but the pivot indices is read back until the end).

    Parameters
    ----------
    img_feats : (n, D) normed hidden states of the image tokens (sequence order).
    img_l1 : (n,) key L1 norms of the image tokens.
    txt_feats, txt_l1 : the same for the tokens after the image block, ``(t, D)``, ``(t,)``.
    p_img, p_txt : pivot counts (capped at ``n`` and ``t``).
    counts : tokens each pivot selects (``TOKEN_TOPK``), or one count per pivot in visiting order.
    order : the pivots' visiting order, ``official`` / ``position`` / ``key_norm``
        (:func:`~explorer_plugins.common.selection.dart_pivot_order`).
    img_pos, txt_pos : sequence positions of the image and text tokens (host ints), whose set order
        ``official`` follows; default ``0..n-1`` and ``n..n+t-1``.

    Returns
    -------
    keep : sorted indices into the image tokens. image_pivots, text_pivots : sorted indices.
    """
    img_feats, img_l1, txt_feats, txt_l1 = _arr(img_feats), _arr(img_l1), _arr(txt_feats), _arr(txt_l1)
    xp = namespace(img_feats)
    dev = device(img_feats)
    n, t = int(img_feats.shape[0]), int(txt_feats.shape[0])
    p_img, p_txt = min(int(p_img), n), min(int(p_txt), t)
    img_pos = np.arange(n) if img_pos is None else np.asarray(img_pos).reshape(-1)
    txt_pos = n + np.arange(t) if txt_pos is None else np.asarray(txt_pos).reshape(-1)
    img_rank = to_host(stable_argsort(as_work(img_l1, xp), descending=True)[:p_img]).astype(np.int64)
    u = _unit(img_feats)
    if t:
        txt_feats = asarray_like(txt_feats, u, dtype=u.dtype)
        txt_l1 = asarray_like(txt_l1, u)
        txt_rank = to_host(stable_argsort(as_work(txt_l1, xp), descending=True)[:p_txt]).astype(np.int64)
        ut = _unit(txt_feats)
    else:
        txt_rank = np.zeros(0, dtype=np.int64)
        ut = None
    # (is text, index) per pivot in the official insertion order, then visited in the chosen order
    ranked = [(False, int(i)) for i in img_rank] + [(True, int(j)) for j in txt_rank]
    where = np.concatenate([img_pos[img_rank], txt_pos[txt_rank]])
    visit = [ranked[k] for k in dart_pivot_order(where, order)]
    pivots = [ut[j] if is_txt else u[j] for is_txt, j in visit]
    per = [int(counts)] * len(pivots) if np.isscalar(counts) else [int(c) for c in counts]
    if len(per) != len(pivots):
        raise ValueError(f"{len(per)} counts for {len(pivots)} pivots")
    img_piv = index_array(np.sort(img_rank), u)
    txt_piv = index_array(np.sort(txt_rank), u)
    valid = xp.ones(n, dtype=xp.bool, device=dev)
    valid[img_piv] = False
    kept = xp.zeros(n, dtype=xp.bool, device=dev)
    kept[img_piv] = True
    inf = xp.asarray(xp.inf, dtype=u.dtype, device=dev)
    for vec, c in zip(pivots, per):
        if c <= 0:
            continue
        cos = xp.where(valid, u @ vec, inf)  # the tokens no longer valid rank last and are never taken
        chosen = stable_argsort(cos)[:c]  # the least similar (top-k of −cos)
        ok = valid[chosen]
        kept[chosen] = kept[chosen] | ok
        valid[chosen] = False
    return xp.nonzero(kept)[0], img_piv, txt_piv


class VlmDartParams(VlmPruningParams):
    keep: float = Field(0.222, gt=0.0, le=1.0, description="1 − reduction_ratio (the scripts use 0.778 / 0.889): "
                        "TOKEN_TOPK = ceil((n·keep) // (P_img + P_txt)) unless max_num_trunction is set.")
    layer: int = Field(2, ge=1, description="K (pruned_layer): image tokens are dropped before LLM layer K using "
                       "the keys and hidden states of layer K−1.")
    seed: int = Field(0, ge=0, description="Unused (DART is deterministic); kept for the common form.")
    pivot_image_token: int = Field(4, ge=0, description="P_img: image pivots (largest key L1 norm), always kept.")
    pivot_text_token: int = Field(4, ge=0, description="P_txt: pivots among the tokens after the image (the "
                                  "question), by the same key norm; they guide the selection and are never dropped.")
    max_num_trunction: int | None = Field(None, ge=1, description="MAX_NUM_TRUNCTION: when set, TOKEN_TOPK = "
                                          "ceil(M // (P_img + P_txt)) ignores keep (the LLaVA-1.5 scripts use 128 "
                                          "for 576 tokens, keeping 132).")
    count: Literal["official", "exact"] = Field("official", description="official: P_img + (P_img+P_txt)·TOKEN_TOPK "
                                                "tokens; exact: exactly round(keep·n), the remainder spread over the "
                                                "first pivots.")
    pivot_order: Literal["official", "position", "key_norm"] = Field(
        "official", description="Order in which the pivots choose (each removes its picks before the next): "
        "official: the official code's Python set order of the pivots' sequence positions; position: ascending "
        "sequence position (this plugin's earlier order); key_norm: image pivots then text pivots, each by "
        "descending key L1 norm.")


class VlmDart(VlmPruningMethod):
    """DART inside the VLM (see module docstring)."""

    Params = VlmDartParams

    def prune_layer(self, params, n_layers: int) -> int:
        if params.layer < 1:
            raise ParamError("DART needs the keys of layer K−1: layer must be at least 1")
        return super().prune_layer(params, n_layers)

    def needs_keys(self, params) -> bool:
        return True

    def extras(self, backend: VlmModel, prepared, params) -> dict:
        weight, eps = backend.final_norm()
        return {"norm_weight": weight, "norm_eps": float(eps)}

    def counts(self, params, n: int, p_img: int, p_txt: int) -> tuple[int, list[int]]:
        """``(image pivots used, tokens per pivot in visiting order)`` for ``n`` image tokens."""
        n_piv = p_img + p_txt
        if params.count == "official":
            return p_img, [dart_token_topk(n, params.keep, n_piv, params.max_num_trunction)] * n_piv
        k = self.keep_count(params, n)
        if k <= p_img or n_piv == 0:
            return min(k, p_img), []
        base, rem = divmod(k - p_img, n_piv)
        return p_img, [base + 1] * rem + [base] * (n_piv - rem)

    def decide(self, state: PruneState, params) -> PruneDecision:
        if state.keys is None:
            raise ValueError("DART needs the keys of the previous layer")
        n, t = len(state.image), len(state.text)
        p_img, p_txt = min(params.pivot_image_token, n), min(params.pivot_text_token, t)
        if p_img + p_txt == 0:
            raise ParamError("DART needs at least one pivot (pivot_image_token or pivot_text_token)")
        feats = rms_norm(state.hidden, state.extras.get("norm_weight"), state.extras.get("norm_eps", 1e-6))
        img_l1, txt_l1 = key_l1(state.keys, state.image), key_l1(state.keys, state.text)
        p_img, per = self.counts(params, n, p_img, p_txt)
        if not per:  # a budget below the image pivots: the strongest pivots alone
            keep = top_k_sorted(img_l1, max(1, p_img))
        else:
            keep, _, _ = dart_select(take(feats, state.image, axis=0), img_l1, take(feats, state.text, axis=0), txt_l1,
                                     p_img, p_txt, per, order=params.pivot_order, img_pos=state.image,
                                     txt_pos=state.text)
        return PruneDecision(keep=keep, scores=img_l1)
