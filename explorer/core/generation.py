"""What a vision-language model's generation produced, and what a VLM pruning method sees and decides.

Plain data (no torch): plugins and the core read them without importing a model library. The
arrays of a :class:`PruneState` live where the model runs (numpy for a CPU model, tensors on the
model's device otherwise; see :mod:`explorer.core.arrays`); index arrays and everything in a
:class:`Generation` are numpy (a generation copies what it kept to the host once, at its end).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from .layout import TokenLayout

__all__ = ["PruneState", "PruneDecision", "PrunePlan", "EncoderStage", "Generation"]


@dataclass
class PruneState:
    """What a VLM pruning method sees before layer ``layer`` of the LLM (``0`` = its input).

    ``hidden (N, D)`` the current sequence (where the model runs); ``image`` the current sequence
    indices of the image tokens still present (numbers into ``original`` give their original
    image-token number; numpy); ``last_row (n,)`` the head-mean attention of the last prompt token
    over the current image tokens at the previous layer (``None`` at layer 0); ``keys (H, N, d)``
    the previous layer's post-RoPE keys when asked for; ``text`` sequence indices of the text after
    the image block (numpy); ``text_rows (H, t, n)`` when the plan asks for them: the post-softmax
    attention of the ``t`` text tokens after the image block (queries) over the current image tokens
    (keys) at the previous layer, as that layer ran in this prefill; ``stage`` the number of the
    decision (0, 1, ... for the plan's layers in order).
    """

    layer: int
    hidden: Any
    image: np.ndarray
    original: np.ndarray
    text: np.ndarray
    last_row: Any
    keys: Any
    layout: TokenLayout
    extras: dict = field(default_factory=dict)
    text_rows: Any = None
    stage: int = 0


@dataclass
class PruneDecision:
    """The image tokens to keep: indices into ``PruneState.image`` (numpy or device array);
    ``scores`` (optional) one importance per current image token, for display. With ``merge`` (a
    group id ``0..G-1`` per current image token; ``keep`` is then ignored) every group becomes one
    token, the mean of its members' hidden states, placed at its first member's position (spatial
    pooling)."""

    keep: Any = None
    scores: Any = None
    merge: Any = None


@dataclass
class EncoderStage:
    """What a method does inside the vision tower before the LLM sees the image (MustDrop's spatial
    merge). ``after_layer``: vision encoder layer -> ``fn(hidden (1, 1 + n, D)) -> (hidden', assign)``
    with ``assign (n,)`` the new token (0-based, [CLS] not counted) each incoming patch token went
    into (numpy), applied to that layer's output; ``cls_layers``: vision layers whose [CLS]
    attention row over the (current) patch tokens is handed to :attr:`PruneState.extras` as
    ``vision_cls[layer] (H, n_current)``."""

    after_layer: dict[int, Callable[[Any], tuple[Any, np.ndarray]]] = field(default_factory=dict)
    cls_layers: tuple[int, ...] = ()


@dataclass
class PrunePlan:
    """How a pruning method runs inside one generation.

    ``layers``: the LLM layers before which ``decide(state)`` is called, ascending (0 = the LLM
    input); ``needs_keys`` hands over the previous layer's keys, ``text_rows`` the text-to-image
    attention rows (:class:`PruneState`). ``positions``: ``"original"`` the survivors keep their
    position ids; ``"renumber"`` the shortened sequence is numbered ``0..L'-1`` again after every
    decision (1-D position ids only). ``cache``: the KV cache decoding reads: ``"prefill"`` every
    layer keeps what it saw in the prefill; ``"final"`` from the layer of the first decision's
    attention (``layers[0] - 1``) on, every layer's cache is cut to the tokens that survived the
    last decision, and a generated token's position at a layer is that layer's cache length.
    ``encoder`` an optional :class:`EncoderStage`.
    """

    layers: list[int]
    decide: Callable[[PruneState], PruneDecision]
    needs_keys: bool = False
    text_rows: bool = False
    positions: Literal["original", "renumber"] = "original"
    cache: Literal["prefill", "final"] = "prefill"
    encoder: EncoderStage | None = None

    @classmethod
    def of(cls, prune) -> "PrunePlan | None":
        """A plan from a plan or the one-decision form ``(layer, decide, needs_keys)``."""
        if prune is None or isinstance(prune, PrunePlan):
            return prune
        layer, decide, keys = prune
        return cls(layers=[int(layer)], decide=decide, needs_keys=bool(keys))


@dataclass
class Generation:
    """What one generation produced (numpy).

    ``ids``/``tokens`` the generated token ids and strings (eos excluded); ``attention[layer]``
    ``(T, H, n_img)`` rows of each generated token over the image tokens (NaN for image tokens
    pruned before that layer), only for the layers asked for; ``image_mass`` ``(T, L_kept)`` the
    attention mass on the image per kept layer (head mean); ``kept`` the original image-token
    numbers entering each layer; ``prefill_seconds`` (the vision tower, the projector and the
    LLM's pass over the prompt), ``decode_seconds`` (the tokens after the first), ``seconds`` in
    all, each measured with the device synchronised; ``prompt_length`` tokens of the prompt as run.
    """

    ids: list[int]
    tokens: list[str]
    text: str
    attention: dict[int, np.ndarray]
    image_mass: np.ndarray
    kept: dict[int, np.ndarray]
    prefill_seconds: float
    seconds: float
    prompt_length: int
    logprob: float = 0.0
    groups: np.ndarray | None = None  # merging: group id per original image token
    decode_seconds: float = 0.0
    device: str = "cpu"
    tokens_per_layer: list[int] | None = None  # image tokens of the LLM's sequence entering each layer (prefill)
    cache_lengths: list[int] | None = None  # KV-cache entries per layer after the prefill (what decoding reads)
    vision_tokens: int | None = None  # image tokens the LLM received (after an encoder stage)

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed: tokens generated after the first, per second of decoding."""
        n = max(0, len(self.ids) - 1)
        return n / self.decode_seconds if self.decode_seconds > 0 and n else float("nan")
