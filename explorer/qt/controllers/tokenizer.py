"""The Tokenizer dock: encode the current image with an image tokenizer, then every tokenizer
method (``tok.*``) draws on the canvas like any map method: a token click shows its influence,
encoder attention or gradient; the prefix slider shows the error of the first k tokens (the
reconstruction itself in the dock); a swap shows what another image's tokens change; a region
ranks the tokens by how much of their influence lands inside it.

The encoding (ids, reconstruction, the encoder's attention) is one job on the device thread and
lives in the session model (:class:`~explorer.core.session.TokenizedImage`); the methods read it.
"""

from __future__ import annotations

from pathlib import Path

from explorer.backends.registry import parse_model_spec
from explorer.core.results import CodebookUsage, Reconstruction, TokenScores
from explorer.core.session import TokenizedImage
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec

from .base import Controller, short_error

__all__ = ["TokenizerController"]


class TokenizerController(Controller):
    """See the module docstring."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.map_method = "tok.influence"
        panel = window.tokenizer_panel
        panel.load_requested.connect(lambda spec: self.load("tokenizer", spec))
        panel.encode_requested.connect(self.encode)
        panel.prefix_changed.connect(self.set_prefix)
        panel.map_method_changed.connect(self.set_map_method)
        panel.strip.selection_changed.connect(self.select_tokens)
        panel.swap_requested.connect(self.swap)
        panel.rank_requested.connect(self.rank)
        panel.codebook_requested.connect(self.codebook)
        ev = self.model.events
        ev.model.connect(self._on_model)
        ev.tokens.connect(self._render_tokens)
        ev.token_selection.connect(self._render_selection)
        ev.image.connect(lambda _: self._render_tokens(self.model.tokens))
        ev.view.connect(self._render_view)
        window.browser.image_chosen.connect(self._remember_other)
        self._last_other: str | None = None

    # -- model ----------------------------------------------------------------------------------
    def _on_model(self, kind: str) -> None:
        if kind == "tokenizer":
            self.window.tokenizer_panel.status.setText(self.slot_text("tokenizer", "no tokenizer"))

    def encode(self) -> None:
        """Encode the current image (loading the tokenizer named in the dock first if needed)."""
        m = self.model
        if m.image is None:
            m.post("Open an image first.", "info")
            return
        panel = self.window.tokenizer_panel
        spec = panel.model_edit.text().strip() or m.slot("tokenizer").wanted
        try:  # the slot holds canonical specs (tok:demo is the shipped folder's path)
            spec = parse_model_spec(spec, kind="tokenizer").canonical()
        except ValueError as exc:
            m.post(short_error(exc), "error")
            return
        image = m.image
        if m.slot("tokenizer").spec != spec:
            m.begin_load("tokenizer", spec)
        panel.status.setText("encoding…")

        def job(cancel):
            backend = yield from self.engine.backend_job(spec)
            if getattr(backend, "kind", "") != "tokenizer":
                raise ValueError(f"{spec} is a {backend.kind} model, not a tokenizer (tok:demo, tok:demo-grid)")
            capture = CaptureSpec(attention_layers=frozenset(range(backend.info.n_layers)))
            trace = yield from self.engine.trace_job(backend, image, capture, cancel)
            return backend, trace

        def done(out) -> None:
            backend, trace = out
            if m.slot("tokenizer").spec != backend.info.spec:
                m.load_succeeded("tokenizer", backend.info.spec, backend.info)
            if m.image is None or m.image.sha256 != trace.image_sha256:
                return
            m.set_tokens(TokenizedImage(spec=backend.info.spec, image_sha256=trace.image_sha256, trace=trace))
            self.window.tokens_shown.emit(trace)

        def failed(exc) -> None:
            m.load_failed("tokenizer", spec, short_error(exc)) if m.slot("tokenizer").loading == spec else \
                m.post(f"Not encoded: {short_error(exc)}", "error")

        self.runner.submit("tokenizer", job, description="tokenizing", on_done=done, on_error=failed)

    # -- intents ----------------------------------------------------------------------------------
    def _use(self, method_id: str, **values) -> None:
        """Show ``method_id`` on the canvas with these parameter values (a form change, as a user's)."""
        host = self.engine.host
        params = self.model.params.get(method_id) or host.make_params(method_id, {})
        if values:
            params = host.make_params(method_id, {**params.model_dump(), **values})
        if self.model.method_id != method_id:
            self.window.tabs.setCurrentIndex(0)
            self.model.set_method(method_id, params)
        else:
            self.model.set_params(method_id, params)

    def select_tokens(self, tokens: tuple) -> None:
        if self.model.tokens_for_image() is None:
            return
        self.model.select_tokens(tuple(tokens))
        if tokens and self.model.method_id not in ("tok.influence", "tok.attention", "tok.gradient", "tok.codebook"):
            self._use(self.map_method)

    def set_map_method(self, method_id: str) -> None:
        self.map_method = method_id
        if self.model.tokens_for_image() is not None and self.model.tokens.selected:
            self._use(method_id)

    def set_prefix(self, k: int) -> None:
        t = self.model.tokens_for_image()
        if t is None:
            return
        n = int(t.ids.shape[-1])
        self.window.tokenizer_panel.prefix_label.setText(f"prefix: first {k} of {n}")
        self.model.set_prefix(k)
        self._use("tok.prefix", k=int(k))

    def swap(self, other: str, tokens: str) -> None:
        other = other or (self._last_other or "")
        if not other:
            self.model.post("Give the other image (its file), or pick it in the folder browser first.", "info")
            return
        self._use("tok.swap", other=other, tokens=tokens)

    def codebook(self) -> None:
        """Codebook usage over the folder open in the browser (the picked token's code on the canvas)."""
        folder = self.window.browser.folder
        if self.model.tokens_for_image() is None:
            self.model.post("Encode the image with a tokenizer first (Tokenizer dock ▸ Encode image).", "info")
            return
        if folder is None:
            self.model.post("Open a folder of images first (File ▸ Open folder…).", "info")
            return
        self._use("tok.codebook", folder=str(folder))

    def _remember_other(self, path: str) -> None:
        """The browser's previous image is the natural other image of a swap."""
        current = self.model.image_path
        if current and current != path:
            self._last_other = current
            self.window.tokenizer_panel.swap_image.setPlaceholderText(f"another image (default: {Path(current).name})")

    def rank(self) -> None:
        """Rank the tokens by the share of their influence inside the selected region (or box)."""
        m = self.model
        t = m.tokens_for_image()
        backend = self.backend("tokenizer")
        if t is None or backend is None:
            m.post("Encode the image with a tokenizer first (Tokenizer dock).", "info")
            return
        region = self.window.regions_controller.selected_mask()
        if region is None and self.window.region.box is not None:
            from explorer.core.metrics import box_mask

            region = box_mask(self.window.region.box, m.image.size)
        if region is None:
            m.post("Select a region (Regions dock) or draw a box (Analysis ▸ Draw a box) first.", "info")
            return
        params = self.engine.host.make_params("tok.region", {})
        trace, sha = t.trace, t.image_sha256
        self.runner.submit("tokenizer-rank", lambda cancel: self.engine.method_job(
            "tok.region", trace, params, Target(region=region), cancel, backend), description="ranking tokens",
            on_done=lambda scores: m.set_token_scores(scores) if m.image is not None and m.image.sha256 == sha else None,
            on_error=lambda exc: m.post(short_error(exc), "error"))

    # -- the canvas -------------------------------------------------------------------------------
    def run_method(self) -> None:
        """Run the current tokenizer method (the maps controller hands ``tok.*`` methods here)."""
        m = self.model
        method_id, image = m.method_id, m.image
        t = m.tokens_for_image()
        if t is None:
            m.show_note("Encode the image with a tokenizer first (the Tokenizer dock), then pick a token.")
            return
        if m.view.current(method_id, image.sha256, t.spec):
            return
        backend = self.backend("tokenizer")
        if backend is None:
            m.show_note("Load the tokenizer again (Tokenizer dock ▸ Encode image).")
            return
        params = m.current_params
        region = self.window.regions_controller.selected_mask()
        target = Target(tokens=t.selected or (0,), region=region)
        trace, sha = t.trace, t.image_sha256
        self.runner.submit("method", lambda cancel: self.engine.method_job(method_id, trace, params, target, cancel,
                                                                           backend),
                           description=self.engine.host.method(method_id).title,
                           on_done=lambda result: self.window.maps_controller._show(result, method_id, sha, t.spec),
                           on_error=lambda exc: self.window.maps_controller._failed(exc, method_id))

    # -- the dock -----------------------------------------------------------------------------------
    def _render_tokens(self, tokens) -> None:
        panel = self.window.tokenizer_panel
        t = self.model.tokens_for_image()
        if t is None:
            panel.set_tokens([], False)
            panel.input_view.show_rgb(None)
            panel.recon_view.show_rgb(None)
            panel.show_scores(None)
            return
        backend = self.backend("tokenizer")
        ordered = bool(backend.ordered) if backend is not None else False
        ids = [int(i) for i in t.ids.tolist()]
        if panel.strip.token_texts() != [f"{i}:{c}" for i, c in enumerate(ids)]:
            panel.set_tokens(ids, ordered)
        ex = t.trace.extras
        panel.input_view.show_rgb(ex["pixels"][0].permute(1, 2, 0).float().cpu().numpy())
        panel.recon_view.show_rgb(ex["reconstruction"].permute(1, 2, 0).float().cpu().numpy())
        S = int(ex["pixels"].shape[-1])
        panel.input_caption.setText(f"input: the {S}x{S} crop the model encodes")
        panel.recon_caption.setText(f"all {len(ids)} tokens: PSNR {ex['psnr']:.1f} dB")
        kind = "grid tokens, one per patch" if backend is not None and backend.is_grid else "1D tokens"
        panel.status.setText(f"{self.slot_text('tokenizer', 'no tokenizer')} · {len(ids)} {kind}")
        scores = t.scores
        panel.show_scores(None if not isinstance(scores, TokenScores) else scores.scores)

    def _render_selection(self, tokens: tuple) -> None:
        strip = self.window.tokenizer_panel.strip
        if strip.selected != tuple(tokens):
            strip.blockSignals(True)
            strip.select(tuple(tokens))
            strip.blockSignals(False)

    def _render_view(self, view) -> None:
        """A reconstruction on the canvas (its error): the image itself beside the input in the dock."""
        panel = self.window.tokenizer_panel
        result = view.result
        if isinstance(result, Reconstruction):
            panel.recon_view.show_rgb(result.rgb)
            panel.recon_caption.setText(f"{result.label}: PSNR {result.psnr:.1f} dB")
        if isinstance(result, CodebookUsage):
            panel.show_usage(result)
        elif view.method_id != "tok.codebook":
            panel.show_usage(None)
