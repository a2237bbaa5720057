"""Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024) as far as the paper specifies it.

No official code was found; this follows the abstract and the paper as
remembered (marked [unverified] there). Implemented:

* **I-stage** (importance): every head's attention ``A (N, N)`` (row = query, column = key) is
  the adjacency of a directed graph over all tokens ([CLS] included) and a weighted PageRank
  runs on it: ``s⁽⁰⁾ = 1/N``, ``s⁽ᵗ⁺¹⁾_j ∝ Σ_i A_ij s⁽ᵗ⁾_i`` (importance flows from the tokens
  that attend to ``j``), renormalised to sum 1 at every step (the paper's ``1/N`` factor only
  shrinks the sum), **until it converges**: the step residual ``‖s⁽ᵗ⁺¹⁾ − s⁽ᵗ⁾‖₁`` of every head
  at most ``tol`` (floored at ``N·eps`` of the work dtype), at most ``max_iterations`` steps. The
  limit is the stationary distribution of the attention graph (left eigenvector of ``A`` for the
  eigenvalue 1). A head whose plain iteration does not converge (a periodic or nearly periodic
  graph, e.g. two token sets that attend to each other: an eigenvalue near −1 makes the iterates
  oscillate; a reducible or nearly reducible graph: an eigenvalue near 1 makes them crawl) is
  recomputed with **damped** PageRank (Brin & Page 1998) ``s ← d·(s A) + (1 − d)/N`` with
  ``d = damping = 0.85``: the damped map is an L1 contraction with factor ``d`` for every
  row-stochastic ``A``, so it converges geometrically whatever the graph (``≈ log(tol/2)/log d``
  steps, about 120 for ``tol = 1e-8``); 0.85 is PageRank's standard value, a compromise between
  staying close to the undamped scores (``d → 1``) and converging fast. The iterations, the final
  residual and the damped heads are reported (:class:`PageRankInfo`; the result's
  ``meta["pagerank"]`` per block, with a line in ``meta["warnings"]`` when damping was applied).
  Heads are aggregated by their mean. The ``r_I`` least important patch tokens are pruned.
* **S-stage** (similarity): the surviving patch tokens are split by importance into the more
  important half ``A`` (``ceil(m/2)`` tokens) and the rest ``B``; every token of ``B`` is matched
  to its most similar token of ``A`` (cosine of the head-mean keys, ToMe's metric); the ``r_S``
  tokens of ``B`` with the highest similarity are pruned (not merged).

``r_I + r_S = n − k`` with ``k = ceil(keep · n)``; ``r_I = round(importance_share · (n − k))``,
raised when ``B`` is too small for ``r_S``. Kept tokens are returned in sequence order.

Not implemented (the description in the abstract is not enough to reproduce them): the variance-based
head filter and the emphasis on informative regions; the split of the budget between the two
stages (``importance_share``), the importance-guided partition (more important half vs the rest)
and the convergence rule (tolerance, cap, damped fallback) are this implementation's choices, not
verified against the paper.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from explorer.core.arrays import as_work, device, namespace, stable_argsort, to_host
from explorer.core.reduction import ReductionStep, TokenState
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams

__all__ = ["ZeroTPrune", "PageRankInfo", "weighted_pagerank", "split_budget", "s_stage_drop", "DAMPING"]

#: steps between two reads of the residual (each read synchronises a GPU with the host)
CHECK = 8

#: PageRank's damping factor (Brin & Page 1998), used only for heads whose plain iteration does not
#: converge: the damped map is an L1 contraction with this factor, so it converges on every graph.
DAMPING = 0.85


@dataclass(frozen=True)
class PageRankInfo:
    """How :func:`weighted_pagerank` ended.

    ``iterations`` plain power steps taken (all heads together); ``residual`` the final step residual
    ``‖s⁽ᵗ⁺¹⁾ − s⁽ᵗ⁾‖₁``, the largest over the heads (of the damped iteration for damped heads);
    ``residual_plain`` the largest plain residual when the plain iteration stopped; ``converged``
    every head at most ``tol`` (the tolerance used, floored at ``N·eps``); ``damped_heads`` the heads
    recomputed with damping ``damping`` in ``damped_iterations`` steps (``damped`` if any).
    """

    iterations: int
    residual: float
    residual_plain: float
    converged: bool
    damped: bool
    damped_heads: tuple[int, ...]
    damped_iterations: int
    damping: float
    tol: float

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["damped_heads"] = list(self.damped_heads)
        return d


def weighted_pagerank(attention, iterations: int | None = None, *, tol: float = 1e-8, max_iterations: int = 1000,
                      damping: float = DAMPING, return_info: bool = False):
    """Per-head weighted PageRank on attention graphs, in the array's namespace (work dtype).

    Parameters
    ----------
    attention : (H, N, N) or (N, N) row-stochastic attention (row = query).
    iterations : ``None`` (default): iterate ``s ← Aᵀ s`` (renormalised to sum 1) until every head's
        step residual ``‖s⁽ᵗ⁺¹⁾ − s⁽ᵗ⁾‖₁`` is at most ``tol``, at most ``max_iterations`` steps; heads
        still above ``tol`` then run the damped iteration ``s ← d·Aᵀ s + (1 − d)/N`` (``d = damping``)
        to its own tolerance (a contraction: it always gets there). An integer: exactly that many
        plain steps, no fallback (the fixed count of earlier versions, for analysis).
    tol : tolerance on the L1 step residual, floored at ``N·eps`` of the work dtype (float32 on a GPU
        cannot resolve less).
    max_iterations : cap on the plain steps.
    damping : ``d`` of the damped fallback, in (0, 1).
    return_info : also return a :class:`PageRankInfo`.

    Returns
    -------
    (H, N) (or (N,)) non-negative scores, each row summing to 1 (and the info).
    """
    if not hasattr(attention, "dtype"):
        attention = np.asarray(attention, dtype=np.float64)
    xp = namespace(attention)
    a = as_work(attention, xp)
    single = a.ndim == 2
    if single:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"attention must be (H, N, N), got {tuple(a.shape)}")
    if iterations is not None and iterations < 0:
        raise ValueError("iterations must be non-negative")
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    if not 0.0 < damping < 1.0:
        raise ValueError("damping must be in (0, 1)")
    H, n = a.shape[0], a.shape[-1]
    eps = float(np.finfo(np.float32 if a.dtype == xp.float32 else np.float64).eps)
    tol_used = max(float(tol), n * eps)

    def step(s):
        s = s @ a  # s_j ← Σ_i s_i A_ij
        return s / xp.clip(xp.sum(s, axis=-1, keepdims=True), 1e-300, None)

    def residual(new, old):
        return xp.sum(xp.abs(new - old), axis=-1)[:, 0]  # (H,)

    s = xp.full((H, 1, n), 1.0 / n, dtype=a.dtype, device=device(a))
    steps = 0
    fixed = iterations is not None
    limit = iterations if fixed else max_iterations
    while steps < limit:
        new = step(s)
        r = residual(new, s)
        s, steps = new, steps + 1
        # the residual is read back every CHECK steps only (one host sync each, not one per step)
        if not fixed and (steps % CHECK == 0 or steps == limit) and float(xp.max(r)) <= tol_used:
            break
    r_host = to_host(r, np.float64) if steps else np.zeros(H)
    residual_plain = float(r_host.max()) if steps else float("nan")
    bad = np.nonzero(r_host > tol_used)[0] if not fixed else np.zeros(0, dtype=np.int64)
    final = r_host.copy()
    damped_steps = 0
    if bad.size:
        # damped PageRank for the heads that did not converge, from where they stopped; the error
        # contracts by ``damping`` per step, so the cap below is never the reason to stop
        idx = xp.asarray(bad, device=device(a))
        ab = xp.take(a, idx, axis=0)
        sb = xp.take(s, idx, axis=0)
        cap = int(math.ceil(math.log(tol_used / 4.0) / math.log(damping))) + 50
        for _ in range(cap):
            new = sb @ ab
            new = damping * new / xp.clip(xp.sum(new, axis=-1, keepdims=True), 1e-300, None) + (1.0 - damping) / n
            rb = residual(new, sb)
            sb, damped_steps = new, damped_steps + 1
            if damped_steps % CHECK == 0 and float(xp.max(rb)) <= tol_used:
                break
        final[bad] = to_host(rb, np.float64)
        s[idx] = sb
    s = s[:, 0, :]
    out = s[0] if single else s
    if not return_info:
        return out
    res = float(final.max()) if steps else float("nan")
    info = PageRankInfo(iterations=steps, residual=res, residual_plain=residual_plain,
                        converged=bool(steps) and res <= tol_used,
                        damped=bool(bad.size), damped_heads=tuple(int(h) for h in bad),
                        damped_iterations=damped_steps, damping=float(damping), tol=tol_used)
    return out, info


def split_budget(n: int, k: int, share: float) -> tuple[int, int]:
    """``(r_I, r_S)``: tokens pruned by the I-stage and by the S-stage for ``n → k``."""
    r = n - k
    r_i = int(np.floor(share * r + 0.5))
    r_s = r - r_i
    while r_s > (n - r_i) // 2:  # the S-stage prunes at most the less important half
        r_i, r_s = r_i + 1, r_s - 1
    return r_i, r_s


def s_stage_drop(survivors, metric, r_s: int):
    """Tokens the S-stage prunes.

    ``survivors`` are token indices sorted by descending importance; ``metric (n, d)`` the
    similarity features of all tokens. The more important ``ceil(m/2)`` form group A, the rest B;
    the ``r_s`` tokens of B most cosine-similar to their best match in A are returned.
    """
    if not hasattr(survivors, "dtype"):
        survivors = np.asarray(survivors, dtype=np.int64)
    xp = namespace(survivors)
    if r_s <= 0:
        return xp.zeros(0, dtype=xp.int64, device=device(survivors))
    m = survivors.shape[0]
    a_idx, b_idx = survivors[: (m + 1) // 2], survivors[(m + 1) // 2:]
    if r_s > b_idx.shape[0]:
        raise ValueError(f"the S-stage cannot prune {r_s} of {b_idx.shape[0]} tokens")
    metric = metric if hasattr(metric, "dtype") else np.asarray(metric)
    u = as_work(metric, namespace(metric))
    u = u / xp.clip(xp.linalg.vector_norm(u, axis=1, keepdims=True), 1e-12, None)
    redundancy = xp.max(u[b_idx] @ xp.matrix_transpose(u[a_idx]), axis=1)
    return b_idx[stable_argsort(redundancy, descending=True)[:r_s]]


class ZeroTPrune(ReductionMethod):
    """Zero-TPrune's I-stage and S-stage at one block (see module docstring)."""

    host_only = False  # array API: decided on the device

    class Params(ReductionParams):
        max_iterations: int = Field(1000, ge=1, le=100000, description="Cap on the plain weighted-PageRank power "
                                    "iterations (each head's attention graph, renormalised every step); heads not "
                                    "converged by then use damped PageRank.")
        tol: float = Field(1e-8, gt=0.0, le=1e-2, description="Convergence tolerance on the L1 change of a head's "
                           "scores in one step (floored at N·eps of the work dtype).")
        damping: float = Field(DAMPING, gt=0.0, lt=1.0, description="PageRank damping d of the fallback for heads "
                               "whose plain iteration does not converge (periodic or nearly reducible attention "
                               "graphs): s ← d·Aᵀs + (1 − d)/N; 0.85 is PageRank's standard value.")
        importance_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of the pruned tokens removed "
                                        "by the I-stage (least important); the S-stage removes the rest "
                                        "(most redundant of the less important half) [not verified].")

    def reduce(self, state: TokenState, params) -> ReductionStep:
        if state.attention is None:
            raise ValueError("Zero-TPrune needs the block's attention")
        xp = state.xp
        p0, n = state.n_prefix, state.n_patches
        scores, info = weighted_pagerank(state.attention, tol=params.tol, max_iterations=params.max_iterations,
                                         damping=params.damping, return_info=True)
        log = getattr(self, "_pagerank_log", None)
        if log is not None:
            log.append({"block": int(state.layer), **info.as_dict()})
        importance = xp.mean(scores, axis=0)[p0:]
        k = self.stage_keep(params, state, "ceil")
        if k >= n:
            return ReductionStep(keep=xp.arange(n, device=device(importance)), scores=importance)
        r_i, r_s = split_budget(n, k, params.importance_share)
        ranked = stable_argsort(importance, descending=True)
        survivors = ranked[: n - r_i]
        metric = xp.mean(as_work(state.keys, xp), axis=0)[p0:]  # head-mean keys (ToMe's metric)
        dropped = s_stage_drop(survivors, metric, r_s)
        keep = xp.zeros(n, dtype=xp.bool, device=device(importance))
        keep[survivors] = True
        keep[dropped] = False
        return ReductionStep(keep=xp.nonzero(keep)[0], scores=importance)

    # -- the PageRank report in the result ------------------------------------------------------------
    def _reporting(self):
        """A copy of this method that records each reduction's :class:`PageRankInfo` (one per run, so
        concurrent runs do not mix their reports)."""
        worker = copy.copy(self)
        worker._pagerank_log = []
        return worker

    @staticmethod
    def _with_report(selection, log: list):
        """``selection`` with ``meta["pagerank"]`` (one dict per reduction) and ``meta["warnings"]``."""
        warnings = list(selection.meta.get("warnings", []))
        for entry in log:
            if entry["damped"]:
                warnings.append(
                    f"Zero-TPrune, block {entry['block']}: the PageRank power iteration did not converge on "
                    f"head(s) {entry['damped_heads']} in {entry['iterations']} steps (residual "
                    f"{entry['residual_plain']:.3g} > {entry['tol']:.3g}); damped PageRank (d = {entry['damping']:g}) "
                    f"used for them ({entry['damped_iterations']} steps, residual {entry['residual']:.3g}).")
            if not entry["converged"]:
                warnings.append(f"Zero-TPrune, block {entry['block']}: PageRank did not converge (residual "
                                f"{entry['residual']:.3g} > {entry['tol']:.3g}).")
        meta = {**selection.meta, "pagerank": log, "warnings": warnings}
        return dataclasses.replace(selection, meta=meta)

    def select(self, trace, params, backend):
        worker = self._reporting()
        return self._with_report(ReductionMethod.select(worker, trace, params, backend), worker._pagerank_log)

    def run(self, trace, params, *, target, cancel, backend=None):
        worker = self._reporting()
        selection = yield from ReductionMethod.run(worker, trace, params, target=target, cancel=cancel,
                                                   backend=backend)
        return self._with_report(selection, worker._pagerank_log)
