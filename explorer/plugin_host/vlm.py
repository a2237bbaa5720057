"""Vision-language models in the engine: generation traces, grounding, and pruning plugins.

A VLM *trace* is a :class:`Trace` whose layout is the LLM input sequence and whose ``extras`` hold
``prepared`` (the processor inputs) and ``generation`` (the answer with its per-token attention
rows over the image tokens, :class:`explorer.core.generation.Generation`). Grounding methods read
it; pruning plugins (:class:`VlmPruningMethod`) run the model again with their decision applied
inside the language model and report what changed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from explorer.core.generation import PrunePlan
from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Job, Progress, sub_job
from explorer.core.results import TokenSelection
from explorer.core.trace import CaptureSpec, Trace

from .api import Method, ParamError
from .protocols import VlmModel

__all__ = ["generate_trace_job", "capture_plan", "capture_bytes", "CAPTURE_BUDGET_BYTES", "VlmPruningParams", "VlmPruningMethod", "generation_of", "prepared_of"]


CAPTURE_BUDGET_BYTES = 1 << 30  # attention rows kept for one answer


def capture_bytes(n_layers: int, n_heads: int, n_image_tokens: int, n_tokens: int) -> int:
    """float32 bytes of the rows kept for an answer: layers x heads x tokens x image tokens."""
    return 4 * n_layers * n_heads * n_tokens * n_image_tokens


def capture_plan(backend: Any, n_image_tokens: int, max_new_tokens: int,
                 budget: int = CAPTURE_BUDGET_BYTES) -> tuple[list[int], str]:
    """The LLM layers whose attention is kept for an answer, and a note when not all fit the budget:
    evenly spaced layers, as many as ``budget`` allows (the estimate is shown before capturing)."""
    L, H = backend.info.n_layers, backend.info.n_heads
    full = capture_bytes(L, H, n_image_tokens, max_new_tokens)
    if full <= budget:
        return list(range(L)), ""
    fit = max(1, int(budget // capture_bytes(1, H, n_image_tokens, max_new_tokens)))
    layers = sorted({int(round(x)) for x in np.linspace(0, L - 1, fit)})
    note = (f"keeping the attention of {len(layers)} of {L} layers: all of them would take "
            f"{full / 2**30:.1f} GiB for {max_new_tokens} tokens (budget {budget / 2**30:.1f} GiB)")
    return layers, note


def generate_trace_job(backend: Any, image: LoadedImage, prompt: str, max_new_tokens: int = 32,
                       cancel: CancelToken | None = None, budget: int = CAPTURE_BUDGET_BYTES,
                       attention: bool = True) -> Job:
    """Job: prompt the VLM about ``image``; yields the streamed answer as progress messages;
    returns a VLM :class:`Trace`. The attention kept per token is estimated first; when keeping
    every layer would exceed ``budget``, evenly spaced layers are kept and the trace says so
    (``extras['capture_note']``). ``attention=False`` keeps none (the answer only: what pruning
    methods compare against)."""
    t0 = time.perf_counter()
    prepared = backend.prepare(image, prompt)
    layers, note = capture_plan(backend, len(prepared.image_positions), max_new_tokens, budget) if attention else ([], "")
    if note:
        yield Progress(0.0, note)
    generation = yield from sub_job(backend.generate_job(prepared, max_new_tokens=max_new_tokens,
                                                         attention_layers=layers, cancel=cancel), 0.0, 1.0)
    return Trace(layout=prepared.layout, model=backend.info, image_sha256=image.sha256, capture=CaptureSpec(),
                 extras={"prepared": prepared, "generation": generation, "prompt": prompt, "capture_note": note,
                         "attention_layers": layers},
                 seconds=time.perf_counter() - t0)


def generation_of(trace: Trace):
    gen = trace.extras.get("generation") if trace.extras else None
    if gen is None:
        raise ParamError("this method needs a VLM answer: ask the model a question first")
    return gen


def prepared_of(trace: Trace):
    prep = trace.extras.get("prepared") if trace.extras else None
    if prep is None:
        raise ParamError("this trace holds no VLM inputs")
    return prep


class VlmPruningParams(BaseModel):
    """Knobs every VLM pruning method has (methods set their own defaults or add fields)."""

    model_config = ConfigDict(extra="forbid")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="Fraction of the image tokens kept.")
    layer: int = Field(0, ge=0, description="LLM layer before which the image tokens are pruned (0 = the LLM input).")
    seed: int = Field(0, ge=0, description="Seed for methods with randomness.")
    max_new_tokens: int = Field(32, ge=1, le=512, description="Tokens generated with the pruned model.")


class VlmPruningMethod(Method):
    """Base class of VLM-side pruning plugins: implement :meth:`decide` (and optionally
    :meth:`prune_layer`, :meth:`needs_keys`).

    ``decide(state, params)`` gets a :class:`explorer.core.generation.PruneState` (arrays where the
    model runs) and returns a :class:`explorer.core.generation.PruneDecision` (indices of the image
    tokens to keep, or merge groups). ``run`` generates with the decision applied (tokens really leave the LLM's sequence)
    and returns a :class:`TokenSelection` over the image tokens whose ``meta`` reports: the
    answer with and without pruning, the log-likelihood of the unpruned answer under the pruned
    model (and under the unpruned one), prefill times (the pruned and the unpruned run timed the
    same way, without attention capture, the device synchronised) and their ratio, decoding speed,
    the image tokens entering each layer.
    """

    Params = VlmPruningParams

    def prune_layer(self, params: BaseModel, n_layers: int) -> int:
        if params.layer >= n_layers:
            raise ParamError(f"layer {params.layer}: the language model has {n_layers} layers")
        return int(params.layer)

    def needs_keys(self, params: BaseModel) -> bool:
        return False

    def plan(self, backend: Any, params: BaseModel, decide) -> PrunePlan:
        """How the decision runs inside the generation: by default once, before
        :meth:`prune_layer`. Multi-stage methods return their own
        :class:`~explorer.core.generation.PrunePlan` (several layers, an encoder stage, the
        decode-time cache policy) with ``decide`` as its decision function."""
        return PrunePlan(layers=[self.prune_layer(params, backend.info.n_layers)], decide=decide,
                         needs_keys=self.needs_keys(params))

    def extras(self, backend: Any, prepared: Any, params: BaseModel) -> dict:
        """Anything the decision needs that the LLM state lacks (e.g. HiRED's vision-tower [CLS]
        attention), computed once before the pruned generation; handed over as ``state.extras``."""
        return {}

    def decide(self, state, params: BaseModel):
        raise NotImplementedError

    def keep_count(self, params: BaseModel, n: int) -> int:
        return max(1, min(n, int(round(params.keep * n))))

    def run(self, trace, params, *, target, cancel, backend=None):
        if not isinstance(backend, VlmModel):
            raise ParamError("VLM pruning needs the loaded vision-language model")
        prepared = prepared_of(trace)
        full = generation_of(trace)
        extras = self.extras(backend, prepared, params)

        def decide(state):
            state.extras.update(extras)
            return self.decide(state, params)

        plan = self.plan(backend, params, decide)
        layer = int(plan.layers[0])
        yield Progress(0.05, "pruned generation")
        # a pruned generation keeps no attention: nothing of it is drawn
        pruned = yield from sub_job(backend.generate_job(prepared, max_new_tokens=params.max_new_tokens, prune=plan,
                                                         attention_layers=(), cancel=cancel), 0.05, 0.6)
        cancel.raise_if_cancelled()
        yield Progress(0.6, "likelihood of the full answer")
        if full.ids:
            forced = yield from sub_job(backend.generate_job(prepared, prune=plan, force=full.ids, attention_layers=(),
                                                             cancel=cancel), 0.6, 0.8)
            unpruned = yield from sub_job(backend.generate_job(prepared, force=full.ids, attention_layers=(),
                                                               cancel=cancel), 0.8, 1.0)
            ll_pruned, ll_full = forced.logprob, unpruned.logprob
        else:
            ll_pruned = ll_full = 0.0
        n = len(prepared.image_positions)
        L = backend.info.n_layers
        kept_numbers = pruned.kept[L - 1]  # the prepared image tokens still present at the last layer
        kept = np.zeros(n, dtype=bool)
        kept[kept_numbers] = True
        groups = pruned.groups
        if groups is not None:
            kept = groups >= 0
        tokens_per_layer = (list(pruned.tokens_per_layer) if pruned.tokens_per_layer is not None
                            else [len(pruned.kept[l]) for l in range(L)])
        final_tokens = int(tokens_per_layer[-1])
        meta = {
            "layer": layer,
            "answer": pruned.text,
            "answer_full": full.text,
            "same_answer": pruned.text == full.text,
            "logprob_full_answer": ll_full,
            "logprob_full_answer_pruned": ll_pruned,
            "prefill_seconds": pruned.prefill_seconds,
            "prefill_seconds_full": unpruned.prefill_seconds if full.ids else full.prefill_seconds,
            "prefill_ratio": pruned.prefill_seconds / max(unpruned.prefill_seconds if full.ids else full.prefill_seconds,
                                                          1e-12),
            "decode_seconds": pruned.decode_seconds,
            "tokens_per_second": pruned.tokens_per_second,
            "tokens_per_second_full": full.tokens_per_second,
            "device": pruned.device,
            "image_tokens_per_layer": tokens_per_layer,
            "image_tokens_kept": final_tokens,
            "image_tokens": int(n),
            "image_tokens_layer_mean": float(np.mean(tokens_per_layer)),
            "image_tokens_entering_llm": int(pruned.vision_tokens if pruned.vision_tokens is not None else n),
            "kv_cache_per_layer": list(pruned.cache_lengths or []),
            "prompt_tokens": int(pruned.prompt_length),
            "pruning_layers": [int(k) for k in plan.layers],
        }
        where = (f"LLM layer {layer}" if len(plan.layers) == 1 and plan.encoder is None
                 else "LLM layers " + ",".join(str(k) for k in plan.layers) + (" and the vision tower" if plan.encoder else ""))
        return TokenSelection(layout=trace.layout, kept=kept, groups=groups, layer=layer, meta=meta,
                              label=f"{final_tokens}/{n} image tokens from {where}: {pruned.text!r}")
