"""MustDrop: Multi-Stage Vision Token Dropping (Liu et al., arXiv 2411.10803).

Official code: ``liuting20/MustDrop`` — ``llava/model/multimodal_encoder/local_merge.py``
(``conditional_pooling``, ``merge_wavg``), ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionModelAcc.custom_forward``: the merge after layer 0, the key set at the last layer) and
``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``:
``pruning_layers = [2, 6, 10, 14]``, ``dual_attention_filter``, the KV cache cut after prefill).

Three stages, each executed for real:

1. **Vision tower, spatial merge** (:func:`window_merge`, applied to the output of vision layer 0):
   the ``g×g`` patch grid (after the [CLS] token) is cut into non-overlapping ``w×w`` windows
   (``w = 3``); a window's similarity is the mean pairwise cosine similarity of its ``w²`` tokens,
   the self-pairs excluded: ``s = Σ_{i≠j} cos(x_i, x_j) / (w²(w²−1))``. The ``r`` windows with
   ``s ≥ 0.8`` (``merge_threshold``) become one token each, the size-weighted mean of their ``w²``
   tokens (all sizes 1 here, so the plain mean), written at the window's last token (row-major).
   Output order as in the official ``merge``: ``[CLS, merged windows in descending s, the
   unmerged tokens in raster order]`` (``order="raster"``: every token at its window's last patch,
   in raster order). The tower's later layers and the LLM see ``n − (w²−1)·r`` image tokens.
2. **Key set** (:func:`key_set`): at the last vision layer, the ``ceil(0.08·n')`` tokens with the
   largest head-mean [CLS] attention (``n'`` the patch tokens present there). They are never dropped.
3. **Prefill, dual-attention filter** (:func:`dual_attention_filter`) after each pruning layer
   ``ℓ``: with ``A (t, n)`` the head-mean post-softmax attention of the ``t`` text tokens after the
   image block over the ``n`` current image tokens at layer ``ℓ``, ``g_i = Σ_t A[t, i]``; token ``i``
   is dropped iff ``g_i < global_thr·Σ_j g_j`` **and** ``max_t A[t, i] < individual_thr``, unless it
   is in the key set. The official hook prunes the *output* of layer ``ℓ``, i.e. before layer
   ``K = ℓ + 1``. After each stage the sequence's position ids are renumbered ``0..L'−1`` (the
   official ``position_ids.narrow``; ``positions="original"`` keeps the ids).
4. **Decoding, output-aware cache**: after the prefill, the KV cache of every layer from the first
   pruning layer ``ℓ₀`` on (``ℓ₀`` itself ran on every token) is cut to the tokens that survived the
   last stage; layers before ``ℓ₀`` keep everything. A generated token's position at a layer is that
   layer's cache length (the official ``get_usable_length(…, layer_idx)``).

Thresholds (README): 192 tokens ↔ ``global_thr = individual_thr = 0.001``; 128 ↔ 0.0012 / 0.001;
64 ↔ 0.011 / 0.01. The kept count is threshold-driven and varies per image; the official code
reports the layer-averaged image-token count ("equal token number"), here
``meta["image_tokens_layer_mean"]``.

Shapes: vision hidden states ``(1, 1 + n, D)`` (batch 1, [CLS] first), ``n = g²`` row-major patches;
attention rows ``(H, t, n)``; index arrays are image-token numbers ``0..n−1`` of the current
sequence. The window similarity and the merge run where the tower runs (torch); the filter runs in
the state's namespace (array API); only index arrays come back to the host.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import as_work, namespace, stable_argsort, to_host
from explorer.core.generation import EncoderStage, PruneDecision, PrunePlan, PruneState
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.vlm import VlmPruningMethod

__all__ = ["VlmMustDrop", "window_merge", "window_similarity", "key_set", "dual_attention_filter", "stage_keep", "pruning_layers",
           "PRESETS", "OFFICIAL_LAYERS"]

PRESETS = {"192": (0.001, 0.001), "128": (0.0012, 0.001), "64": (0.011, 0.01)}
OFFICIAL_LAYERS = (2, 6, 10, 14)  # for a 32-layer LLM (LLaVA-1.5-7B)


def window_similarity(patches: torch.Tensor, window: int) -> torch.Tensor:
    """``(gh·gw,)`` mean pairwise cosine similarity of each ``window×window`` window of
    ``patches (n, D)`` (a square row-major grid), windows in raster order, self-pairs excluded."""
    n, d = patches.shape
    g = math.isqrt(n)
    if g * g != n or g % window:
        raise ValueError(f"{n} patch tokens are not a square grid that {window}x{window} windows tile")
    k = window * window
    w = patches.reshape(g // window, window, g // window, window, d).permute(0, 2, 1, 3, 4).reshape(-1, k, d)
    unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = unit @ unit.transpose(1, 2)  # (windows, k, k)
    off = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)
    return off / (k * (k - 1))


def window_merge(hidden: torch.Tensor, threshold: float = 0.8, window: int = 3,
                 order: Literal["official", "raster"] = "official") -> tuple[torch.Tensor, np.ndarray]:
    """MustDrop's spatial merge of ``hidden (1, 1 + n, D)`` ([CLS] first).

    Returns ``(hidden' (1, 1 + n − (w²−1)·r, D), assign (n,))`` with ``assign[p]`` the new patch
    token (0-based, [CLS] not counted) that patch ``p`` went into. ``r`` = windows with similarity
    ``≥ threshold``; each becomes the mean of its ``w²`` tokens. ``order="official"``: merged
    windows first (descending similarity, ties by window index), then the unmerged tokens in raster
    order; ``"raster"``: every token at its window's last patch.
    """
    cls, patches = hidden[:, :1], hidden[0, 1:]
    n = patches.shape[0]
    g = math.isqrt(n)
    sim = window_similarity(patches.float(), window)
    merged = torch.nonzero(sim >= threshold).flatten()
    merged = merged[torch.argsort(-sim[merged], stable=True)]  # descending similarity
    wins = torch.arange(n, device=hidden.device).reshape(g // window, window, g // window, window)
    wins = wins.permute(0, 2, 1, 3).reshape(-1, window * window)  # patch numbers per window, row-major
    members = wins[merged]  # (r, k)
    merged_h = patches[members].mean(1)  # (r, D): size-weighted mean with unit sizes
    is_merged = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    is_merged[members.flatten()] = True
    unm = torch.nonzero(~is_merged).flatten()
    r = merged.numel()
    assign = torch.empty(n, dtype=torch.long, device=hidden.device)
    if order == "official":
        assign[members] = torch.arange(r, device=hidden.device)[:, None]
        assign[unm] = torch.arange(r, r + unm.numel(), device=hidden.device)
        out = torch.cat([merged_h, patches[unm]], 0)
    else:
        anchor = torch.cat([members[:, -1], unm])  # each new token's place: its window's last patch
        rank = torch.argsort(anchor)
        out = torch.cat([merged_h, patches[unm]], 0)[rank]
        new_of_old = torch.argsort(rank)
        assign[members] = new_of_old[:r][:, None]
        assign[unm] = new_of_old[r:]
    return torch.cat([cls, out[None].to(hidden.dtype)], 1), assign.cpu().numpy()


def key_set(cls_row, fraction: float = 0.08) -> np.ndarray:
    """The key set: indices of the ``ceil(fraction·n)`` largest head-mean [CLS] attentions of
    ``cls_row (H, n)`` (sorted ascending; ties: lower index first)."""
    xp = namespace(cls_row)
    s = xp.mean(as_work(cls_row, xp), axis=0)
    n = int(s.shape[0])
    k = min(n, math.ceil(fraction * n)) if fraction > 0 else 0  # the official float ceil
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    order = to_host(stable_argsort(s, descending=True))
    return np.sort(order[:k]).astype(np.int64)


def dual_attention_filter(rows, global_thr: float, individual_thr: float):
    """Kept image tokens of the dual-attention filter on ``rows (H, t, n)`` (post-softmax, text
    queries over image keys): ``(keep (sorted numpy indices), g (n,) numpy)``; a token leaves iff
    ``g_i < global_thr·Σ g`` and ``max_t A[t, i] < individual_thr`` with ``A`` the head mean."""
    xp = namespace(rows)
    a = xp.mean(as_work(rows, xp), axis=0)  # (t, n)
    g = xp.sum(a, axis=0)
    drop = (g < xp.sum(g) * global_thr) & (xp.max(a, axis=0) < individual_thr)
    return to_host(xp.nonzero(~drop)[0]).astype(np.int64), to_host(g, np.float64)


def stage_keep(rows, original: np.ndarray, keys: np.ndarray, global_thr: float, individual_thr: float):
    """One prefill stage: ``(keep, g)`` with ``keep`` the current image tokens (sorted indices into
    ``original``) that pass :func:`dual_attention_filter` on ``rows (H, t, n)`` or whose number in
    ``original (n,)`` is in the key set ``keys``."""
    keep, g = dual_attention_filter(rows, global_thr, individual_thr)
    protected = np.nonzero(np.isin(original, keys))[0]
    return np.union1d(keep, protected).astype(np.int64), g


def pruning_layers(spec: str, n_layers: int) -> list[int]:
    """The LLM layers ``ℓ`` after which MustDrop prunes: ``"auto"`` = the official (2, 6, 10, 14)
    for 32 layers, scaled as ``round(ℓ·L/32)`` otherwise (deduplicated, below the last layer);
    or a comma-separated list."""
    if spec.strip() == "auto":
        got = sorted({min(int(round(l * n_layers / 32)), n_layers - 2) for l in OFFICIAL_LAYERS})
    else:
        try:
            got = sorted({int(x) for x in spec.replace(" ", "").split(",") if x})
        except ValueError:
            raise ParamError(f"layers {spec!r}: give 'auto' or comma-separated layer numbers") from None
    if n_layers < 2:
        raise ParamError(f"MustDrop drops tokens after an LLM layer other than the last; this language model has "
                         f"{n_layers} layer")
    if not got or got[0] < 0 or got[-1] > n_layers - 2:
        raise ParamError(f"layers {spec!r}: the language model has {n_layers} layers; MustDrop prunes after "
                         f"layers 0..{n_layers - 2}")
    return got


class VlmMustDropParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: Literal["192", "128", "64", "custom"] = Field(
        "192", description="The README's thresholds: 192 ↔ global 0.001 / individual 0.001; 128 ↔ 0.0012 / 0.001; "
                           "64 ↔ 0.011 / 0.01 (token counts of LLaVA-1.5-7B, layer-averaged); custom: the two below.")
    global_thr: float = Field(0.001, ge=0.0, le=1.0, description="custom: a token may leave when its summed text "
                              "attention is below this fraction of the total.")
    individual_thr: float = Field(0.001, ge=0.0, le=1.0, description="custom: ... and no single text token gives it "
                                  "more than this.")
    layers: str = Field("auto", description="LLM layers after which tokens are dropped: auto (2,6,10,14 of 32, "
                        "scaled to the model's depth) or e.g. '2,6,10,14'.")
    encoder_merge: bool = Field(True, description="Merge similar 3x3 windows after the vision tower's first layer.")
    merge_threshold: float = Field(0.8, ge=-1.0, le=1.0, description="Window similarity at which a window merges.")
    window: int = Field(3, ge=2, le=8, description="Window side in patches.")
    key_fraction: float = Field(0.08, ge=0.0, le=1.0, description="Share of the image tokens in the key set "
                                "(top [CLS] attention of the last vision layer); 0: no key set.")
    order: Literal["official", "raster"] = Field("official", description="official: merged windows first, then the "
                                                 "rest; raster: every token at its window's last patch.")
    positions: Literal["renumber", "original"] = Field("renumber", description="renumber: positions 0..L'-1 after "
                                                       "each stage (official); original: survivors keep their ids.")
    cache: Literal["final", "prefill"] = Field("final", description="final: the KV cache from the first pruning layer "
                                               "on holds only the last stage's survivors (official); prefill: each "
                                               "layer keeps what it saw.")
    max_new_tokens: int = Field(32, ge=1, le=512, description="Tokens generated with the pruned model.")

    def thresholds(self) -> tuple[float, float]:
        return (self.global_thr, self.individual_thr) if self.preset == "custom" else PRESETS[self.preset]


class VlmMustDrop(VlmPruningMethod):
    """MustDrop's three stages inside one generation (see module docstring)."""

    Params = VlmMustDropParams

    def plan(self, backend, params, decide) -> PrunePlan:
        encoder = None
        if params.encoder_merge or params.key_fraction > 0:
            family = getattr(backend, "family", backend.info.extra.get("family"))
            if family != "llava":
                raise ParamError(f"MustDrop's vision-tower stage (merge and key set) needs a LLaVA model with a CLIP "
                                 f"tower; this is {family}: set encoder_merge=false and key_fraction=0 to run the "
                                 "LLM stages only")
            after = {}
            if params.encoder_merge:
                after[0] = lambda h: window_merge(h, params.merge_threshold, params.window, params.order)
            encoder = EncoderStage(after_layer=after, cls_layers=(-1,) if params.key_fraction > 0 else ())
        layers = pruning_layers(params.layers, backend.info.n_layers)
        return PrunePlan(layers=[l + 1 for l in layers], decide=decide, text_rows=True, positions=params.positions,
                         cache=params.cache, encoder=encoder)

    def decide(self, state: PruneState, params) -> PruneDecision:
        if state.text_rows is None:
            raise ValueError("MustDrop needs the text-to-image attention of the pruning layer")
        g_thr, i_thr = params.thresholds()
        cls = state.extras.get("vision_cls", {}).get(-1)  # (H, n') over the LLM's image tokens
        keys = key_set(cls, params.key_fraction) if cls is not None and params.key_fraction > 0 else np.zeros(0, np.int64)
        keep, g = stage_keep(state.text_rows, state.original, keys, g_thr, i_thr)
        return PruneDecision(keep=keep, scores=g)
