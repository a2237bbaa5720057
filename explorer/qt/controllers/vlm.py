"""The VLM controller: load a vision-language model, ask it about the image (the answer streams in),
and map the words it generated: a token strip to pick words, a layer x head grid of small maps,
and the VLM map methods on the canvas.

The answer is a :class:`~explorer.core.session.VlmAnswer` of the session model and names the image
it is about. Picking a word while a CLIP method is shown switches the canvas to the word's map and
says so; a new image without an answer switches back to that CLIP method (and says so) instead of
leaving an empty canvas.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtWidgets import QMessageBox

from explorer.backends.errors import RemoteCodeRequired
from explorer.core.session import VlmAnswer
from explorer.core.target import Target

from .base import Controller, short_error

__all__ = ["VlmController"]

WORD_MAP = "vlm.attention"


class VlmController(Controller):
    """See the module docstring."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.previous_method: str | None = None  # the CLIP method a word click replaced
        panel = window.vlm_panel
        panel.generate_requested.connect(self.ask)
        panel.load_requested.connect(self.load_vlm)
        panel.strip.selection_changed.connect(self.select_tokens)
        panel.grid.picked.connect(self._on_grid_pick)
        ev = self.model.events
        ev.model.connect(self._on_model)
        ev.vlm.connect(self._render_answer)
        ev.vlm_tokens.connect(self._render_tokens)
        ev.image.connect(lambda _: self._render_answer(self.model.vlm))

    # -- model ----------------------------------------------------------------------------------
    def load_vlm(self, spec: str) -> None:
        self.load("vlm", spec, failed=lambda exc: self._load_with_consent(exc, spec))

    def _load_with_consent(self, exc: BaseException, spec: str) -> None:
        allowed = self._consented_spec(exc, spec)
        if allowed is not None:
            self.window.vlm_panel.model_edit.setText(allowed)
            self.load_vlm(allowed)

    def _consented_spec(self, exc: BaseException, spec: str) -> str | None:
        """A model that needs its repository's own code (the backend raised
        :class:`RemoteCodeRequired`; nothing of that code ran): ask the user. The spec that allows
        the code when they agree, else ``None``."""
        if not isinstance(exc, RemoteCodeRequired) or "trust_remote_code=true" in spec:
            return None
        modules = f" ({', '.join(exc.modules)})" if exc.modules else ""
        answer = QMessageBox.question(
            self.window, "Run the model's own code?",
            f"{spec} ships its own Python code{modules}, which would run on this computer. Allow it only if you "
            "trust the repository. Load it with its code?")
        if answer != QMessageBox.StandardButton.Yes:
            return None
        return f"{spec}{'&' if '?' in spec else '?'}trust_remote_code=true"

    def _on_model(self, kind: str) -> None:
        if kind != "vlm":
            return
        backend = self.backend("vlm")
        family = f" ({backend.family})" if backend is not None else ""
        self.window.vlm_panel.status.setText(self.slot_text("vlm", "no VLM", family))
        if backend is not None and self.window.maps_controller.is_vlm_method():
            self.window.maps_controller.schedule_run()  # a word map was waiting for this model

    # -- asking ----------------------------------------------------------------------------------
    def ask(self, spec: str, prompt: str, max_new_tokens: int) -> None:
        """Generate an answer about the current image (device thread), streaming its text."""
        from explorer.plugin_host.vlm import generate_trace_job

        m = self.model
        if m.image is None:
            m.post("Open an image first.", "info")
            return
        if not prompt:
            m.post("Type a question or instruction for the VLM.", "info")
            return
        spec = spec or m.slot("vlm").wanted
        image = m.image
        panel = self.window.vlm_panel
        panel.answer.setText("…")
        panel.strip.set_tokens([])
        if m.slot("vlm").spec != spec:
            m.begin_load("vlm", spec)

        def job(cancel):
            backend = yield from self.engine.backend_job(spec)
            trace = yield from generate_trace_job(backend, image, prompt, max_new_tokens, cancel)
            return backend, trace

        def done(out):
            backend, trace = out
            if m.slot("vlm").spec != spec:
                m.load_succeeded("vlm", spec, backend.info)
            gen = trace.extras["generation"]
            m.set_vlm_answer(VlmAnswer(spec=spec, prompt=prompt, trace=trace, max_new_tokens=max_new_tokens))
            self.window.answer_shown.emit(trace)
            if gen.tokens and m.image is not None and trace.image_sha256 == m.image.sha256:
                self.select_tokens((0,))  # the first word's map, as if it was clicked (said in the message bar)

        self.runner.submit("vlm", job, description="generating",
                           on_progress=lambda p: panel.stream(p.message) if p.message else None,
                           on_done=done, on_error=lambda exc: self._failed(exc, spec, prompt, max_new_tokens))

    def _failed(self, exc: BaseException, spec: str, prompt: str, max_new_tokens: int) -> None:
        """A model that needs its repository's own code is loaded only if the user agrees."""
        m = self.model
        if m.slot("vlm").loading == spec:
            m.load_failed("vlm", spec, short_error(exc))
        allowed = self._consented_spec(exc, spec)
        if allowed is not None:
            self.window.vlm_panel.model_edit.setText(allowed)
            self.ask(allowed, prompt, max_new_tokens)
            return
        if m.slot("vlm").loading != spec:
            m.post(short_error(exc), "error")
        self.window.vlm_panel.answer.setText("")

    def _render_answer(self, answer: VlmAnswer | None) -> None:
        panel = self.window.vlm_panel
        if answer is None:
            panel.answer.setText("")
            panel.strip.set_tokens([])
            return
        gen = answer.generation
        other = self.model.image is not None and answer.image_sha256 != self.model.image.sha256
        text = gen.text or "(no answer: the model stopped at once)"
        panel.answer.setText(("(about another image) " if other else "") + text)
        if panel.strip.token_texts() != list(gen.tokens):
            panel.strip.set_tokens(gen.tokens)
        if answer.trace.extras.get("capture_note"):
            self.model.post(answer.trace.extras["capture_note"], "warning")
        if answer.tokens:
            self._render_tokens(answer.tokens)

    # -- words ----------------------------------------------------------------------------------
    def select_tokens(self, tokens: tuple) -> None:
        """A word was picked: its map on the canvas (switching to the word map, said once)."""
        m = self.model
        if m.vlm is None or tuple(tokens) == m.vlm.tokens:
            return
        m.select_vlm_tokens(tuple(tokens))
        if tokens and m.method_id is not None and not m.method_id.startswith("vlm."):
            self.previous_method = m.method_id
            self.window.maps_controller.set_method(WORD_MAP)
            m.post(f"Showing the VLM's map of the picked word (was {self.engine.host.method(self.previous_method).title}; "
                   "pick it again in the Method dock).", "info")

    def _render_tokens(self, tokens: tuple) -> None:
        panel = self.window.vlm_panel
        if panel.strip.selected != tuple(tokens):
            panel.strip.blockSignals(True)
            panel.strip.select(tuple(tokens))
            panel.strip.blockSignals(False)
        self._show_layer_head_grid()

    def _show_layer_head_grid(self) -> None:
        answer = self.model.vlm
        if answer is None or not answer.tokens:
            return
        gen, trace = answer.generation, answer.trace
        seg = trace.layout.segments[0]
        n0 = seg.n_tokens
        layers = sorted(gen.attention)
        if not layers:
            return
        maps = np.stack([np.nanmean(gen.attention[l][list(answer.tokens)], 0)[:, :n0] for l in layers])
        self.window.vlm_panel.grid.show_maps(maps, (seg.rows, seg.cols), self.model.colormap, layers=layers)

    def _on_grid_pick(self, layer: int, head: int) -> None:
        if self.model.method_id != WORD_MAP:
            self.window.maps_controller.set_method(WORD_MAP)
        self.window.maps_controller.set_params(start_layer=layer, end_layer=layer, head=head)

    # -- VLM methods on the canvas ----------------------------------------------------------------
    def run_method(self) -> None:
        """Run the current VLM map method on the answer about this image, or go back to the CLIP
        method a word click replaced (or say on the canvas what is missing)."""
        m = self.model
        answer = m.vlm_for_image()
        if answer is not None and m.image is not None and m.view.current(m.method_id, m.image.sha256, answer.spec):
            return
        if answer is None:
            if self.previous_method is not None:
                back, self.previous_method = self.previous_method, None
                title = self.engine.host.method(back).title
                self.window.maps_controller.set_method(back)
                m.post(f"Back to {title}: the VLM's word map needs an answer about this image (Ask a VLM dock).", "info")
                return
            m.show_note("Ask the VLM about this image first (the 'Ask a VLM' dock), then pick a word.")
            return
        backend = self.backend("vlm")
        if backend is None:
            slot = m.slot("vlm")
            if slot.loading is None:
                self.load("vlm", answer.spec)
            m.show_note(f"Loading {answer.spec}…")
            return
        method_id, params = m.method_id, m.current_params
        trace, sha = answer.trace, answer.image_sha256
        if "prepared" not in trace.extras:  # an answer reopened from a session: the inputs are made again
            trace.extras["prepared"] = backend.prepare(m.image, answer.prompt)
        target = Target(prompts=(answer.prompt,), tokens=answer.tokens or (0,))
        self.runner.submit("method", lambda cancel: self.engine.method_job(method_id, trace, params, target, cancel, backend),
                           device=self.engine.needs_model(method_id), description=self.engine.host.method(method_id).title,
                           on_done=lambda result: self.window.maps_controller._show(result, method_id, sha, answer.spec),
                           on_error=lambda exc: self.window.maps_controller._failed(exc, method_id))
