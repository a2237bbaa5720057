"""Pruning and merging methods: the plugin base class and what a reduction does to the output.

A reduction plugin subclasses :class:`ReductionMethod` and implements two things:

* ``stages(params, model) -> list[int]``: the blocks where it acts (between attention and MLP);
* ``reduce(state, params) -> ReductionStep``: its decision for the current tokens
  (:class:`~explorer.core.reduction.TokenState`).

and says what its decision needs, so that the run computes nothing more:

* ``attention_need(params)``: ``'none'`` (keys and features only: every block keeps the fused
  kernel), ``'cls'`` (the [CLS] row alone, :attr:`TokenState.cls_row`) or ``'full'`` (the whole
  probability matrix; the default, safe for plugins that do not say);
* ``host_only``: ``True`` (the default) hands ``reduce`` numpy copies; a method written against the
  array API sets it ``False`` and decides on the device, where the run is;
* ``batched``: ``True`` when ``reduce`` handles a leading batch axis (one call decides for every
  image of a batched run); otherwise it is called once per image.

The base class does the rest. ``run`` *executes* the reduction in the backend (the tokens really
leave the sequence; ``ClipBackend.run_reduced``) and returns a :class:`TokenSelection` over the
original image tokens (kept / dropped, merge groups) whose ``meta`` carries the executed run: the
reduced image embedding, tokens per block, MACs and time. ``select`` computes only the first
stage's decision from a cached trace (no tower pass), for quick display and sweeps.
:func:`reduction_metrics` compares an executed run with the unreduced trace: embedding cosine,
zero-shot top-1 agreement and KL over a label set, FLOPs ratio.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.arrays import to_host
from explorer.core.jobs import Progress
from explorer.core.reduction import ReducedRun, ReductionStep, TokenState, block_macs, keep_count
from explorer.core.results import Metrics, TokenSelection
from explorer.core.trace import CaptureSpec, ModelInfo, Trace

from .api import Method, ParamError, resolve_layer
from .protocols import ClipTower

__all__ = ["ReductionParams", "ReductionMethod", "reduction_metrics", "label_set", "selection_from_assign",
           "full_macs", "SCENE_LABELS", "first_layer", "default_layer"]


class ReductionParams(BaseModel):
    """Knobs every reduction method has; methods add their own (and may change the defaults)."""

    model_config = ConfigDict(extra="forbid")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="Fraction of the patch tokens kept after the last stage.")
    layer: int = Field(4, description="Block where the reduction happens, between its attention and MLP "
                       "(negative counts from the last; clamped to the model's last block).",
                       json_schema_extra={"role": "layer"})
    seed: int = Field(0, ge=0, description="Seed for methods with randomness.")


class ReductionMethod(Method):
    """Base class of pruning and merging plugins (see module docstring)."""

    Params = ReductionParams
    proportional_attention: bool = False  # ToMe's log(size) bias in the attention of later blocks
    host_only: bool = True  # reduce() gets numpy copies; array-API methods set False and stay on the device
    batched: bool = False  # reduce() handles a leading batch axis

    def attention_need(self, params: BaseModel) -> str:
        """What of the block's attention :meth:`reduce` reads: ``'none'``, ``'cls'`` or ``'full'``."""
        return "full"

    # -- what a plugin implements ---------------------------------------------------------------
    def stages(self, params: BaseModel, model: ModelInfo) -> list[int]:
        return [first_layer(params.layer, model.n_layers)]

    def reduce(self, state: TokenState, params: BaseModel) -> ReductionStep:
        raise NotImplementedError

    def uses_proportional_attention(self, params: BaseModel) -> bool:
        return bool(getattr(params, "prop_attn", self.proportional_attention))

    # -- provided -------------------------------------------------------------------------------
    def stage_keep(self, params: BaseModel, state: TokenState, rounding: str = "ceil") -> int:
        """Patch tokens to keep at this stage so that ``keep`` of the original ones remain after
        the last stage: the per-stage rate ``keep ** (1 / n_stages)`` (EViT applies its keep rate
        at each of its stages), the last stage hitting ``keep · n_original`` exactly."""
        n, n_orig = state.n_patches, state.n_original
        if state.stage == state.n_stages - 1:
            return max(1, min(n, keep_count(params.keep, n_orig, rounding)))
        rate = params.keep ** (1.0 / state.n_stages)
        return max(1, min(n, keep_count(rate, n, rounding)))

    def capture(self, params, model, target):
        first = self.stages(params, model)[0]
        attn = {first} if self.attention_need(params) != "none" else set()
        return CaptureSpec(attention_layers=attn, hidden_layers={first})

    def select(self, trace: Trace, params: BaseModel, backend: ClipTower) -> TokenSelection:
        """The first stage's decision from a cached trace (no vision pass): decided where the
        trace lives; only the step (indices, scores) comes to the host for display."""
        stages = self.stages(params, trace.model)
        state = backend.token_state(trace, stages[0], n_stages=len(stages), attention=self.attention_need(params))
        step = self.reduce(state.to_host() if self.host_only else state, params)
        host = ReductionStep(keep=to_host(step.keep), merge=to_host(step.merge), fuse=to_host(step.fuse),
                             scores=to_host(step.scores), n_groups=step.n_groups)
        assign = _remap(to_host(state.assign), state.n_patches, host)
        scores = None if host.scores is None else np.asarray(host.scores, dtype=np.float32)
        return selection_from_assign(trace, assign, scores, f"{type(self).__name__} at block {stages[0]} (first stage)",
                                     stages[0], merging=host.merge is not None)

    def executed(self, backend: ClipTower, source: Any, params: BaseModel, stages: Sequence[int] | None = None,
                 cancel: Any = None) -> ReducedRun:
        """Run the model with this method's reduction executed (``ClipTower.run_reduced``):
        ``source`` is a trace, an image or a (batched) prepared input."""
        model = backend.info
        stages = self.stages(params, model) if stages is None else stages
        return backend.run_reduced(source, stages, lambda st: self.reduce(st, params),
                                   proportional_attention=self.uses_proportional_attention(params), cancel=cancel,
                                   attention=self.attention_need(params), batched=self.batched, host=self.host_only)

    def run(self, trace, params, *, target, cancel, backend=None):
        if not isinstance(backend, ClipTower):
            raise ParamError("token reduction needs the loaded CLIP model")
        stages = self.stages(params, trace.model)
        yield Progress(0.1, f"reduced forward from block {stages[0]}")
        run: ReducedRun = self.executed(backend, trace, params, stages, cancel)
        baseline = backend.unreduced_seconds(trace, run.first_block) if run.first_block in trace.hidden_states else None
        merging = self.is_merging(params)
        assign = run.assign
        fused = np.zeros(assign.shape[0], dtype=bool)
        if not merging:
            # a pruning method's tokens of size > 1 are fused tokens (EViT): their members are not kept
            final_sizes = run.sizes[1:]
            fused = (assign >= 0) & (final_sizes[np.clip(assign, 0, None)] > 1)
            assign = np.where(fused, -1, assign)
        sel = selection_from_assign(trace, assign, run.scores, "", stages[-1], merging=merging)
        n_kept = int((assign >= 0).sum()) if not merging else int(np.unique(assign[assign >= 0]).size)
        meta = {
            "fused": fused,
            "stages": list(run.stages),
            "embedding": run.embedding,
            "tokens_per_block": list(run.tokens_per_block),
            "macs": run.macs,
            "seconds": run.seconds,
            "first_block": run.first_block,
            "macs_run": run.macs_run,
            "baseline_seconds": baseline,
            "device": run.device,
            "final_tokens": int(run.sizes.shape[0]),
            "kept_tokens": n_kept,
            "merging": merging,
        }
        label = f"{n_kept}/{trace.layout.n_image_tokens} tokens after block {stages[-1]}"
        return TokenSelection(layout=sel.layout, kept=sel.kept, scores=sel.scores, groups=sel.groups, order=sel.order,
                              label=label, layer=stages[-1], meta=meta)

    def is_merging(self, params: BaseModel) -> bool:
        return False


def default_layer(n_layers: int) -> int:
    """The reduction block the window and the benchmarks start from: a third of the depth
    (block 4 of ViT-B's 12, block 1 of the demo CLIP's 5), so later blocks run on the reduced
    sequence; reducing in the last block leaves the [CLS] output unchanged."""
    return max(1, int(n_layers) // 3)


def first_layer(layer: int, n_layers: int) -> int:
    """Resolve a reduction block: negative counts from the end, too large clamps to the last block."""
    return resolve_layer(min(layer, n_layers - 1), n_layers)


def _remap(assign: np.ndarray, n: int, step: ReductionStep) -> np.ndarray:
    """Original-token assignment after one step on ``n`` patch tokens (numpy reference of the
    bookkeeping)."""
    if step.keep is not None:
        remap = np.full(n, -1, dtype=np.int64)
        remap[step.keep] = np.arange(step.keep.size)
    else:
        remap = step.merge
    if step.fuse is not None:
        f = (step.keep.size if step.keep is not None else int(step.merge.max()) + 1)
        remap = np.where((remap < 0) & (np.asarray(step.fuse) != 0), f, remap)
    return np.where(assign >= 0, remap[np.clip(assign, 0, None)], -1)


def selection_from_assign(trace: Trace, assign: np.ndarray, scores, label: str, layer: int,
                          merging: bool) -> TokenSelection:
    """A :class:`TokenSelection` over the original image tokens from an assignment map."""
    kept = assign >= 0
    groups = assign.copy() if merging else None
    order = None
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        order = np.argsort(np.where(np.isfinite(s), -s, np.inf), kind="stable")
        order = order[kept[order]]
    return TokenSelection(layout=trace.layout, kept=kept, scores=scores, groups=groups, order=order, label=label,
                          layer=layer)


def full_macs(model: ModelInfo, n_tokens: int, mlp_ratio: float = 4.0) -> float:
    """MACs of the unreduced vision tower (blocks only) for ``n_tokens``."""
    return model.n_layers * block_macs(n_tokens, n_tokens, model.width, int(model.width * mlp_ratio))


SCENE_LABELS = tuple(f"{'an' if c == 'orange' else 'a'} {c} {s}" for c in
                     ("red", "green", "blue", "yellow", "purple", "orange", "white")
                     for s in ("circle", "square", "triangle", "star", "ring"))


def label_set(backend, which: Literal["auto", "imagenet", "scenes", "custom"] = "auto",
              custom: Sequence[str] = ()) -> tuple[tuple[str, ...], np.ndarray]:
    """``(names, T (K, E))`` of a zero-shot label set: ImageNet's 1000 classes with
    ``"a photo of a {}."`` for real CLIP, the 35 scene captions for the demo CLIP, or a list."""
    if which == "custom" or custom:
        names = tuple(n.strip() for n in custom if n.strip())
        if len(names) < 2:
            raise ParamError("a custom label set needs at least two labels")
        return names, backend.encode_text(names).embeddings
    if which == "auto":
        which = "scenes" if backend.info.demo else "imagenet"
    if which == "scenes":
        return SCENE_LABELS, backend.encode_text(SCENE_LABELS).embeddings
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES), backend.encode_text(IMAGENET_CLASSNAMES, templates="single").embeddings


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def reduction_metrics(trace: Trace, selection: TokenSelection, labels: np.ndarray,
                      logit_scale: float | None = None, seconds: float | None = None) -> Metrics:
    """Compare an executed reduction (``selection.meta``) with the unreduced trace.

    ``cosine``: reduced vs full image embedding; ``top1_agree`` (0/1) and ``kl`` (KL(full ||
    reduced), nats) of the zero-shot distribution ``softmax(logit_scale · e Tᵀ)`` over ``labels``
    ``(K, E)``; ``kept``: patch tokens left; ``macs_ratio``: MACs as run / unreduced MACs;
    ``seconds``: the executed run's time (the device synchronised; ``seconds`` overrides it with a
    warm run's). When the unreduced tower was
    timed over the same blocks (``baseline_seconds``): ``speedup`` (its time / the run's),
    ``ideal_speedup`` (its MACs / the run's, over those blocks) and ``share_of_ideal``.
    """
    meta = selection.meta
    if "embedding" not in meta:
        raise ValueError("this selection was not executed (no reduced embedding)")
    full, red = np.asarray(trace.image_embedding, np.float64), np.asarray(meta["embedding"], np.float64)
    scale = float(logit_scale or trace.logit_scale or 100.0)
    T = np.asarray(labels, np.float64)
    p, q = _softmax(scale * full @ T.T), _softmax(scale * red @ T.T)
    kl = float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))
    macs_full = full_macs(trace.model, trace.layout.n_tokens)
    timing = {}
    run_seconds = float(meta["seconds"] if seconds is None else seconds)
    if meta.get("baseline_seconds") and meta.get("macs_run"):
        first = int(meta.get("first_block", 0))
        full_run = macs_full * (trace.model.n_layers - first) / trace.model.n_layers
        speedup = float(meta["baseline_seconds"]) / max(run_seconds, 1e-12)
        ideal = full_run / float(meta["macs_run"])
        timing = {"baseline_seconds": float(meta["baseline_seconds"]), "speedup": speedup, "ideal_speedup": ideal,
                  "share_of_ideal": speedup / ideal}
    return Metrics(values={
        "cosine": float(full @ red / (np.linalg.norm(full) * np.linalg.norm(red))),
        "top1_agree": float(p.argmax() == q.argmax()),
        "kl": kl,
        "kept": float(meta["kept_tokens"]),
        "macs_ratio": float(meta["macs"] / macs_full),
        "seconds": run_seconds,
        **timing,
    }, label=selection.label)
