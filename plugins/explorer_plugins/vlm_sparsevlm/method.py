"""SparseVLM, one pruning stage (Zhang et al., ICML 2025).

Official code: ``Gumpest/SparseVLMs`` (https://github.com/Gumpest/SparseVLMs; ``LlamaDynamicvitModel.forward`` in
``llava/model/language_model/modelling_sparse_llama.py``; ``score.py``: ``attn_postprocess_topk``,
``sparse_token_dict``; ``utils.py``: ``cluster_and_merge``), and llmc's ``sparsevlm.py``.

1. **Raters** (once, on the LLM input embeddings, :meth:`VlmSparseVLM.extras` via
   ``backend.llm_inputs``): ``M = softmax_over_text(V Tᵀ)`` with ``V`` the image-token embeddings
   ``(n, C)`` and ``T`` the embeddings of the tokens after the image block (question and assistant
   prompt) ``(t, C)``; ``m = mean over the visual rows (t,)``; raters = the text tokens with
   ``m > mean(m)``.
2. **Scores** at the pruning layer ``ℓ``: ``r_i = mean_{raters} mean_h A^{(ℓ)}[rater, v_i]``, the
   head-mean attention of the rater queries to each visual key. The official hook prunes the
   *output* of layer ``ℓ`` with that layer's attention, i.e. before layer ``K = ℓ + 1``: the
   parameter ``layer`` is ``K`` (default 3, i.e. the first official stage ``ℓ = 2``). The rater rows
   come from ``backend.attention_rows(prepared, K − 1, raters)`` (the probe recomputes exactly those
   query rows from the layer's post-RoPE queries and keys); with one pruning stage every layer
   before ``K`` sees the whole sequence, so they equal the rows of the pruned run's prefill.
3. **Count**: ``k = min(round(keep·n), n − 1)`` (the official ``min(schedule[ℓ], v_token_num − 1)``;
   the default keep 0.5208 is the first stage of the "192" schedule, 300 of 576 tokens), or the
   paper's v1.0 rank rule ``k = min(int(rank(P)·scale + bias), n − 1)`` with ``P`` the rater ×
   visual attention matrix (``count = "rank"``; scale 13.5 ↔ 192 tokens in the README), as
   ``attn_postprocess_rank`` of the initial commit computes it: ``rank(P)`` in float32
   (:func:`relation_rank`), and no pruning at all when ``rank(P) = n``.
4. Keep the top ``k`` by ``r`` (ties: earlier token), in sequence order.

Checked against the official code (``tests/golden/sparsevlm.npz``): raters, scores and kept sets of
``attn_postprocess_topk`` (HEAD) and ``attn_postprocess_rank`` (the initial commit, v1.0) are
reproduced; with ``keep = schedule/576`` the count is the official ``min(schedule, n − 1)`` at
``n = 576`` (the default 0.5208 gives 300, the "192" schedule's first stage).

Left out (stated in the manifest): the later stages (layers 6 and 15 of the schedule), token
recycling (DPC-kNN clustering of the top 30% of the pruned tokens into ``n/10 + 1`` merged tokens
inserted after the kept ones — the backend's merge groups cover *every* current image token and
cannot drop the rest, so recycling is not expressible as one decision), v2.0's RoPE-gravity
correction and head selection. Position ids: the survivors keep their original ids (SparseVLM v1
renumbers them ``0..L−1``; v2 keeps them). If no text token rates above the mean (e.g. a single
text token), every text token is a rater.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.arrays import as_work, asarray_like, namespace, take, to_host
from explorer.core.generation import PruneDecision, PruneState
from explorer.plugin_host.api import ParamError
from explorer.plugin_host.vlm import VlmPruningMethod, VlmPruningParams
from explorer.plugin_host.protocols import VlmModel

__all__ = ["VlmSparseVLM", "relation_rank", "sparsevlm_raters", "text_after_image"]


def sparsevlm_raters(v, t):
    """Rater selection: ``(rater indices into t (sorted, numpy), relevance m (t,))``.

    ``v (n, C)`` image-token embeddings, ``t (t, C)`` text embeddings after the image block, in
    either namespace (the softmax runs where they are; the few rater indices come back).
    """
    v = v if hasattr(v, "dtype") else np.asarray(v, dtype=np.float64)
    xp = namespace(v)
    v = as_work(v, xp)
    t = asarray_like(t, v, dtype=v.dtype)
    if t.shape[0] == 0:
        raise ValueError("SparseVLM needs text after the image (the question)")
    logits = v @ xp.permute_dims(t, (1, 0))
    logits = logits - xp.max(logits, axis=1, keepdims=True)
    p = xp.exp(logits)
    p = p / xp.sum(p, axis=1, keepdims=True)  # softmax over the text tokens
    m = xp.mean(p, axis=0)
    raters = to_host(xp.nonzero(m > xp.mean(m))[0]).astype(np.int64)
    if raters.size == 0:
        raters = np.arange(t.shape[0])
    return raters, to_host(m, np.float64)


def relation_rank(relation) -> int:
    """``rank(P)`` of the rater × image attention ``P (R, n)`` as the official v1.0 computes it:
    ``torch.linalg.matrix_rank(P.float())``, i.e. a float32 SVD with the default tolerance
    ``σ > σ_max · max(R, n) · eps(float32)`` (numpy's ``matrix_rank`` on float32 applies the same rule).
    A float64 rank counts singular values that are zero to float32 precision (e.g. a rater row that is
    the mean of two others) and can be larger."""
    return int(np.linalg.matrix_rank(np.asarray(relation, dtype=np.float32)))


def text_after_image(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Sequence indices after the last image(-placeholder) token: the question and assistant prompt."""
    ids = np.asarray(input_ids).reshape(-1)
    hits = np.nonzero(ids == image_token_id)[0]
    if hits.size == 0:
        raise ValueError("the prompt holds no image tokens")
    return np.arange(int(hits.max()) + 1, ids.size)


class VlmSparseVLMParams(VlmPruningParams):
    keep: float = Field(0.5208, gt=0.0, le=1.0, description="Fraction of the image tokens kept at the stage: "
                        "k = min(round(keep·n), n − 1); 0.5208 = 300/576, the first stage of the official '192' "
                        "schedule.")
    layer: int = Field(3, ge=1, description="K: the tokens are dropped before LLM layer K, scored by the raters' "
                       "attention at layer K−1 (the official first stage prunes after layer 2, i.e. K = 3).")
    seed: int = Field(0, ge=0, description="Unused (SparseVLM is deterministic); kept for the common form.")
    count: Literal["keep", "rank"] = Field("keep", description="keep: k from keep; rank: the paper's v1.0 rule "
                                           "k = min(int(rank(P)·rank_scale + rank_bias), n − 1), rank(P) in "
                                           "float32; k = n (no pruning) when rank(P) = n, as the official v1.0.")
    rank_scale: float = Field(13.5, gt=0.0, description="Scale of the rank rule (13.5 ↔ 192 tokens in the README).")
    rank_bias: float = Field(0.0, description="Bias of the rank rule.")


class VlmSparseVLM(VlmPruningMethod):
    """SparseVLM's text-rated pruning, one stage (see module docstring)."""

    Params = VlmSparseVLMParams

    def prune_layer(self, params, n_layers: int) -> int:
        if params.layer < 1:
            raise ParamError("SparseVLM scores with the attention of layer K−1: layer must be at least 1")
        return super().prune_layer(params, n_layers)

    def extras(self, backend: VlmModel, prepared, params) -> dict:
        e = backend.input_embeddings(prepared)  # (N, D), where the model runs
        text = text_after_image(np.asarray(prepared.inputs["input_ids"][0]), backend.image_token_id)
        image = np.asarray(prepared.image_positions, dtype=np.int64)
        idx, m = sparsevlm_raters(take(e, image, axis=0), take(e, text, axis=0))
        raters = text[idx]
        rows = backend.attention_rows(prepared, int(params.layer) - 1, raters)  # (H, R, N)
        return {"raters": raters, "relevance": m, "rater_rows": rows.mean(axis=0)}

    def count(self, params, n: int, relation: np.ndarray) -> int:
        if params.count == "rank":
            rank = relation_rank(relation)
            if rank >= n:  # official v1.0: rank(P) = n leaves the stage unpruned (s_flag = False)
                return n
            k = int(rank * params.rank_scale + params.rank_bias)
        else:
            k = int(round(params.keep * n))
        return max(1, min(k, n - 1)) if n > 1 else n

    def decide(self, state: PruneState, params) -> PruneDecision:
        raters, rows = state.extras["raters"], state.extras["rater_rows"]
        if not np.isin(raters, state.text).all():
            raise ValueError("SparseVLM raters must be text tokens after the image")
        relation = rows[:, state.image]  # (R, n): head-mean rater rows over the image keys
        scores = relation.mean(axis=0).astype(np.float64)
        k = self.count(params, len(state.image), relation)
        order = np.argsort(-scores, kind="stable")
        return PruneDecision(keep=np.sort(order[:k]), scores=scores)
