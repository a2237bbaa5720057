"""Random, spatial, radial and pooling baselines.

Every pruning paper compares against these; they look at *where* a token is, never at what it
holds, so they show how much of a method's behaviour is just geometry.

* :class:`RandomPrune` (``pruning.random``): a seeded uniform subset of ``k`` patch tokens
  ([CLS] is a prefix token and never part of a step), kept in sequence order (FastV's ``K = 0``
  path: a shuffled 0/1 mask).
* :class:`SpatialPrune` (``pruning.spatial``): HiRED's spatial baseline (Arif et al., arXiv 2408.10945,
  https://github.com/hasanar1f/HiRED, ``modeling_llava_next.py``
  ``LlavaNextForConditionalGeneration.add_spatial_tokens``) as ``pattern="hired"``:
  ``k = int(n · keep)`` (the forward's ``int(num_vision_tokens * spatial_budget)``), then the
  tokens ``arange(0, n − 1, n // k)`` in sequence order. That is ``ceil((n − 1)/(n // k))``
  tokens, ``k`` or more (``n − 1`` once ``k > n/2``; ``keep = 1`` keeps all ``n`` here, as no
  reduction). ``grid`` (the default: a keep-ratio baseline must keep the tokens it is asked
  for, which HiRED's stride does not above keep 0.5) keeps exactly ``ceil(keep·n)`` on a uniform 2-D
  lattice: an ``a × b`` lattice of centred strides with the grid's aspect ratio (``a =
  ceil(h·sqrt(k/n))``, ``b = ceil(k/a)``, so ``a·b ≥ k``), the ``a·b − k`` surplus points dropped
  evenly in raster order; ``raster`` keeps exactly ``ceil(keep·n)``: ``arange(0, n, n // k)[:k]``.
* :class:`RadialPrune` (``pruning.radial``): TokenReduction's ``heuristic.py`` radial pattern
  (``HeuristicVisionTransformer.prep_pattern_stage_subset``): the tokens closest to the grid
  centre by L1, L2 or L∞ distance. ``threshold`` mode is the official rule: the target is
  ``int(keep^((s+1)/S) · n_original)`` at stage ``s`` of ``S`` (the official ``int(num_patches *
  keep_rate**(idx+1))``), and the threshold among the distinct distances whose count ``#{d ≤ t}``
  is closest to it (the first on a tie) is kept; the count is only close (the official float32
  coordinates may split a shell of tied distances, which is kept whole here). ``exact`` mode (the
  default) keeps exactly ``ceil(keep·n)``: everything strictly inside the boundary shell, then whole
  antipodal pairs of the shell (spread evenly by angle) so the mask stays symmetric under a 180°
  rotation; an odd remainder takes the centre token when it is on the shell, otherwise one token
  of a pair (the only case that cannot be symmetric). ``coords``: ``centred`` measures from
  ``((h−1)/2, (w−1)/2)``; ``official`` uses TokenReduction's coordinates ``linspace(-h//2, h//2,
  h)`` (rows) and ``linspace(-w//2, w//2, w)`` (columns): the same centre for an even side, half a
  step off-centre (towards the top left) for an odd side.
* :class:`Pool` (``merging.pool``): average pooling of the patch grid with kernel = stride = ``s``
  (``avg_pool2d``; LLaVA-1.5 24×24 → 12×12): the groups are the ``s×s`` windows and a merged token
  is the window mean (size ``s²``). ``s = round(1/sqrt(keep))`` unless ``stride`` is set, so the
  kept count is ``ceil(h/s)·ceil(w/s)`` (edge windows of a grid not divisible by ``s`` are
  smaller: ``ceil_mode`` without padding) — not ``keep·n`` in general (keep 0.5 gives s = 1).

Coordinates: ``state.positions (n_patches, 2)`` are (row, col) centroids on the original
``state.grid`` (integers at the first stage); the grid centre is ``((h−1)/2, (w−1)/2)``.

Pooling follows LLaVA-OneVision's ``get_2dPool`` (https://github.com/LLaVA-VL/LLaVA-NeXT,
``llava/model/llava_arch.py``: ``avg_pool2d(feature, stride)``), identical on a grid divisible
by ``s``; ``avg_pool2d`` (no ``ceil_mode``) drops the last ``h mod s`` rows and ``w mod s``
columns of any other grid, which a merge step cannot express (every token belongs to a group),
so those edge tokens form smaller windows here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from explorer.core.arrays import to_host
from explorer.core.reduction import ReductionStep, TokenState
from explorer.core.trace import CaptureSpec
from explorer.plugin_host.reduction import ReductionMethod, ReductionParams
from explorer_plugins.common.selection import pool_groups, pool_stride, random_keep

__all__ = ["RandomPrune", "SpatialPrune", "RadialPrune", "Pool", "random_keep", "spatial_keep", "radial_keep",
           "radial_distances", "pool_groups", "pool_stride", "hired_spatial_keep", "hired_spatial_count",
           "official_coordinates", "radial_official_count"]

_ROUND = 9  # decimals used to decide that two distances are equal


class _Geometric(ReductionMethod):
    """Baselines need no attention in the trace: only the hidden state entering the block. They
    read nothing of the tokens but their grid positions, which come to the host (``(n, 2)``, small);
    the features stay where they are."""

    host_only = False

    def attention_need(self, params) -> str:
        return "none"

    def capture(self, params, model, target):
        first = self.stages(params, model)[0]
        return CaptureSpec(hidden_layers={first})


class RandomPrune(_Geometric):
    """Seeded uniform random subset of the patch tokens."""

    def reduce(self, state: TokenState, params) -> ReductionStep:
        n, k = state.n_patches, self.stage_keep(params, state)
        return ReductionStep(keep=random_keep(n, k, params.seed, state.stage))


# -- uniform spatial sampling ---------------------------------------------------------------------
def _even(count: int, total: int) -> np.ndarray:
    """``count`` evenly spread, distinct indices of ``0..total-1`` (centred)."""
    return np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64) if count else np.zeros(0, np.int64)


def _lattice(grid: tuple[int, int], k: int) -> np.ndarray:
    """``(k, 2)`` (row, col) points of a centred strided lattice on ``grid``, raster order."""
    h, w = grid
    n = h * w
    a = min(h, max(1, int(np.ceil(h * np.sqrt(k / n) - 1e-9))))
    b = min(w, max(1, int(np.ceil(k / a - 1e-9))))
    rows, cols = _even(a, h), _even(b, w)
    pts = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).astype(np.float64)
    surplus = pts.shape[0] - k
    if surplus > 0:
        pts = np.delete(pts, _even(surplus, pts.shape[0]), axis=0)
    return pts


def hired_spatial_count(keep: float, n: int) -> int:
    """HiRED's ``num_spatial_tokens = int(num_vision_tokens * spatial_budget)`` (no tolerance), at
    least 1 and at most ``n``."""
    return max(1, min(n, int(n * keep)))


def hired_spatial_keep(n: int, k: int) -> np.ndarray:
    """HiRED's ``add_spatial_tokens`` on an empty mask: ``arange(0, n - 1, n // k)``, i.e.
    ``ceil((n−1)/(n//k))`` indices, ``k`` or more (the stop is ``n − 1`` and nothing truncates
    them); all ``n`` when ``k ≥ n`` (no reduction)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    if k == n:
        return np.arange(n)
    return np.arange(0, n - 1, n // k)


def spatial_keep(positions: np.ndarray, grid: tuple[int, int], k: int,
                 pattern: Literal["hired", "grid", "raster"] = "grid") -> np.ndarray:
    """Uniform spatial sampling of the current tokens, sorted indices.

    ``grid``: exactly ``k``, the lattice of :func:`_lattice`, each point taking the nearest unused
    current token (on the full grid that is the lattice point itself). ``raster``: exactly ``k``,
    ``arange(0, n, n // k)[:k]`` over the current tokens in sequence order. ``hired``: HiRED's
    ``arange(0, n - 1, n // k)`` (:func:`hired_spatial_keep`; ``k`` or more tokens).
    """
    n = positions.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    if k == n:
        return np.arange(n)
    if pattern == "hired":
        return hired_spatial_keep(n, k)
    if pattern == "raster":
        return np.arange(0, n, n // k)[:k]
    targets = _lattice(grid, k)
    free = np.ones(n, dtype=bool)
    out = np.empty(k, dtype=np.int64)
    for i, t in enumerate(targets):
        d = np.abs(positions - t).sum(1)
        d[~free] = np.inf
        j = int(np.argmin(d))
        out[i], free[j] = j, False
    return np.sort(out)


class SpatialPrune(_Geometric):
    """Uniform spatial sampling: a 2-D lattice (default) or HiRED's 1-D strided baseline."""

    class Params(ReductionParams):
        pattern: Literal["hired", "grid", "raster"] = Field(
            "grid", description="grid: exactly ceil(keep·n) on centred 2-D strides with the grid's aspect ratio, the "
            "surplus lattice points dropped evenly; hired: HiRED's add_spatial_tokens, k = int(keep·n), tokens "
            "arange(0, n−1, n // k) in sequence order (k or more; n−1 once keep > 0.5); raster: exactly ceil(keep·n), "
            "arange(0, n, n // k)[:k].")

    def reduce(self, state: TokenState, params) -> ReductionStep:
        if params.pattern == "hired":
            n = state.n_patches
            k = hired_spatial_count(params.keep, n) if state.n_stages == 1 else self.stage_keep(params, state, "floor")
            return ReductionStep(keep=hired_spatial_keep(n, k))
        k = self.stage_keep(params, state)
        return ReductionStep(keep=spatial_keep(to_host(state.positions), state.grid, k, params.pattern))


# -- radial ---------------------------------------------------------------------------------------
def official_coordinates(positions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """TokenReduction's coordinates of grid cells (``prep_pattern_stage_subset``:
    ``torch.linspace(-P//2, P//2, steps=P)`` per axis, here ``h`` rows and ``w`` columns): cell
    ``r`` of a side ``P`` sits at ``-ceil(P/2) + r·P/(P−1)`` (``-ceil(P/2)`` for ``P = 1``)."""
    out = np.empty_like(np.asarray(positions, dtype=np.float64))
    for axis, side in enumerate(grid):
        start = -((side + 1) // 2)
        step = side / (side - 1) if side > 1 else 0.0
        out[:, axis] = start + positions[:, axis] * step
    return out


def radial_distances(positions: np.ndarray, grid: tuple[int, int], metric: str,
                     coords: Literal["centred", "official"] = "centred") -> np.ndarray:
    """Distance of every token to the grid centre ``((h−1)/2, (w−1)/2)`` (``coords="centred"``) or
    to TokenReduction's origin in its coordinates (``"official"``, :func:`official_coordinates`),
    rounded for ties."""
    h, w = grid
    if coords == "official":
        off = np.abs(official_coordinates(positions, grid))
    elif coords == "centred":
        off = np.abs(positions - np.array([(h - 1) / 2.0, (w - 1) / 2.0]))
    else:
        raise ValueError(f"unknown coordinates {coords!r}; use centred or official")
    if metric == "l1":
        d = off.sum(1)
    elif metric == "l2":
        d = np.sqrt((off**2).sum(1))
    elif metric == "linf":
        d = off.max(1)
    else:
        raise ValueError(f"unknown radial metric {metric!r}; use l1, l2 or linf")
    return np.round(d, _ROUND)


def _antipodal_pairs(idx: np.ndarray, positions: np.ndarray, centre: np.ndarray) -> tuple[list, list]:
    """Split shell tokens into antipodal pairs (i, j) (180° images of each other) and singles."""
    pos = positions[idx]
    mirror = 2 * centre - pos
    unused = set(range(idx.size))
    pairs, singles = [], []
    for a in range(idx.size):
        if a not in unused:
            continue
        unused.discard(a)
        d = np.abs(pos - mirror[a]).max(1)
        match = [b for b in np.flatnonzero(d < 1e-6) if b in unused]
        if np.abs(pos[a] - mirror[a]).max() < 1e-6:  # the centre itself
            singles.insert(0, idx[a])
        elif match:
            unused.discard(match[0])
            pairs.append((idx[a], idx[match[0]]))
        else:
            singles.append(idx[a])
    return pairs, singles


def radial_keep(positions: np.ndarray, grid: tuple[int, int], k: int, metric: str = "l2",
                count: Literal["exact", "threshold"] = "exact",
                coords: Literal["centred", "official"] = "centred") -> np.ndarray:
    """The tokens closest to the grid centre, sorted indices (see the module docstring)."""
    n = positions.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    d = radial_distances(positions, grid, metric, coords)
    levels = np.unique(d)
    within = np.array([(d <= t).sum() for t in levels])
    if count == "threshold":  # TokenReduction: the first threshold whose count is closest
        t = levels[int(np.argmin(np.abs(within - k)))]
        return np.flatnonzero(d <= t)
    t = levels[int(np.searchsorted(within, k))]  # smallest threshold holding at least k
    inside = np.flatnonzero(d < t)
    shell = np.flatnonzero(d == t)
    need = k - inside.size
    if need == shell.size:
        return np.sort(np.concatenate([inside, shell]))
    pos = official_coordinates(positions, grid) if coords == "official" else positions
    centre = np.zeros(2) if coords == "official" else np.array([(grid[0] - 1) / 2.0, (grid[1] - 1) / 2.0])
    pairs, singles = _antipodal_pairs(shell, pos, centre)
    chosen: list[int] = []
    if need % 2 and singles:  # the centre (self-symmetric) first, otherwise an unpaired token
        chosen.append(int(singles.pop(0)))
    n_pairs = min(len(pairs), (need - len(chosen)) // 2)
    if n_pairs:
        # spread the chosen pairs evenly by angle (deterministic; both members rotate into each other)
        ang = np.array([np.arctan2(pos[i][0] - centre[0], pos[i][1] - centre[1]) % np.pi
                        for i, _ in pairs])
        ang = np.round(ang, _ROUND)
        order = np.lexsort((np.array([min(i, j) for i, j in pairs]), ang))
        for p in order[_even(n_pairs, len(pairs))]:
            chosen.extend(int(v) for v in pairs[p])
    rest = [int(v) for v in singles] + [int(v) for pr in pairs for v in pr if int(v) not in chosen]
    chosen.extend(sorted(set(rest) - set(chosen))[: need - len(chosen)])
    return np.sort(np.concatenate([inside, np.asarray(chosen, dtype=np.int64)]))


def radial_official_count(keep: float, stage: int, n_stages: int, n_original: int, n: int) -> int:
    """TokenReduction's radial target at stage ``stage`` of ``n_stages``: ``int(num_patches *
    keep_rate ** (idx + 1))`` with ``keep_rate = keep ** (1 / n_stages)``, at least 1, at most ``n``."""
    if n_stages <= 1:
        return max(1, min(n, int(n_original * keep)))  # as the official int(), no tolerance
    return max(1, min(n, int(n_original * keep ** ((stage + 1) / n_stages) + 1e-9)))


class RadialPrune(_Geometric):
    """Keep the tokens closest to the grid centre (TokenReduction's radial heuristic)."""

    class Params(ReductionParams):
        metric: Literal["l1", "l2", "linf"] = Field("l2", description="Distance to the grid centre: L1 (diamond), "
                                                    "L2 (disc) or L∞ (square).")
        count: Literal["exact", "threshold"] = Field(
            "exact", description="exact: keep exactly ceil(keep·n), ties on the boundary broken in 180°-symmetric "
            "pairs; threshold: TokenReduction's rule, the distance threshold whose count is closest to "
            "int(keep^((s+1)/S)·original patches) at stage s of S.")
        coords: Literal["centred", "official"] = Field(
            "centred", description="centred: distances from the grid centre ((h−1)/2, (w−1)/2); official: "
            "TokenReduction's linspace(-P//2, P//2, P) coordinates (half a step off-centre on an odd side).")

    def reduce(self, state: TokenState, params) -> ReductionStep:
        if params.count == "threshold":
            k = radial_official_count(params.keep, state.stage, state.n_stages, state.n_original, state.n_patches)
        else:
            k = self.stage_keep(params, state)
        positions = to_host(state.positions)
        d = radial_distances(positions, state.grid, params.metric, params.coords)
        return ReductionStep(keep=radial_keep(positions, state.grid, k, params.metric, params.count, params.coords),
                             scores=-d)


# -- spatial pooling (merging) --------------------------------------------------------------------
class Pool(_Geometric):
    """Spatial average pooling of the patch grid, as a merge step."""

    class Params(ReductionParams):
        stride: int = Field(0, ge=0, description="Window size s (kernel = stride = s); 0 derives it from keep: "
                            "s = round(1/sqrt(keep)), leaving ceil(h/s)·ceil(w/s) tokens.")
        prop_attn: bool = Field(False, description="Add log(size) to the attention logits of later blocks "
                                "(ToMe's proportional attention); plain pooling does not.")

    def reduce(self, state: TokenState, params) -> ReductionStep:
        s = pool_stride(params.keep, params.stride)
        return ReductionStep(merge=pool_groups(to_host(state.positions), s))

    def is_merging(self, params) -> bool:
        return True
