"""The session model: the one home of what the window shows, free of Qt (and of torch).

Views render it and send intents; controllers turn intents into jobs and the jobs' results into
changes of this model; nothing else holds state. It is evented with psygnal (napari's signal
library: Qt-like signals without Qt, so the model is tested without a display and shared with
the command line), and every change goes through one of its methods, which keeps the pieces
consistent with one another:

* models are *transactions*: :meth:`begin_load` keeps the working model until
  :meth:`load_succeeded` replaces it; :meth:`load_failed` leaves it in place and says why once;
* the canvas shows a :class:`View`: one result with what produced it, or a note saying why there
  is none; a new image, method, parameter, prompt or query clears it (``busy``) so that a map never
  stays under another method's title; results for inputs that are no longer current are refused;
* the query token belongs to the image; regions, SAM prompts and comparisons too (a new image
  starts them over); a VLM answer names the image it is about;
* a comparison has an id: results of an earlier comparison never reach the current one.

Events (``model.events.<name>``): ``image``, ``model(kind)``, ``method``, ``params(method_id)``,
``prompts``, ``query``, ``display``, ``view``, ``message``, ``regions``, ``sam_prompt``, ``vlm``,
``vlm_tokens``, ``comparison``, ``comparison_item(method_id)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from psygnal import Signal, SignalGroup

from .generation import Generation
from .image_io import LoadedImage
from .regions import RegionSet
from .trace import ModelInfo, Trace

__all__ = ["SessionModel", "SessionEvents", "ModelSlot", "View", "Message", "VlmAnswer", "SamPrompt", "Comparison",
           "SweepResults", "TokenizedImage", "MODEL_KINDS", "COMPARE_MODES"]

MODEL_KINDS = ("clip", "sam", "vlm", "tokenizer")
COMPARE_MODES = ("maps", "reduction", "vlm", "tokenizers")


class SessionEvents(SignalGroup):
    image = Signal(object)  # LoadedImage | None
    model = Signal(str)  # kind whose slot changed
    method = Signal(object)  # method id | None
    params = Signal(str)  # method id
    prompts = Signal(tuple)
    query = Signal(object)  # sequence index | None
    display = Signal()  # colormap, opacity, overlay
    view = Signal(object)  # View
    message = Signal(object)  # Message | None
    regions = Signal()  # the region set or the selected region changed
    sam_prompt = Signal()  # points, box, candidates
    vlm = Signal(object)  # VlmAnswer | None
    vlm_tokens = Signal(tuple)
    comparison = Signal(object)  # Comparison | None: a new comparison (or none)
    comparison_item = Signal(str)  # a method of the current comparison got its result, metrics or error
    sweep = Signal(object)  # SweepResults | None
    tokens = Signal(object)  # TokenizedImage | None: the current image's tokens (or none)
    token_selection = Signal(tuple)  # the tokenizer tokens picked in the strip


@dataclass
class TokenizedImage:
    """The current image through a tokenizer: ``spec``, the image's hash, the trace (ids,
    reconstruction, encoder attention in its extras), the tokens picked, the prefix length shown
    (0: all) and the last region ranking (:class:`~explorer.core.results.TokenScores` or None)."""

    spec: str
    image_sha256: str
    trace: Any
    selected: tuple[int, ...] = ()
    k: int = 0
    scores: Any = None

    @property
    def ids(self):
        return self.trace.extras["ids"]


@dataclass
class SweepResults:
    """Sweep results opened for browsing: the folder, its SPEC (as saved there), the rows (a
    table object with ``len()``; a pandas DataFrame from :mod:`explorer.sweep.results`) and the
    row picked last (its position in ``rows``)."""

    folder: str
    spec: dict
    rows: Any
    picked: int | None = None


@dataclass(frozen=True)
class Message:
    """One line for the message bar: ``kind`` is error, warning or info."""

    text: str
    kind: str = "info"


@dataclass
class ModelSlot:
    """The model of one kind: the working one, a load in flight, the last failure."""

    kind: str
    spec: str | None = None  # the working model's spec (what jobs use)
    info: ModelInfo | None = None
    loading: str | None = None  # a spec being loaded; the working model stays until it succeeds
    error: str | None = None  # why the last load failed
    wanted: str | None = None  # the spec asked for first (loaded on demand)

    @property
    def ready(self) -> bool:
        return self.spec is not None and self.info is not None


@dataclass(frozen=True)
class View:
    """What the map canvas shows: ``result`` with what produced it, or a ``note`` saying why there
    is none (drawn on the canvas instead of a stale map). ``busy``: a result for the current
    inputs is being computed."""

    result: Any = None
    method_id: str | None = None
    image_sha256: str | None = None
    note: str = ""
    busy: bool = False
    model_spec: str | None = None  # the model that computed ``result``

    def current(self, method_id: str | None, image_sha256: str | None, model_spec: str | None) -> bool:
        """True when ``result`` was computed for these inputs (a model not loaded yet counts as
        the same: a view reopened from a session stays until its model is back)."""
        return (self.result is not None and not self.busy and self.method_id == method_id
                and self.image_sha256 == image_sha256 and (model_spec is None or self.model_spec in (None, model_spec)))

    @property
    def label(self) -> str:
        return getattr(self.result, "label", "") if self.result is not None else self.note


@dataclass
class VlmAnswer:
    """A VLM's answer about an image: the spec and prompt, the trace (layout and generation) and
    the generated tokens selected for a word map."""

    spec: str
    prompt: str
    trace: Trace
    max_new_tokens: int = 32
    tokens: tuple[int, ...] = ()

    @property
    def generation(self) -> Generation:
        return self.trace.extras["generation"]

    @property
    def image_sha256(self) -> str:
        return self.trace.image_sha256


@dataclass
class SamPrompt:
    """The SAM prompt being built on the current image, and its candidate masks."""

    points: list[tuple[float, float, int]] = field(default_factory=list)
    box: list[float] | None = None
    candidates: list = field(default_factory=list)  # RegionMask
    candidate: int = 0


@dataclass
class Comparison:
    """Methods side by side on one image. ``results[mid]`` is a Result, ``metrics[mid]`` named
    numbers (times, reduction metrics, faithfulness), ``errors[mid]`` one line."""

    id: int
    mode: str
    method_ids: list[str]
    image_sha256: str
    keep: float | None = None
    layer: int | None = None
    results: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    agreement: tuple | None = None  # (values (M, M), kinds (M, M))
    sweep: tuple | None = None  # (keeps, {method_id: [metrics or None per keep]})

    @property
    def done(self) -> bool:
        return all(m in self.results or m in self.errors for m in self.method_ids)


class SessionModel:
    """See the module docstring. ``model_spec`` is the CLIP model to use first (``'demo'``)."""

    def __init__(self, model_spec: str = "demo", vlm_spec: str = "vlm:demo", sam_spec: str = "sam:demo") -> None:
        self.events = SessionEvents()
        self.image: LoadedImage | None = None
        self.image_path: str | None = None
        self.models: dict[str, ModelSlot] = {k: ModelSlot(k) for k in MODEL_KINDS}
        self.models["clip"].wanted = model_spec
        self.models["vlm"].wanted = vlm_spec
        self.models["sam"].wanted = sam_spec
        self.models["tokenizer"].wanted = "tok:demo"
        self.method_id: str | None = None
        self.params: dict[str, Any] = {}  # per method, so that switching back keeps them
        self.prompts: tuple[str, ...] = ()
        self.query: int | None = None
        self.colormap = "viridis"
        self.opacity = 0.6
        self.overlay = True
        self.view = View()
        self.message: Message | None = None
        self.regions: RegionSet | None = None
        self.region_id: int | None = None
        self.sam_prompt = SamPrompt()
        self.segmenting = False
        self.vlm: VlmAnswer | None = None
        self.comparison: Comparison | None = None
        self.sweep: SweepResults | None = None  # sweep results opened for browsing
        self.tokens: TokenizedImage | None = None  # the current image through a tokenizer
        self.compare_mode = "maps"
        self.compare_checked: dict[str, list[str]] = {
            "maps": ["attention.rollout", "similarity.maskclip", "attention.raw"],
            "reduction": ["pruning.topk", "pruning.evit", "merging.tome", "pruning.divprune", "pruning.random",
                          "merging.pool"],
            "vlm": ["vlm.fastv", "vlm.dart", "vlm.divprune", "vlm.random", "vlm.pool", "vlm.sparsevlm", "vlm.mustdrop"],
            "tokenizers": []}
        self.compare_keep = 0.5  # keep ratio of the reduction comparisons
        self.compare_layer: int | None = None  # their reduction block; None: the model's default
        self._ids = itertools.count(1)

    @property
    def model_spec(self) -> str | None:
        """The CLIP model in use, else the one asked for first."""
        slot = self.models["clip"]
        return slot.spec or slot.loading or slot.wanted

    # -- messages ---------------------------------------------------------------------------------
    def post(self, text: str, kind: str = "info") -> None:
        """Show one line in the message bar (replacing the previous one)."""
        self.message = Message(text, kind)
        self.events.message.emit(self.message)

    def clear_message(self, kinds: tuple[str, ...] | None = None) -> None:
        """Hide the message bar (only when its message is of one of ``kinds``, if given)."""
        if self.message is None or (kinds is not None and self.message.kind not in kinds):
            return
        self.message = None
        self.events.message.emit(None)

    # -- models (transactions) --------------------------------------------------------------------
    def slot(self, kind: str) -> ModelSlot:
        if kind not in self.models:
            raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
        return self.models[kind]

    def begin_load(self, kind: str, spec: str) -> None:
        """A load of ``spec`` started; the working model (if any) stays in use meanwhile."""
        slot = self.slot(kind)
        slot.loading, slot.error = spec, None
        self.events.model.emit(kind)

    def load_succeeded(self, kind: str, spec: str, info: ModelInfo) -> None:
        slot = self.slot(kind)
        if slot.loading not in (None, spec):
            return  # a newer load superseded this one
        slot.spec, slot.info, slot.loading, slot.error, slot.wanted = spec, info, None, None, spec
        self.events.model.emit(kind)

    def load_failed(self, kind: str, spec: str, error: str) -> None:
        """The load of ``spec`` failed: the working model stays; the error is said once."""
        slot = self.slot(kind)
        if slot.loading not in (None, spec):
            return
        slot.loading, slot.error = None, error
        kept = f" ({slot.info.name} stays in use)" if slot.ready else ""
        self.post(f"Model not loaded: {error}{kept}", "error")
        self.events.model.emit(kind)

    # -- image ------------------------------------------------------------------------------------
    def set_image(self, image: LoadedImage, path: str | None = None) -> None:
        """A new image: its query, regions, SAM prompt and comparison start over; the canvas waits
        for the new result."""
        self.image, self.image_path = image, path
        self.query = None
        self.regions = RegionSet(image.size)
        self.region_id = None
        self.sam_prompt = SamPrompt()
        self.comparison = None
        self.view = View(method_id=self.method_id, image_sha256=image.sha256, busy=True)
        if image.warnings:
            self.post("; ".join(image.warnings), "warning")
        else:
            self.clear_message()
        self.events.image.emit(image)
        self.events.query.emit(None)
        self.events.regions.emit()
        self.events.sam_prompt.emit()
        self.events.comparison.emit(None)
        self.events.view.emit(self.view)

    # -- method, parameters, target -----------------------------------------------------------------
    def set_method(self, method_id: str, params: Any) -> None:
        """Switch the method; ``params`` are its remembered (or default) parameters. A note
        about the previous method (an info message) no longer applies and is hidden."""
        self.method_id = method_id
        self.params[method_id] = params
        self.clear_message(kinds=("info",))
        self.events.method.emit(method_id)
        self._invalidate()

    def set_params(self, method_id: str, params: Any) -> None:
        if self.params.get(method_id) == params:
            return
        self.params[method_id] = params
        self.events.params.emit(method_id)
        if method_id == self.method_id:
            self._invalidate()

    @property
    def current_params(self) -> Any:
        return self.params.get(self.method_id) if self.method_id else None

    def set_prompts(self, prompts: tuple[str, ...]) -> None:
        prompts = tuple(p.strip() for p in prompts if p.strip())
        if prompts == self.prompts:
            return
        self.prompts = prompts
        self.events.prompts.emit(prompts)
        self._invalidate()

    def set_query(self, query: int | None) -> None:
        if query == self.query:
            return
        self.query = query
        self.events.query.emit(query)
        self._invalidate()

    def set_display(self, colormap: str | None = None, opacity: float | None = None, overlay: bool | None = None) -> None:
        if colormap is not None:
            self.colormap = colormap
        if opacity is not None:
            self.opacity = float(opacity)
        if overlay is not None:
            self.overlay = bool(overlay)
        self.events.display.emit()

    # -- the canvas --------------------------------------------------------------------------------
    def _invalidate(self) -> None:
        """The inputs of the canvas changed: the shown result no longer describes them."""
        if self.image is None:
            return
        self.view = View(method_id=self.method_id, image_sha256=self.image.sha256, busy=True)
        self.events.view.emit(self.view)

    def show_result(self, result: Any, method_id: str, image_sha256: str, model_spec: str | None = None) -> bool:
        """Show ``result`` if it was computed for the current method and image (else refuse it)."""
        if self.image is None or method_id != self.method_id or image_sha256 != self.image.sha256:
            return False
        self.view = View(result=result, method_id=method_id, image_sha256=image_sha256, model_spec=model_spec)
        self.events.view.emit(self.view)
        return True

    def show_note(self, note: str, method_id: str | None = None) -> None:
        """No result can be shown for the current inputs: the canvas says why (and shows no map)."""
        self.view = View(method_id=method_id or self.method_id,
                         image_sha256=self.image.sha256 if self.image is not None else None, note=note)
        self.events.view.emit(self.view)

    # -- regions and SAM ----------------------------------------------------------------------------
    def set_segmenting(self, on: bool) -> None:
        self.segmenting = bool(on)
        self.events.sam_prompt.emit()

    def add_point(self, x: float, y: float, positive: bool) -> None:
        self.sam_prompt.points.append((float(x), float(y), 1 if positive else 0))
        self.events.sam_prompt.emit()

    def set_box_prompt(self, box: list[float] | None) -> None:
        self.sam_prompt.box = None if box is None else [float(v) for v in box]
        self.events.sam_prompt.emit()

    def set_candidates(self, masks: list, chosen: int = 0) -> None:
        self.sam_prompt.candidates = list(masks)
        self.sam_prompt.candidate = chosen if masks else 0
        self.events.sam_prompt.emit()

    def choose_candidate(self, i: int) -> None:
        if 0 <= i < len(self.sam_prompt.candidates):
            self.sam_prompt.candidate = i
            self.events.sam_prompt.emit()

    def clear_sam_prompt(self) -> None:
        self.sam_prompt = SamPrompt()
        self.events.sam_prompt.emit()

    def add_region_from_candidate(self, name: str | None = None):
        """The chosen candidate becomes a region (selected); the prompt starts over."""
        if not self.sam_prompt.candidates or self.regions is None:
            return None
        m = self.sam_prompt.candidates[self.sam_prompt.candidate]
        region = self.regions.add(m.mask, name, score=m.score,
                                  prompt={"points": [list(p) for p in self.sam_prompt.points], "box": self.sam_prompt.box})
        self.sam_prompt = SamPrompt()
        self.region_id = region.id
        self.events.sam_prompt.emit()
        self.events.regions.emit()
        return region

    def edit_regions(self, op: str, *args: Any, **kw: Any):
        """Apply a :class:`RegionSet` operation (``add``, ``rename``, ``set_visible``, ``update``,
        ``remove``, ``union``, ``subtract``); a new region becomes the selected one."""
        if self.regions is None:
            raise ValueError("open an image first")
        out = getattr(self.regions, op)(*args, **kw)
        if op in ("add", "union", "subtract"):
            self.region_id = out.id
        if op == "remove" and self.region_id == args[0]:
            self.region_id = None
        self.events.regions.emit()
        return out

    def select_region(self, region_id: int | None) -> None:
        self.region_id = region_id
        self.events.regions.emit()

    @property
    def selected_region(self):
        if self.regions is None or self.region_id is None:
            return None
        try:
            return self.regions.get(self.region_id)
        except KeyError:
            return None

    # -- VLM ----------------------------------------------------------------------------------------
    def set_vlm_answer(self, answer: VlmAnswer | None) -> None:
        self.vlm = answer
        self.events.vlm.emit(answer)
        if answer is not None and answer.tokens:
            self.events.vlm_tokens.emit(answer.tokens)

    def select_vlm_tokens(self, tokens: tuple[int, ...]) -> None:
        if self.vlm is None:
            return
        self.vlm = replace(self.vlm, tokens=tuple(tokens))
        self.events.vlm_tokens.emit(self.vlm.tokens)
        if self.method_id is not None and self.method_id.startswith("vlm."):
            self._invalidate()

    def vlm_for_image(self) -> VlmAnswer | None:
        """The VLM answer if it is about the current image."""
        if self.vlm is None or self.image is None or self.vlm.image_sha256 != self.image.sha256:
            return None
        return self.vlm

    # -- tokenizer ----------------------------------------------------------------------------------------
    def set_tokens(self, tokens: TokenizedImage | None) -> None:
        self.tokens = tokens
        self.events.tokens.emit(tokens)

    def tokens_for_image(self) -> TokenizedImage | None:
        """The tokenization of the current image, if there is one."""
        t = self.tokens
        if t is None or self.image is None or t.image_sha256 != self.image.sha256:
            return None
        return t

    def select_tokens(self, tokens: tuple[int, ...]) -> None:
        """Tokens picked in the tokenizer's strip; a tokenizer map on the canvas follows them."""
        if self.tokens is None:
            return
        self.tokens = replace(self.tokens, selected=tuple(tokens))
        self.events.token_selection.emit(self.tokens.selected)
        if self.method_id is not None and self.method_id.startswith("tok."):
            self._invalidate()

    def set_prefix(self, k: int) -> None:
        if self.tokens is None:
            return
        self.tokens = replace(self.tokens, k=int(k))
        if self.method_id == "tok.prefix":
            self.params[self.method_id] = self.params[self.method_id].model_copy(update={"k": int(k)})
            self.events.params.emit(self.method_id)
            self._invalidate()

    def set_token_scores(self, scores) -> None:
        if self.tokens is not None:
            self.tokens = replace(self.tokens, scores=scores)
            self.events.tokens.emit(self.tokens)

    # -- sweep results ---------------------------------------------------------------------------------
    def set_sweep(self, results: SweepResults | None) -> None:
        self.sweep = results
        self.events.sweep.emit(results)

    def pick_sweep_row(self, position: int) -> None:
        """The row to look at (the controller opens its image, method and setting)."""
        if self.sweep is not None:
            self.sweep.picked = int(position)

    # -- comparisons ----------------------------------------------------------------------------------
    def set_compare_mode(self, mode: str) -> None:
        if mode not in COMPARE_MODES:
            raise ValueError(f"unknown compare mode {mode!r}")
        self.compare_mode = mode
        self.comparison = None
        self.events.comparison.emit(None)

    def set_compare_settings(self, keep: float | None = None, layer: int | None = None) -> None:
        """The reduction comparisons' keep ratio and block, as the user set them (no event: the
        next comparison reads them)."""
        if keep is not None:
            self.compare_keep = float(keep)
        if layer is not None:
            self.compare_layer = int(layer)

    def start_comparison(self, mode: str, method_ids: list[str], keep: float | None = None,
                         layer: int | None = None) -> Comparison:
        """A new comparison replaces the previous one (whose late results are then refused)."""
        if self.image is None:
            raise ValueError("open an image first")
        self.compare_mode = mode
        self.compare_checked[mode] = list(method_ids)
        self.comparison = Comparison(id=next(self._ids), mode=mode, method_ids=list(method_ids),
                                     image_sha256=self.image.sha256, keep=keep, layer=layer)
        self.events.comparison.emit(self.comparison)
        return self.comparison

    def _current(self, comparison_id: int, method_id: str | None = None) -> Comparison | None:
        """The comparison with this id (and this method among its methods), or None when stale."""
        c = self.comparison
        if c is None or c.id != comparison_id or (method_id is not None and method_id not in c.method_ids):
            return None
        return c

    def comparison_result(self, comparison_id: int, method_id: str, result: Any, metrics: dict | None = None) -> bool:
        c = self._current(comparison_id, method_id)
        if c is None:
            return False
        c.results[method_id] = result
        c.errors.pop(method_id, None)
        if metrics:
            c.metrics.setdefault(method_id, {}).update(metrics)
        self.events.comparison_item.emit(method_id)
        return True

    def comparison_metrics(self, comparison_id: int, method_id: str, metrics: dict) -> bool:
        c = self._current(comparison_id, method_id)
        if c is None:
            return False
        c.metrics.setdefault(method_id, {}).update(metrics)
        self.events.comparison_item.emit(method_id)
        return True

    def comparison_error(self, comparison_id: int, method_id: str, error: str) -> bool:
        c = self._current(comparison_id, method_id)
        if c is None:
            return False
        c.errors[method_id] = error
        self.events.comparison_item.emit(method_id)
        return True

    def comparison_agreement(self, comparison_id: int, values, kinds) -> bool:
        c = self._current(comparison_id)
        if c is None:
            return False
        c.agreement = (values, kinds)
        self.events.comparison_item.emit("")
        return True

    def comparison_sweep(self, comparison_id: int, keeps, results: dict) -> bool:
        c = self._current(comparison_id)
        if c is None:
            return False
        c.sweep = (tuple(keeps), dict(results))
        self.events.comparison_item.emit("")
        return True
