"""Trace: what one forward pass produced, plus its :class:`TokenLayout`.

The arrays stay where the model computed them: numpy arrays for a model on the CPU, torch tensors
on the model's device and in its dtype for a GPU or MPS model (see :mod:`explorer.core.arrays`).
Methods compute on them in place with the array API; only what is drawn or exported is copied to
the host, with :func:`explorer.core.arrays.to_host`.

Conventions
-----------
* ``hidden_states[l]`` for ``l`` in ``0..n_layers``: ``0`` is the sequence entering block 0
  (after embeddings and the pre-norm), ``l`` is the output of block ``l - 1``. Shape ``(N, D)``.
* ``attentions[l]`` for block ``l`` in ``0..n_layers-1``: post-softmax probabilities, shape
  ``(H, Nq, N)`` with rows = queries, columns = keys. ``Nq == N`` unless only some query rows
  were captured; then ``attention_rows`` lists them (sequence indices).
* Embeddings (image and text) are L2-normalised float32 numpy vectors in the joint space (small:
  they are copied once, at the end of the pass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from .arrays import device_of, is_host, nbytes as _nbytes, to_host
from .layout import TokenLayout

__all__ = ["CaptureSpec", "ModelInfo", "TextEncoding", "Trace"]


@dataclass(frozen=True)
class CaptureSpec:
    """What a forward pass must keep.

    Parameters
    ----------
    attention_layers
        Blocks whose attention probabilities are kept (all heads).
    attention_rows
        Query rows (sequence indices) to keep; ``None`` keeps every row.
    hidden_layers
        Indices into the hidden states (``0..n_layers``) to keep.
    """

    attention_layers: frozenset[int] = frozenset()
    attention_rows: tuple[int, ...] | None = None
    hidden_layers: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", frozenset(int(i) for i in self.attention_layers))
        object.__setattr__(self, "hidden_layers", frozenset(int(i) for i in self.hidden_layers))
        if self.attention_rows is not None:
            object.__setattr__(self, "attention_rows", tuple(sorted({int(i) for i in self.attention_rows})))
        for i in (*self.attention_layers, *self.hidden_layers):
            if i < 0:
                raise ValueError("capture layer indices must be non-negative (resolve them against the model first)")

    def union(self, other: "CaptureSpec") -> "CaptureSpec":
        # rows only matter for specs that capture attention at all
        wanted = [s.attention_rows for s in (self, other) if s.attention_layers]
        if not wanted:
            rows = None
        elif any(r is None for r in wanted):
            rows = None
        else:
            rows = tuple(sorted(set().union(*wanted)))
        return CaptureSpec(
            attention_layers=self.attention_layers | other.attention_layers,
            attention_rows=rows,
            hidden_layers=self.hidden_layers | other.hidden_layers,
        )

    def covers(self, other: "CaptureSpec") -> bool:
        """True when a trace captured with ``self`` holds everything ``other`` asks for."""
        if not other.attention_layers <= self.attention_layers:
            return False
        if not other.hidden_layers <= self.hidden_layers:
            return False
        if other.attention_layers and self.attention_rows is not None:
            if other.attention_rows is None or not set(other.attention_rows) <= set(self.attention_rows):
                return False
        return True

    def key(self) -> str:
        return json.dumps(
            {
                "attn": sorted(self.attention_layers),
                "rows": None if self.attention_rows is None else list(self.attention_rows),
                "hidden": sorted(self.hidden_layers),
            },
            sort_keys=True,
        )

    @classmethod
    def everything(cls, n_layers: int) -> "CaptureSpec":
        return cls(attention_layers=frozenset(range(n_layers)), hidden_layers=frozenset(range(n_layers + 1)))


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the model that produced a trace (enough for methods to resolve layers)."""

    kind: str  # 'clip', 'sam', 'vlm'
    spec: str  # canonical spec string (cache key part)
    name: str
    n_layers: int
    n_heads: int
    width: int
    embed_dim: int | None = None
    patch_size: tuple[int, int] | None = None
    input_size: tuple[int, int] | None = None
    device: str = "cpu"
    dtype: str = "float32"
    demo: bool = False
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class TextEncoding:
    """Text prompts encoded by the text tower.

    ``embeddings`` is ``(T, E)`` float32, L2-normalised; ``tokens[i]`` are the display strings of
    prompt ``i``'s tokens (start/end markers included); ``pooled_index[i]`` is the token whose
    feature was pooled (the end-of-text token for CLIP).
    """

    prompts: tuple[str, ...]
    embeddings: np.ndarray
    tokens: tuple[tuple[str, ...], ...] = ()
    pooled_index: tuple[int, ...] = ()

    def index(self, prompt: str) -> int:
        return self.prompts.index(prompt)


@dataclass(frozen=True)
class Trace:
    """Everything one forward pass produced that anyone asked for, where the model computed it.

    ``hidden_states`` and ``attentions`` hold numpy arrays (CPU model) or device tensors (GPU/MPS
    model, model dtype); :attr:`device` says which, :attr:`device_nbytes` how much of the trace
    lives in device memory, and :meth:`on_host` makes a numpy copy (exports, sessions).
    """

    layout: TokenLayout
    model: ModelInfo
    image_sha256: str
    capture: CaptureSpec
    hidden_states: Mapping[int, np.ndarray] = field(default_factory=dict)
    attentions: Mapping[int, np.ndarray] = field(default_factory=dict)
    attention_rows: tuple[int, ...] | None = None
    image_embedding: np.ndarray | None = None
    logit_scale: float | None = None
    text: TextEncoding | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)  # backend-specific (a VLM's generation, ...)
    seconds: float = 0.0

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens

    def attention(self, layer: int) -> np.ndarray:
        """Attention of block ``layer`` (negative counts from the end), ``(H, Nq, N)``."""
        layer = self._resolve(layer, self.model.n_layers)
        if layer not in self.attentions:
            raise KeyError(
                f"attention of layer {layer} was not captured (captured: {sorted(self.attentions)})"
            )
        return self.attentions[layer]

    def attention_row(self, layer: int, query: int) -> np.ndarray:
        """``(H, N)`` attention of query token ``query`` (sequence index) at ``layer``."""
        a = self.attention(layer)
        if self.attention_rows is None:
            return a[:, query, :]
        if query not in self.attention_rows:
            raise KeyError(f"query row {query} was not captured (rows: {list(self.attention_rows)})")
        return a[:, self.attention_rows.index(query), :]

    def hidden(self, index: int) -> np.ndarray:
        """Hidden states ``(N, D)``; ``index`` in ``0..n_layers`` (negative counts from the end)."""
        index = self._resolve(index, self.model.n_layers + 1)
        if index not in self.hidden_states:
            raise KeyError(f"hidden state {index} was not captured (captured: {sorted(self.hidden_states)})")
        return self.hidden_states[index]

    @staticmethod
    def _resolve(i: int, n: int) -> int:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"layer index {i} out of range for {n}")
        return j

    def with_text(self, text: TextEncoding | None) -> "Trace":
        return replace(self, text=text)

    def _arrays(self):
        yield from self.hidden_states.values()
        yield from self.attentions.values()
        yield from (a for a in self.extras.values() if hasattr(a, "shape") and hasattr(a, "dtype"))
        if self.image_embedding is not None:
            yield self.image_embedding
        if self.text is not None:
            yield self.text.embeddings

    @property
    def nbytes(self) -> int:
        """Bytes of every array the trace holds, host and device together."""
        return int(sum(_nbytes(a) for a in self._arrays()))

    @property
    def device_nbytes(self) -> int:
        """Bytes held in device memory (0 for a CPU trace): what a GPU cache budget counts."""
        return int(sum(_nbytes(a) for a in self._arrays() if device_of(a) != "cpu"))

    @property
    def device(self) -> str:
        """Where the captured arrays live: ``'cpu'`` or the device of the first tensor."""
        for a in (*self.attentions.values(), *self.hidden_states.values()):
            return device_of(a)
        return "cpu"

    @property
    def on_device(self) -> bool:
        """True when the captured arrays are tensors rather than numpy arrays."""
        return any(not is_host(a) for a in (*self.attentions.values(), *self.hidden_states.values()))

    def on_host(self) -> "Trace":
        """A copy whose captured arrays are numpy (one host copy per array; a no-op on the CPU)."""
        if not self.on_device:
            return self
        return replace(self, hidden_states={k: to_host(v) for k, v in self.hidden_states.items()},
                       attentions={k: to_host(v) for k, v in self.attentions.items()})
