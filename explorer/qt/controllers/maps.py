"""The maps controller: the CLIP model, the image, the current method and its target, and the
canvas, legend, status and query marker that show its result.

Intents (method panel, canvas clicks, menus) become changes of the session model; a change of
the canvas's inputs schedules one run (debounced): a trace on the device thread (cached, so that
switching method, layer, head or query reruns nothing but the method) and the method on the CPU
pool or the device thread. The result goes to the model, which refuses it if the inputs moved on
meanwhile; the canvas renders the model's :class:`~explorer.core.session.View` and nothing else,
so the map, colourbar, status and marker always describe one result, and a method that cannot run
says why on the canvas instead of leaving the previous map.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QFileDialog, QInputDialog

from explorer.core.image_io import LoadedImage, image_filter_patterns, load_image
from explorer.core.metrics import box_mask, region_stats
from explorer.core.results import CodebookUsage, Heatmap, LabelMap, Reconstruction, TokenSelection
from explorer.core.session import View
from explorer.core.target import Target

from ..analysis import region_text
from .base import Controller, short_error

__all__ = ["MapsController", "looks_synthetic", "DEMO_IMAGE_NOTE"]

DEMO_IMAGE_NOTE = ("The demo models were trained on synthetic shapes; on this image their maps, labels and "
                   "captions mean little. Load a real model (Model ▸ Load model…) for photographs.")


def looks_synthetic(image: LoadedImage) -> bool:
    """True for images like the demo models' training scenes (a few flat colours), False for
    photographs (thousands of distinct colours on a subsample)."""
    import numpy as np

    rgb = image.rgb[:: max(1, image.rgb.shape[0] // 128), :: max(1, image.rgb.shape[1] // 128)]
    flat = rgb.reshape(-1, 3).astype(np.int64)
    colours = np.unique(flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2]).size
    return colours <= 256


class MapsController(Controller):
    """See the module docstring."""

    def __init__(self, window) -> None:
        super().__init__(window)
        w = window
        self.trace = None  # the last CLIP trace (for query clicks and region shares)
        self.drawn: View | None = None
        self._demo_warned: set[str] = set()
        self._unknown_warned: tuple = ()
        self._rerun = QTimer(w)
        self._rerun.setSingleShot(True)
        self._rerun.setInterval(120)
        self._rerun.timeout.connect(self.run_current)
        panel = w.panel
        panel.method_changed.connect(self.set_method)
        panel.form.changed.connect(lambda p: self.model.set_params(self.model.method_id, p) if self.model.method_id else None)
        panel.prompts_changed.connect(self.model.set_prompts)
        panel.reset_query.connect(lambda: self.model.set_query(None))
        panel.colormap_changed.connect(lambda name: self.model.set_display(colormap=name))
        panel.opacity_changed.connect(lambda v: self.model.set_display(opacity=v))
        panel.overlay_toggled.connect(lambda on: self.model.set_display(overlay=on))
        w.canvas.clicked.connect(self._on_canvas_click)
        w.legend.class_clicked.connect(self._on_legend_click)
        ev = self.model.events
        ev.image.connect(self._on_image)
        ev.model.connect(self._on_model)
        ev.method.connect(self._on_method)
        ev.params.connect(self._on_params)
        ev.prompts.connect(self._on_prompts)
        ev.query.connect(lambda _: self._show_query())
        ev.display.connect(self._on_display)
        ev.view.connect(self._render)
        ev.vlm.connect(lambda _: self.schedule_run() if self.is_vlm_method() else None)
        ev.vlm_tokens.connect(lambda _: self.schedule_run() if self.is_vlm_method() else None)

    # -- model ----------------------------------------------------------------------------------
    def load_model_dialog(self) -> None:
        slot = self.model.slot("clip")
        text, ok = QInputDialog.getText(
            self.window, "Load model",
            "Model spec: ViT-B-16@openai, ViT-B-16@/path/ckpt.pt, hf-hub:org/repo, local-dir:/path, or demo",
            text=slot.spec or slot.wanted or "demo")
        if ok and text.strip():
            self.load_model(text.strip())

    def load_model(self, spec: str) -> None:
        """Load a CLIP model (a transaction: the working one stays until this one works)."""
        self.load("clip", spec, then=self._loaded)

    def _loaded(self, backend: Any) -> None:
        if self.window.settings is not None:
            self.window.settings.setValue("model", self.model.slot("clip").spec)
        self.window.model_loaded.emit(backend.info)

    def _on_model(self, kind: str) -> None:
        if kind != "clip":
            return
        w, slot = self.window, self.model.slot("clip")
        if slot.loading:
            w.model_label.setText(f"loading {slot.loading}…" + (f" ({slot.info.name} in use)" if slot.ready else ""))
        elif slot.ready:
            info = slot.info
            note = "  [demo model: trained on synthetic shapes]" if info.demo and "synthetic shapes" not in info.name else ""
            w.model_label.setText(info.name + note)
            backend = self.backend("clip")
            w.device_label.setText(f"device: {backend.device_text(memory=False) if backend is not None else info.device}")
            w.panel.form.set_model_limits(info.n_layers, info.n_heads)
            self._check_demo_image()
        else:
            w.model_label.setText("no model" + (f" (last load failed)" if slot.error else ""))
        self.schedule_run()

    def ensure_model(self) -> None:
        """Load the configured CLIP model if none works and none is loading."""
        slot = self.model.slot("clip")
        if not slot.ready and slot.loading is None and slot.error is None and slot.wanted:
            self.load_model(slot.wanted)

    # -- image ----------------------------------------------------------------------------------
    def open_image_dialog(self) -> None:
        pattern = " ".join(image_filter_patterns())
        start = str(Path(self.model.image_path or Path.home()).parent)
        path, _ = QFileDialog.getOpenFileName(self.window, "Open image", start, f"Images ({pattern});;All files (*)")
        if path:
            self.open_image(path)

    def open_image(self, path: str) -> None:
        """Read an image off the GUI thread; a bad file shows a message and changes nothing."""
        self.runner.submit("image", lambda cancel: load_image(path), device=False, description="reading image",
                           on_done=lambda img: self.set_image(img, path),
                           on_error=self._image_failed)

    def _image_failed(self, exc: BaseException) -> None:
        self.model.post(short_error(exc), "error")
        self.window.browser.select(self.model.image_path)  # the highlight stays on the file shown

    def set_image(self, image: LoadedImage, path: str | None) -> None:
        self.model.set_image(image, path)

    def _on_image(self, image: LoadedImage | None) -> None:
        w = self.window
        self.trace = None
        self.drawn = None
        if image is None:
            w.canvas.clear_image()
            return
        w.canvas.set_image(image.rgb)
        w.canvas.set_note("")
        title = Path(self.model.image_path).name if self.model.image_path else "image"
        w.setWindowTitle(f"{title} ({image.size[1]}x{image.size[0]}) — Token Explorer")
        w.browser.select(self.model.image_path)
        self._check_demo_image()
        self.ensure_model()
        self.schedule_run()

    def _check_demo_image(self) -> None:
        """Say once per image when a demo model meets an image unlike its training scenes."""
        image, slot = self.model.image, self.model.slot("clip")
        if image is None or not slot.ready or not slot.info.demo or image.sha256 in self._demo_warned:
            return
        if not looks_synthetic(image):
            self._demo_warned.add(image.sha256)
            self.model.post(DEMO_IMAGE_NOTE, "warning")

    # -- method, parameters, target --------------------------------------------------------------
    def set_method(self, method_id: str) -> None:
        host = self.engine.host
        try:
            host.method(method_id)
            params = self.model.params.get(method_id)
            if params is None:
                from explorer.plugin_host.defaults import default_params

                params = default_params(host, method_id, self.model.slot("clip").info)
        except (ValueError, RuntimeError) as exc:
            self.model.post(short_error(exc), "error")
            return
        self.model.set_method(method_id, params)

    def set_params(self, **values: Any) -> None:
        """Set parameters of the current method (as editing the form does)."""
        mid = self.model.method_id
        current = self.model.params[mid].model_dump()
        current.update(values)
        self.model.set_params(mid, self.engine.host.make_params(mid, current))

    def _on_method(self, method_id: str | None) -> None:
        w = self.window
        if method_id is None:
            return
        host = self.engine.host
        info = host.method(method_id)
        slot = self.model.slot(self.method_kind())
        n_layers = slot.info.n_layers if slot.ready else None
        n_heads = slot.info.n_heads if slot.ready else None
        w.panel.form.set_model(host.params_model(method_id), self.model.params[method_id], n_layers, n_heads)
        w.panel.form.set_prompts(self.model.prompts)
        w.panel.describe(info)
        if w.panel.current_method() != method_id:
            w.panel.blockSignals(True)
            w.panel.select_method(method_id)
            w.panel.blockSignals(False)
        self._show_query()
        self.schedule_run()

    def _on_params(self, method_id: str) -> None:
        if method_id == self.model.method_id:
            form = self.window.panel.form
            if form.values() != self.model.params[method_id]:
                form.set_values(self.model.params[method_id])
            self.schedule_run()

    def _on_prompts(self, prompts: tuple[str, ...]) -> None:
        panel = self.window.panel
        if panel.prompts() != prompts:
            panel.prompt_edit.setText("; ".join(prompts))
        panel.form.set_prompts(prompts)
        self.schedule_run()

    def set_query(self, query: int | None) -> None:
        self.model.set_query(query)

    def _uses_query(self) -> bool:
        mid = self.model.method_id
        return bool(mid) and self.engine.host.method(mid).requires("query")

    def _show_query(self) -> None:
        """The query label and marker: only for methods that read a query token."""
        w, q = self.window, self.model.query
        if not self._uses_query():
            w.panel.set_query_text("Query: not used by this method")
            w.canvas.mark(None)
            return
        if q is None:
            w.panel.set_query_text("Query: [CLS] token (click a patch)")
            w.canvas.mark(None)
            return
        w.panel.set_query_text(f"Query: token {q}")
        layout = self.trace.layout if self.trace is not None else None
        if layout is not None and layout.locate(q) is not None:
            w.canvas.mark(layout.token_box(q)[1])
        else:
            w.canvas.mark(None)

    def _on_canvas_click(self, x: float, y: float) -> None:
        if self.model.segmenting or self.trace is None or not self._uses_query():
            return
        token = self.trace.layout.token_at(x, y)
        if token is None:
            self.model.post("That pixel was cropped away by the model's preprocessing: no token covers it.", "info")
            return
        self.model.set_query(token)

    def step(self, role: str, delta: int) -> None:
        """``[`` ``]`` ``,`` ``.``: move the layer or head, clamped, saying so at the ends."""
        why = self.window.panel.form.step(role, delta)
        if why:
            self.window.status_text.setText(why)

    def _on_display(self) -> None:
        w, m = self.window, self.model
        w.canvas.set_colormap(m.colormap)
        w.canvas.set_opacity(m.opacity)
        w.canvas.set_overlay_visible(m.overlay)
        w.compare.set_colormap(m.colormap)
        w.compare.set_opacity(m.opacity)
        if w.panel.show_overlay.isChecked() != m.overlay:
            w.panel.show_overlay.setChecked(m.overlay)

    # -- running --------------------------------------------------------------------------------
    def target(self) -> Target:
        return Target(prompts=self.model.prompts, query=self.model.query if self._uses_query() else None)

    def schedule_run(self) -> None:
        self._rerun.start()

    def method_kind(self) -> str:
        """The model kind the current method runs on: clip, vlm or tokenizer."""
        mid = self.model.method_id
        if not mid:
            return "clip"
        backends = self.engine.host.method(mid).contribution.backends
        if "clip" in backends:
            return "clip"
        return "tokenizer" if "tokenizer" in backends else "vlm"

    def is_vlm_method(self) -> bool:
        return self.method_kind() == "vlm"

    def run_current(self) -> None:
        """Compute the current method's result, or say on the canvas why it cannot run."""
        m = self.model
        if m.image is None or m.method_id is None:
            return
        method_id, image = m.method_id, m.image
        info = self.engine.host.method(method_id)
        if self.is_vlm_method():
            self.window.vlm_controller.run_method()
            return
        if self.method_kind() == "tokenizer":
            self.window.tokenizer_controller.run_method()
            return
        slot = m.slot("clip")
        if m.view.current(method_id, image.sha256, slot.spec):
            return  # the canvas already shows this (a result reopened from a session, a model reloaded)
        if not slot.ready:
            if slot.loading:
                m.show_note(f"Loading {slot.loading}…")
            else:
                m.show_note("No model: " + (slot.error or "Model ▸ Load model…"))
                self.ensure_model()
            return
        if info.requires("text") and not m.prompts:
            m.show_note(f"{info.title} needs a text prompt: type one in the Target box (prompts separated by ;).")
            return
        params = m.params[method_id]
        spec, target = slot.spec, self.target()
        self.runner.submit(
            "prepare", lambda cancel: self.engine.prepare_job(spec, image, method_id, params, target, cancel),
            description="tracing",
            on_done=lambda out: self._on_prepared(out, method_id, params, target, image.sha256, spec),
            on_error=lambda exc: self._failed(exc, method_id))

    def _on_prepared(self, out, method_id: str, params, target: Target, sha: str, spec: str) -> None:
        backend, trace = out
        if sha != (self.model.image.sha256 if self.model.image is not None else None):
            return
        self.trace = trace
        if trace.text is not None:
            unknown = self.window.panel.show_tokens(trace.text.prompts, trace.text.tokens)
            if unknown and tuple(unknown) != self._unknown_warned:
                self._unknown_warned = tuple(unknown)
                words = "; ".join(repr(p) for p in unknown)
                self.model.post(f"The model does not know some words of {words} (red <unk> chips in the Target box): "
                                "its map of them is not about those words.", "warning")
        self._show_query()
        self.runner.submit(
            "method", lambda cancel: self.engine.method_job(method_id, trace, params, target, cancel, backend),
            device=self.engine.needs_model(method_id), description=self.engine.host.method(method_id).title,
            on_done=lambda result: self._show(result, method_id, sha, spec),
            on_error=lambda exc: self._failed(exc, method_id))

    def _show(self, result, method_id: str, sha: str, spec: str | None = None) -> None:
        if self.model.show_result(result, method_id, sha, spec):
            self.window.map_shown.emit(result)

    def _failed(self, exc: BaseException, method_id: str) -> None:
        if method_id == self.model.method_id:
            self.model.show_note(short_error(exc), method_id)

    # -- the canvas renders the model's view ----------------------------------------------------------
    def _render(self, view: View) -> None:
        w = self.window
        canvas = w.canvas
        if view.busy:
            self.schedule_run()  # the inputs changed: one (debounced) run brings the view up to date
        title = self.engine.host.method(view.method_id).title if view.method_id else ""
        if view.result is None:
            same = self.drawn is not None and self.drawn.method_id == view.method_id and view.busy
            if view.busy and same:
                w.status_text.setText(f"updating {title}…")  # parameters moved: the old map stays until the new one
                return
            canvas.clear_overlay()
            w.legend.set_entries([])
            self.drawn = None
            canvas.set_note("" if view.busy else view.note)
            w.status_text.setText(f"computing {title}…" if view.busy else view.note)
            self._show_box_stats()
            w.regions_controller.analyse()
            return
        result = view.result
        canvas.set_note("")
        entries = []
        if isinstance(result, Heatmap):
            canvas.set_heatmap(result, self.model.colormap)
        elif isinstance(result, LabelMap):
            entries = canvas.set_labels(result)
        elif isinstance(result, TokenSelection):
            canvas.set_selection(result)
        elif isinstance(result, Reconstruction):  # the reconstruction is in the Tokenizer dock; its error here
            canvas.set_heatmap(result.error, self.model.colormap)
        elif isinstance(result, CodebookUsage):  # the histogram is in the Tokenizer dock; the code's region here
            canvas.set_heatmap(result.map, self.model.colormap)
        canvas.set_opacity(self.model.opacity)
        canvas.set_overlay_visible(self.model.overlay)
        w.legend.set_entries(entries)
        self.drawn = view
        self._show_query()
        self._show_box_stats()
        w.regions_controller.analyse()
        w.faithfulness.clear()
        self.model.clear_message(kinds=("error",))  # a failure this result supersedes; notes and warnings stay
        warnings = (getattr(result, "meta", None) or {}).get("warnings") or []
        if warnings:  # what the method reports about its own result (e.g. a damped iteration)
            self.model.post(" ".join(str(x) for x in warnings), "warning")
        w.status_text.setText(html.unescape(view.label))

    # -- analysis --------------------------------------------------------------------------------
    def _on_legend_click(self, index: int) -> None:
        """Label map -> the clicked prompt's own map (one click away)."""
        params = self.model.current_params
        if params is not None and {"output", "prompt_index"} <= set(type(params).model_fields):
            self.set_params(output="map", prompt_index=index)

    def result_raster(self):
        """The current heatmap rasterised on the image (cached per result)."""
        result, image = self.model.view.result, self.model.image
        if not isinstance(result, Heatmap) or image is None:
            return None
        cached = getattr(self, "_raster", None)
        if cached is None or cached[0] is not result:
            self._raster = (result, result.to_image(image.size))
        return self._raster[1]

    def region_stats(self) -> dict[str, float] | None:
        box, raster = self.window.region.box, self.result_raster()
        if box is None or raster is None:
            return None
        return region_stats(raster, box_mask(box, raster.shape))

    def _show_box_stats(self, box=None) -> None:
        w = self.window
        stats = self.region_stats() if w.region.box is not None else None
        w.region_label.setText(region_text(stats))
        w.region_label.setVisible(stats is not None)

    def on_box(self, box) -> None:
        self._show_box_stats()
        if box is None and self.window.box_action.isChecked():
            self.window.box_action.setChecked(False)

    def faithfulness_job(self, result: Heatmap):
        from explorer.plugin_host.faithfulness import deletion_insertion_job

        image, trace = self.model.image, self.trace
        prompt = result.meta.get("prompt") if isinstance(result.meta, dict) else None
        text = None
        if trace is not None and trace.text is not None and trace.text.prompts:
            idx = trace.text.prompts.index(prompt) if prompt in trace.text.prompts else 0
            text = trace.text.embeddings[idx]
        backend = self.backend("clip")
        # curves from the full image's score (1) to the blank image's (0): readable whatever the logit's sign
        return lambda cancel: deletion_insertion_job(backend, image, result.token_values, text, cancel=cancel,
                                                     normalise="range")

    def run_faithfulness(self) -> None:
        """Deletion/insertion curves of the current map (device thread, cancellable)."""
        result = self.model.view.result
        if not isinstance(result, Heatmap) or result.token_values is None or self.trace is None:
            self.model.post("Run a map method first: faithfulness scores a map over the image tokens.", "info")
            return
        w = self.window
        w.faithfulness_dock.show()
        self.runner.submit("faithfulness", self.faithfulness_job(result), description="faithfulness",
                           on_done=lambda out: w.faithfulness.show_result(out.curve, out.metrics),
                           on_error=lambda exc: self.model.post(short_error(exc), "error"))

    # -- export -----------------------------------------------------------------------------------
    def export_dialog(self) -> None:
        if not isinstance(self.model.view.result, (Heatmap, LabelMap, TokenSelection)) or self.model.image is None:
            self.model.post("Nothing to export yet: run a method first.", "info")
            return
        path, chosen = QFileDialog.getSaveFileName(self.window, "Export overlay", "overlay.png",
                                                   "PNG (*.png);;Raw result (*.npz)")
        if path:
            if not Path(path).suffix:  # a name typed without its extension: the chosen filter's
                path += ".npz" if "npz" in chosen else ".png"
            self.export(path)

    def export(self, path: str) -> bool:
        """Write the canvas's result to ``path``: the overlay as drawn (``.png``: a heatmap with the
        canvas's levels, colormap and opacity, a selection or a label map over the image) or the raw
        result (``.npz``), atomically. A failure (a bad path, a full disk, a read-only folder) is one
        line in the message bar and leaves an earlier file untouched; returns whether it was written."""
        from explorer.core.atomic import OutputError, check_output_path, save_image_atomic
        from explorer.core.render import heatmap_overlay_image, labels_overlay, selection_overlay
        from explorer.core.results import save_result

        m = self.model
        result = m.view.result
        if result is None or m.image is None:
            m.post("Nothing to export yet: run a method first.", "info")
            return False
        try:
            check_output_path(path, (".png", ".npz"))
            if path.lower().endswith(".npz"):
                save_result(result, path, extra_meta={"model": m.slot("clip").spec, "method": m.method_id})
            elif isinstance(result, Heatmap):
                lo, hi = self.window.canvas.levels
                save_image_atomic(path, heatmap_overlay_image(m.image.rgb, result, m.colormap, lo, hi, m.opacity), "PNG")
            elif isinstance(result, TokenSelection):
                save_image_atomic(path, selection_overlay(m.image.rgb, result), "PNG")
            elif isinstance(result, LabelMap):
                save_image_atomic(path, labels_overlay(m.image.rgb, result, m.opacity), "PNG")
            else:
                raise ValueError(f"a {type(result).__name__} is not drawn as an overlay: export it as .npz")
        except (OutputError, ValueError) as exc:  # OutputError: the path or the disk, one line naming the path
            m.post(f"Overlay not exported: {short_error(exc)}", "error")
            return False
        self.window.status_text.setText(f"exported {Path(path).name}")
        return True
