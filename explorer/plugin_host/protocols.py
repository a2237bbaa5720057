"""What a method may call on a loaded model: the typed contract between plugins and backends.

Plugins reach a model only through these protocols (``typing.Protocol``), never through a
backend's attributes or modules; the backends in :mod:`explorer.backends` implement them, and an
import-linter contract keeps plugins from importing the backends at all. Every call takes the
model's lock itself and runs in inference mode (the gradient pass excepted): a method never locks,
never enters a mode, and never touches an ``nn.Module``.

Arrays: ``trace`` arrays and pruning states live where the model runs (numpy for a CPU model,
tensors on its device otherwise; see :mod:`explorer.core.arrays`). Calls that take an ``x`` accept
either a trace array ``(N, D)`` or a tensor ``(B, N, D)`` and return tensors on the model's device
in its dtype; :meth:`ClipTower.to_trace_array` turns a tensor back into the trace's namespace.

Shapes: ``x (B, N, D)``; ``q, k, v (B, H, N, dh)``; ``o (B, H, N, dh)``; projected tokens
``(B, N, E)``. Sequence layout of a CLIP tower: ``[CLS, patch(0,0), patch(0,1), ...]``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from explorer.core.generation import PruneDecision, PruneState
from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Progress
from explorer.core.reduction import ReducedRun, ReductionStep, TokenState
from explorer.core.trace import CaptureSpec, ModelInfo, TextEncoding, Trace

__all__ = ["ClipTower", "VlmModel", "AttentionOps", "TokenizerModel"]


@runtime_checkable
class AttentionOps(Protocol):
    """One attention module's own score function, handed to replacement attentions."""

    num_heads: int

    def logits(self, q: Any, k: Any) -> Any:
        """Pre-softmax scores ``(B, H, Nq, Nk)`` the way the module computes them."""


@runtime_checkable
class ClipTower(Protocol):
    """A loaded CLIP model (image and text towers) as methods see it."""

    kind: str  # 'clip'
    info: ModelInfo

    # -- arrays ---------------------------------------------------------------------------------
    def host_arrays(self) -> bool:
        """True when traces of this model keep numpy arrays (a CPU model)."""

    def to_tensor(self, array: Any) -> Any:
        """A trace array ``(N, D)`` as ``(1, N, D)`` on the model's device and dtype."""

    def as_tensor(self, array: Any, dtype: Any = None) -> Any:
        """An array of either namespace as a tensor on the model's device."""

    def to_trace_array(self, tensor: Any) -> Any:
        """A tensor the way the model's traces keep arrays."""

    def synchronize(self) -> None:
        """Wait for the device's queued work (timing)."""

    # -- images and traces ------------------------------------------------------------------------
    def prepare(self, image: LoadedImage) -> Any:
        """The model input and token layout of an image (``PreparedImage``)."""

    def prepared_for(self, trace: Trace) -> Any:
        """The prepared input of the image a trace was made from."""

    def n_tokens(self, image_size: tuple[int, int]) -> int: ...

    def trace(self, image: Any, capture: CaptureSpec, cancel: CancelToken | None = None) -> Iterator[Progress]:
        """Job: one pass, returning a :class:`Trace` with what ``capture`` asks."""

    # -- blocks -------------------------------------------------------------------------------------
    def block_qkv(self, layer: int, x: Any) -> tuple[AttentionOps, Any, Any, Any]:
        """``ln_1`` and the in-projection of a block: ``(ops, q, k, v)``."""

    def block_values(self, layer: int, x: Any) -> Any:
        """The values ``v`` alone (a third of :meth:`block_qkv`)."""

    def block_input_norm(self, layer: int, x: Any) -> Any:
        """``ln_1(x)``: what the block's in-projection reads."""

    def block_attention_output(self, layer: int, o: Any) -> Any:
        """Heads ``o`` through the output projection (and the block's post-attention norm and
        layer scale): the attention branch's output ``(B, N, D)``."""

    def block_mlp(self, layer: int, y: Any) -> Any:
        """The MLP branch ``ls_2(mlp(ln_2(y)))``."""

    def run_block(self, layer: int, x: Any, attention: Callable[..., Any] | None = None, residual: bool = True,
                  ffn: bool = True, values_only: bool = False) -> Any:
        """A block with an optional replacement attention ``attention(ops, q, k, v) -> o``."""

    def project_tokens(self, x: Any) -> Any:
        """``ln_post`` then ``proj`` on every token (not normalised)."""

    def projection(self) -> Any:
        """The output projection ``(D, E)`` or ``None``."""

    def attention_output_parts(self, layer: int) -> Any:
        """The linear pieces from a block's heads to its MLP (``OutputParts``), or ``ValueError``."""

    # -- text -----------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], templates: str | None = None,
                    allow_empty: bool = False) -> TextEncoding: ...

    @property
    def logit_scale(self) -> float:
        """CLIP's trained temperature ``exp(logit_scale)``."""

    # -- gradients and scores -----------------------------------------------------------------------
    def gradient_pass(self, image: Any, text_embedding: np.ndarray, attention_layers: Sequence[int] = (),
                      hidden_layers: Sequence[int] = (), cancel: CancelToken | None = None) -> Any:
        """One forward and backward pass of the image-text logit (``GradientPass``)."""

    def masked_inputs(self, prepared: Any, masks: np.ndarray, baseline: str = "mean") -> Any: ...

    def score_inputs(self, pixels: Any, text_embedding: np.ndarray | None = None, reference: np.ndarray | None = None,
                     batch_size: int = 32, cancel: CancelToken | None = None) -> np.ndarray: ...

    def encode_image_tensor(self, pixels: Any) -> np.ndarray: ...

    # -- executed token reduction -----------------------------------------------------------------
    def token_state(self, trace: Trace, layer: int, n_stages: int = 1, attention: str = "full") -> TokenState:
        """The unreduced model's state at a block, from a trace (no tower pass)."""

    def run_reduced(self, source: Any, stages: Sequence[int], reduce: Callable[[TokenState], ReductionStep] | None = None,
                    proportional_attention: bool = False, cancel: CancelToken | None = None, attention: str = "full",
                    batched: bool = False, host: bool = True) -> ReducedRun:
        """The tower with a reduction executed (tokens really leave the sequence)."""


@runtime_checkable
class VlmModel(Protocol):
    """A loaded vision-language model as methods see it."""

    kind: str  # 'vlm'
    info: ModelInfo
    image_token_id: int

    def host_arrays(self) -> bool:
        """True when pruning states hold numpy arrays (a CPU model)."""

    def prepare(self, image: LoadedImage, prompt: str) -> Any:
        """Processor outputs and the token layout of the LLM input (``VlmInputs``)."""

    def generate_job(self, prepared: Any, max_new_tokens: int = 32, attention_layers: Sequence[int] | None = None,
                     prune: tuple[int, Callable[[PruneState], PruneDecision], bool] | None = None,
                     cancel: CancelToken | None = None, force: Sequence[int] | None = None) -> Iterator[Progress]:
        """Job: greedy generation with capture and pruning, returning a :class:`Generation`."""

    def attention_rows(self, prepared: Any, layer: int, rows: Sequence[int]) -> np.ndarray: ...

    def vision_cls_attention(self, prepared: Any, layers: Sequence[int]) -> dict[int, np.ndarray]: ...

    def vision_feature_layer(self) -> int | Sequence[int]:
        """The vision layer(s) whose output the model uses as image features."""

    def relevancy(self, prepared: Any, generated: Sequence[int], t: int,
                  cancel: CancelToken | None = None) -> tuple[np.ndarray, float]: ...

    def input_embeddings(self, prepared: Any) -> Any:
        """``(N, D)`` the LLM's input embeddings (image features merged)."""

    def final_norm(self) -> tuple[Any, float]:
        """``(weight, eps)`` of the language model's final norm."""


@runtime_checkable
class TokenizerModel(Protocol):
    """A loaded image tokenizer as methods see it. Ids ``(B, N)`` int64 and code vectors
    ``(B, N, C)`` live on the model's device; images are ``(B, 3, S, S)`` in [0, 1] in the model's
    frame. ``keep (B, N) bool``: tokens marked False stand aside (an ordered tokenizer's tail
    token, else the codebook's mean vector)."""

    kind: str  # 'tokenizer'
    info: ModelInfo
    token_count: int  # tokens per image (N)
    is_grid: bool
    ordered: bool

    def prepare(self, image: LoadedImage) -> Any:
        """The image in the model's frame: ``.pixels (1, 3, S, S)``, ``.layout``."""

    def pixel_layout(self, layout: Any) -> Any:
        """A layout with one cell per pixel of the model's frame (pixel-level maps)."""

    def token_sequence_indices(self, layout: Any) -> np.ndarray:
        """Encoder sequence positions of the tokens (latents, or the patches of a grid)."""

    def encode(self, pixels: Any) -> tuple[Any, Any]:
        """``(ids (B, N), pre-quantisation embeddings (B, N, C))``."""

    def decode_ids(self, ids: Any, keep: Any = None) -> Any:
        """Images ``(B, 3, S, S)`` in [0, 1]."""

    def decode_vectors(self, vectors: Any, keep: Any = None) -> Any: ...

    def token_vectors(self, ids: Any) -> Any:
        """Code vectors ``(..., C)`` of ids, as the decoder reads them."""

    def codebook(self) -> Any:
        """``(K, C)``."""

    def latent_gradient(self, pixels: Any, token: int) -> Any:
        """``(S, S)`` magnitude of the gradient of token ``token``'s pre-quantisation embedding,
        projected on its code vector, with respect to the input pixels (summed over channels), an
        array where the model runs."""

