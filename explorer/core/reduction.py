"""Token reduction plans: what a pruning or merging method decides, and how it is applied.

A reduction method looks at the *current* tokens of a block (:class:`TokenState`: features after
the block's attention and residual, the block's keys and attention, token sizes) and returns a
:class:`ReductionStep`: which tokens to keep, or how to merge them into groups. The backend
executes the steps for real (the dropped tokens are removed, merged tokens are size-weighted
averages, later blocks run on fewer tokens; see ``ClipBackend.run_reduced``). Prefix tokens
([CLS], registers) are never reduced and are not part of a step.

Bookkeeping (catalog §0.3): ``assign (n_image_tokens,)`` maps every *original* image token to the
index of the current non-prefix token that holds it, or -1 when it was dropped. From it the
canvas draws kept / dropped tokens and merge groups on the original grid.

This module is numpy only; :func:`apply_step` is the reference implementation of a step (the
backend's torch version is tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["TokenState", "ReductionStep", "ReducedRun", "apply_step", "block_macs", "keep_count"]


def keep_count(ratio: float, n: int, rounding: str = "round") -> int:
    """Tokens kept out of ``n`` for a keep ratio: ``ceil`` (EViT), ``floor`` (TokenReduction's
    ``int``) or ``round`` (DivPrune), at least 1 and at most ``n``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    raw = ratio * n
    k = int(np.ceil(raw - 1e-9)) if rounding == "ceil" else int(raw + 1e-9) if rounding == "floor" else int(round(raw))
    return max(1, min(n, k))


@dataclass
class TokenState:
    """The tokens of one block at the reduction point (between attention and MLP).

    Shapes: ``x (N, D)`` current tokens (prefix first); ``keys (H, N, dh)`` and
    ``attention (H, N, N)`` of this block (computed from its input, with proportional attention if
    the run uses it); ``sizes (N,)`` how many original tokens each current token holds;
    ``assign (n_image_tokens,)`` as in the module docstring; ``positions (N - n_prefix, 2)`` the
    (row, col) centroid of each current patch token on the original grid; ``stage`` of
    ``n_stages`` is this reduction's place in the run.
    """

    layer: int
    stage: int
    x: np.ndarray
    keys: np.ndarray
    attention: np.ndarray | None
    sizes: np.ndarray
    n_prefix: int
    assign: np.ndarray
    positions: np.ndarray
    grid: tuple[int, int]
    n_stages: int = 1
    extras: dict = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return int(self.x.shape[0] - self.n_prefix)

    @property
    def cls_attention(self) -> np.ndarray:
        """Head-mean attention of the first prefix token ([CLS]) to the patch tokens, ``(n_patches,)``."""
        if self.attention is None or self.n_prefix == 0:
            raise ValueError("this model has no [CLS] attention at this block")
        return self.attention[:, 0, self.n_prefix:].mean(0)


@dataclass
class ReductionStep:
    """A method's decision for the current patch tokens (prefix excluded).

    Exactly one of ``keep`` (indices of patch tokens to keep, in the order they should take) and
    ``merge`` (``(n_patches,)`` group id of every patch token, groups ``0..G-1``; the merged token
    is the size-weighted mean, ordered by group id) is given. ``fuse`` (EViT) adds one extra token
    ``Σ w_i x_i`` over the patch tokens with the given raw weights, appended last; its size is the
    number of tokens with non-zero weight. ``scores`` are optional per-patch importances (display).
    """

    keep: np.ndarray | None = None
    merge: np.ndarray | None = None
    fuse: np.ndarray | None = None
    scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.merge is None):
            raise ValueError("a reduction step gives either keep indices or merge groups")
        if self.keep is not None:
            k = np.asarray(self.keep, dtype=np.int64).reshape(-1)
            if np.unique(k).size != k.size:
                raise ValueError("keep indices repeat")
            self.keep = k
        if self.merge is not None:
            m = np.asarray(self.merge, dtype=np.int64).reshape(-1)
            groups = np.unique(m)
            if groups.size and (groups[0] != 0 or groups[-1] != groups.size - 1):
                raise ValueError("merge groups must be numbered 0..G-1")
            self.merge = m

    def n_out(self, n_patches: int) -> int:
        n = self.keep.size if self.keep is not None else int(self.merge.max()) + 1 if n_patches else 0
        return n + (1 if self.fuse is not None else 0)


def apply_step(state: TokenState, step: ReductionStep) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reference application of a step: ``(x (N', D), sizes (N',), assign, positions)``.

    Merging is the size-weighted mean (ToMe's ``merge_wavg``); positions are size-weighted
    centroids. A fused token (EViT) holds the dropped tokens in ``assign`` (index of the fused
    token), its size is their count and its position their mean.
    """
    p = state.n_prefix
    x_pre, x_pat = state.x[:p], state.x[p:]
    s_pre, s_pat = state.sizes[:p], state.sizes[p:]
    n = x_pat.shape[0]
    if step.keep is not None:
        if step.keep.size and (step.keep.min() < 0 or step.keep.max() >= n):
            raise ValueError(f"keep index outside 0..{n - 1}")
        new_x, new_s, new_pos = x_pat[step.keep], s_pat[step.keep], state.positions[step.keep]
        remap = np.full(n, -1, dtype=np.int64)
        remap[step.keep] = np.arange(step.keep.size)
    else:
        m = step.merge
        if m.shape[0] != n:
            raise ValueError(f"merge gives {m.shape[0]} group ids for {n} patch tokens")
        G = int(m.max()) + 1
        w = s_pat.astype(np.float64)
        new_s = np.bincount(m, weights=w, minlength=G)
        new_x = np.zeros((G, x_pat.shape[1]))
        np.add.at(new_x, m, x_pat * w[:, None])
        new_x = new_x / new_s[:, None]
        new_pos = np.zeros((G, 2))
        np.add.at(new_pos, m, state.positions * w[:, None])
        new_pos = new_pos / new_s[:, None]
        remap = m
    if step.fuse is not None:
        wts = np.asarray(step.fuse, dtype=np.float64)
        fused = (wts[:, None] * x_pat).sum(0)
        members = wts != 0
        f_index = new_x.shape[0]
        new_x = np.concatenate([new_x, fused[None]], 0)
        new_s = np.concatenate([new_s, [float(s_pat[members].sum())]])
        new_pos = np.concatenate([new_pos, [state.positions[members].mean(0) if members.any() else [np.nan, np.nan]]], 0)
        remap = np.where((remap < 0) & members, f_index, remap)
    assign = np.where(state.assign >= 0, remap[np.clip(state.assign, 0, None)], -1)
    x = np.concatenate([x_pre, new_x], 0)
    sizes = np.concatenate([s_pre, new_s])
    return x, sizes, assign, new_pos


@dataclass(frozen=True)
class ReducedRun:
    """What an executed reduction produced.

    ``embedding (E,)`` normalised; ``tokens_per_block[l]`` tokens entering block ``l`` (MLP part
    after a reduction in ``l``); ``assign`` the final original-token -> current-token map (-1 =
    dropped); ``sizes`` the final token sizes (prefix included); ``stage_assign`` the map after each
    stage; ``scores`` the first stage's per-original-token importance when the method gave one;
    ``macs`` multiply-accumulates of the vision tower as run; ``seconds`` wall time.
    """

    embedding: np.ndarray
    tokens_per_block: tuple[int, ...]
    assign: np.ndarray
    sizes: np.ndarray
    stage_assign: tuple[np.ndarray, ...]
    scores: np.ndarray | None
    macs: float
    seconds: float
    stages: tuple[int, ...]


def block_macs(n_in: int, n_mid: int, width: int, mlp_width: int) -> float:
    """Multiply-accumulates of one pre-LN transformer block whose attention sees ``n_in`` tokens
    and whose MLP sees ``n_mid`` (fewer when the block reduces between the two):
    qkv ``3 n D²``, scores and weighted sum ``2 n² D``, output projection ``n D²``, MLP
    ``2 n_mid D D_mlp``."""
    return float(4 * n_in * width**2 + 2 * n_in**2 * width + 2 * n_mid * width * mlp_width)
