"""Token reduction plans: what a pruning or merging method decides, and how it is applied.

A reduction method looks at the *current* tokens of a block (:class:`TokenState`: features after
the block's attention and residual, the block's keys and attention, token sizes) and returns a
:class:`ReductionStep`: which tokens to keep, or how to merge them into groups. The backend
executes the steps for real (the dropped tokens are removed, merged tokens are size-weighted
averages, later blocks run on fewer tokens; see ``ClipBackend.run_reduced``). Prefix tokens
([CLS], registers) are never reduced and are not part of a step.

Bookkeeping: ``assign (n_image_tokens,)`` maps every *original* image token to the
index of the current non-prefix token that holds it, or -1 when it was dropped. From it the
canvas draws kept / dropped tokens and merge groups on the original grid.

Arrays: the fields of a :class:`TokenState` and a :class:`ReductionStep` are numpy arrays or
device tensors (array API, :mod:`explorer.core.arrays`), with an optional leading batch axis
``B`` when a method decides for a whole batch at once (the backend runs batches with the same
token count per image). :func:`apply_step` is the numpy reference of one unbatched step (the
backend's batched torch version is tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arrays import asarray_like, is_host, namespace, to_host

__all__ = ["TokenState", "ReductionStep", "ReducedRun", "apply_step", "block_macs", "keep_count", "batch_step",
           "stack_steps"]


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

    Shapes (unbatched; a batched state has a leading ``B`` on every array): ``x (N, D)`` current
    tokens (prefix first); ``keys (H, N, dh)`` this block's keys; ``attention (H, N, N)`` its
    attention (computed from its input, with proportional attention if the run uses it), or
    ``None`` when the method did not ask for it; ``cls_row (H, N)`` the first prefix token's
    attention row alone, when that is all the method asked for; ``sizes (N,)`` how many original
    tokens each current token holds; ``assign (n_image_tokens,)`` as in the module docstring;
    ``positions (N - n_prefix, 2)`` the (row, col) centroid of each current patch token on the
    original grid; ``stage`` of ``n_stages`` is this reduction's place in the run.
    """

    layer: int
    stage: int
    x: Any
    keys: Any
    attention: Any
    sizes: Any
    n_prefix: int
    assign: Any
    positions: Any
    grid: tuple[int, int]
    n_stages: int = 1
    extras: dict = field(default_factory=dict)
    cls_row: Any = None

    @property
    def batch_size(self) -> int | None:
        """``B`` for a batched state, ``None`` for one image."""
        return int(self.x.shape[0]) if self.x.ndim == 3 else None

    @property
    def n_patches(self) -> int:
        return int(self.x.shape[-2] - self.n_prefix)

    @property
    def n_original(self) -> int:
        """Image tokens of the original grid (``assign``'s length)."""
        return int(self.assign.shape[-1])

    @property
    def xp(self):
        """The array namespace of this state's arrays (numpy, or torch on the model's device)."""
        return namespace(self.x)

    @property
    def on_host(self) -> bool:
        return is_host(self.x)

    @property
    def cls_attention(self):
        """Head-mean attention of the first prefix token ([CLS]) to the patch tokens, ``(n_patches,)``
        (``(B, n_patches)`` batched)."""
        if self.n_prefix == 0 or (self.attention is None and self.cls_row is None):
            raise ValueError("this model has no [CLS] attention at this block")
        row = self.cls_row if self.cls_row is not None else self.attention[..., 0, :]
        return namespace(row).mean(row[..., self.n_prefix:], axis=-2)

    def to_host(self) -> "TokenState":
        """A copy whose arrays are numpy (for numpy-only methods; a no-op on the host)."""
        if self.on_host:
            return self

        def h(a):
            return None if a is None else to_host(a)

        return TokenState(layer=self.layer, stage=self.stage, x=h(self.x), keys=h(self.keys), attention=h(self.attention),
                          sizes=h(self.sizes), n_prefix=self.n_prefix, assign=h(self.assign),
                          positions=h(self.positions), grid=self.grid, n_stages=self.n_stages, extras=self.extras,
                          cls_row=h(self.cls_row))

    def image(self, b: int) -> "TokenState":
        """Image ``b`` of a batched state, as an unbatched state (views, no copies)."""
        if self.batch_size is None:
            raise ValueError("this state holds one image")

        def pick(a):
            return None if a is None else a[b]

        return TokenState(layer=self.layer, stage=self.stage, x=self.x[b], keys=pick(self.keys),
                          attention=pick(self.attention), sizes=self.sizes[b], n_prefix=self.n_prefix,
                          assign=self.assign[b], positions=self.positions[b], grid=self.grid, n_stages=self.n_stages,
                          extras=self.extras, cls_row=pick(self.cls_row))


@dataclass
class ReductionStep:
    """A method's decision for the current patch tokens (prefix excluded).

    Exactly one of ``keep`` (indices of patch tokens to keep, in the order they should take) and
    ``merge`` (``(n_patches,)`` group id of every patch token, groups ``0..G-1``; the merged token
    is the size-weighted mean, ordered by group id) is given. ``fuse`` (EViT) adds one extra token
    ``Σ w_i x_i`` over the patch tokens with the given raw weights, appended last; its size is the
    number of tokens with non-zero weight. ``scores`` are optional per-patch importances (display).
    ``n_groups`` is ``G`` when the method knows it (saves reading ``merge`` back from a device).
    A batched step has a leading ``B`` on every array, the same ``k`` or ``G`` for every image.
    Host (numpy) steps are validated here; device steps are trusted (checking them would stall
    the device).
    """

    keep: Any = None
    merge: Any = None
    fuse: Any = None
    scores: Any = None
    n_groups: int | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.merge is None):
            raise ValueError("a reduction step gives either keep indices or merge groups")
        if self.keep is not None and (is_host(self.keep) or not hasattr(self.keep, "shape")):
            k = np.asarray(self.keep, dtype=np.int64)
            k = k.reshape(-1) if k.ndim <= 1 else k
            rows = k.reshape(1, -1) if k.ndim == 1 else k
            for row in rows:
                if np.unique(row).size != row.size:
                    raise ValueError("keep indices repeat")
            self.keep = k
        if self.merge is not None and (is_host(self.merge) or not hasattr(self.merge, "shape")):
            m = np.asarray(self.merge, dtype=np.int64)
            m = m.reshape(-1) if m.ndim <= 1 else m
            for row in (m.reshape(1, -1) if m.ndim == 1 else m):
                groups = np.unique(row)
                if groups.size and (groups[0] != 0 or groups[-1] != groups.size - 1):
                    raise ValueError("merge groups must be numbered 0..G-1")
            self.merge = m

    def n_out(self, n_patches: int) -> int:
        if self.keep is not None:
            n = int(self.keep.shape[-1])
        elif self.n_groups is not None:
            n = int(self.n_groups)
        else:
            n = int(np.asarray(self.merge).max()) + 1 if n_patches else 0
        return n + (1 if self.fuse is not None else 0)


def _expand(a):
    if a is None:
        return None
    return namespace(a).expand_dims(a, axis=0) if not is_host(a) else np.asarray(a)[None]


def batch_step(step: ReductionStep) -> ReductionStep:
    """An unbatched step as a batch of one (arrays get a leading axis)."""
    return ReductionStep(keep=_expand(step.keep), merge=_expand(step.merge), fuse=_expand(step.fuse),
                         scores=_expand(step.scores), n_groups=step.n_groups)


def stack_steps(steps: list[ReductionStep]) -> ReductionStep:
    """Per-image steps of a batch as one batched step; every image must keep as many tokens."""
    def stack(name):
        arrs = [getattr(s, name) for s in steps]
        if all(a is None for a in arrs):
            return None
        if any(a is None for a in arrs):
            raise ValueError(f"some images of the batch gave {name} and others did not")
        shapes = {tuple(a.shape) for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"every image of a batch must keep as many tokens ({name}: {sorted(shapes)})")
        if all(is_host(a) for a in arrs):
            return np.stack([np.asarray(a) for a in arrs])
        ref = next(a for a in arrs if not is_host(a))
        return namespace(ref).stack([asarray_like(a, ref) for a in arrs])

    merge = stack("merge")
    n_groups = {s.n_groups for s in steps}
    if merge is not None and (len(n_groups) != 1 or None in n_groups):
        counts = {int(np.asarray(to_host(s.merge)).max()) + 1 for s in steps}
        if len(counts) != 1:
            raise ValueError(f"every image of a batch must keep as many tokens (groups: {sorted(counts)})")
        n_groups = counts
    return ReductionStep(keep=stack("keep"), merge=merge, fuse=stack("fuse"), scores=stack("scores"),
                         n_groups=next(iter(n_groups)) if merge is not None else None)


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
    """What an executed reduction produced (numpy, copied once at the end of the run).

    ``embedding (E,)`` normalised; ``tokens_per_block[l]`` tokens entering block ``l`` (MLP part
    after a reduction in ``l``); ``assign`` the final original-token -> current-token map (-1 =
    dropped); ``sizes`` the final token sizes (prefix included); ``stage_assign`` the map after each
    stage; ``scores`` the first stage's per-original-token importance when the method gave one;
    ``macs`` multiply-accumulates of the vision tower as run (per image); ``seconds`` wall time of
    the whole batch, measured with the device synchronised. These describe image 0; a batched run
    also holds every image's ``embeddings (B, E)`` and ``assigns (B, n_image_tokens)``.
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
    embeddings: np.ndarray | None = None
    assigns: np.ndarray | None = None
    device: str = "cpu"
    first_block: int = 0  # the first block the run computed (earlier ones came from a trace)
    macs_run: float = 0.0  # MACs of the blocks it computed (``macs`` counts the skipped ones too)

    @property
    def batch_size(self) -> int:
        return 1 if self.embeddings is None else int(self.embeddings.shape[0])


def block_macs(n_in: int, n_mid: int, width: int, mlp_width: int) -> float:
    """Multiply-accumulates of one pre-LN transformer block whose attention sees ``n_in`` tokens
    and whose MLP sees ``n_mid`` (fewer when the block reduces between the two):
    qkv ``3 n D²``, scores and weighted sum ``2 n² D``, output projection ``n D²``, MLP
    ``2 n_mid D D_mlp``."""
    return float(4 * n_in * width**2 + 2 * n_in**2 * width + 2 * n_mid * width * mlp_width)
