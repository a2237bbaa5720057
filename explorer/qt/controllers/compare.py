"""The compare controller: several methods side by side on the current image, in three modes —
maps, token reduction in the CLIP tower (executed, with what it does to the output), and VLM
pruning inside the language model.

A comparison is a :class:`~explorer.core.session.Comparison` of the session model with an id:
starting one replaces the previous one, and results of an earlier comparison are refused, so the
grid never mixes two comparisons. The view is rebuilt from the model's events only.
"""

from __future__ import annotations

from explorer.core.metrics import box_mask, region_stats
from explorer.core.results import Heatmap
from explorer.core.session import Comparison
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec

from .base import Controller, short_error

__all__ = ["CompareController", "MAP_FAMILIES", "REDUCTION_FAMILIES", "tokenizer_reconstruction_job"]

MAP_FAMILIES = ("attention", "similarity", "attribution")
REDUCTION_FAMILIES = ("pruning", "merging")


def tokenizer_reconstruction_job(engine, spec: str, image, k: int, regions, cancel=None):
    """Job: ``(Reconstruction of the first k tokens (0: all), metrics)`` with ``tokens``,
    ``seconds`` and ``region_psnr`` (region name -> dB over the region's pixels in the crop)."""
    import time

    import numpy as np

    t0 = time.perf_counter()
    backend = yield from engine.backend_job(spec)
    if getattr(backend, "kind", "") != "tokenizer":
        raise ValueError(f"{spec} is a {backend.kind} model, not a tokenizer")
    trace = yield from engine.trace_job(backend, image, CaptureSpec(), cancel)
    params = engine.host.make_params("tok.prefix", {"k": int(k)})
    result = yield from engine.method_job("tok.prefix", trace, params, Target(), cancel, backend)
    frame = trace.extras["pixels"][0].permute(1, 2, 0).float().cpu().numpy()
    se = ((result.rgb - frame) ** 2).mean(-1)
    per_pixel = Heatmap(layout=result.error.layout, token_values=se.reshape(-1)).to_image(image.size, mode="nearest")
    region_psnr = {}
    for name, mask in regions:
        inside = mask & np.isfinite(per_pixel)
        if inside.any():
            region_psnr[name] = float(10 * np.log10(1.0 / max(float(per_pixel[inside].mean()), 1e-12)))
    return result, {"tokens": backend.token_count, "seconds": time.perf_counter() - t0, "region_psnr": region_psnr}


class CompareController(Controller):
    """See the module docstring."""

    def __init__(self, window) -> None:
        super().__init__(window)
        view = window.compare
        view.mode_changed.connect(self.set_mode)
        view.run_requested.connect(self.run)
        view.score_requested.connect(self.score)
        view.sweep_requested.connect(self.sweep)
        view.keep.valueChanged.connect(lambda v: self.model.set_compare_settings(keep=v))
        view.layer.valueChanged.connect(lambda v: self.model.set_compare_settings(layer=v))
        ev = self.model.events
        ev.comparison.connect(self._render)
        ev.comparison_item.connect(self._render_item)
        ev.model.connect(self._on_model)
        self._show_methods(self.model.compare_mode)

    # -- modes ----------------------------------------------------------------------------------
    def _show_methods(self, mode: str) -> None:
        if mode == "tokenizers":  # tokenizer specs and prefix lengths, not methods
            self.window.compare.set_methods([])
            self.window.compare.set_mode(mode)
            return
        families = REDUCTION_FAMILIES if mode in ("reduction", "vlm") else MAP_FAMILIES
        backend = "vlm" if mode == "vlm" else "clip"
        methods = [m for m in self.engine.host.methods(backend=backend) if m.family in families]
        self.window.compare.set_methods(methods, checked=set(self.model.compare_checked.get(mode, [])))
        self.window.compare.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        if mode == self.model.compare_mode:
            return
        self.model.compare_checked[self.model.compare_mode] = self.window.compare.checked()
        self.model.set_compare_mode(mode)
        self._show_methods(mode)

    def _on_model(self, kind: str) -> None:
        from explorer.plugin_host.reduction import default_layer

        slot = self.model.slot("clip")
        if kind == "clip" and slot.ready and self.model.compare_layer is None:
            layer = self.window.compare.layer
            layer.blockSignals(True)  # shows the model's default (None in the session: the jobs use it)
            layer.setValue(default_layer(slot.info.n_layers))
            layer.blockSignals(False)

    # -- running --------------------------------------------------------------------------------
    def run(self, method_ids: list[str]) -> None:
        """Run the ticked methods of the current mode into a new comparison."""
        mode = self.window.compare.current_mode
        {"maps": self._run_maps, "reduction": self._run_reduction, "vlm": self._run_vlm,
         "tokenizers": self._run_tokenizers}[mode](method_ids)

    def _ready(self, method_ids: list[str], kind: str = "clip") -> bool:
        m = self.model
        if not method_ids or m.image is None:
            m.post("Open an image and tick methods to compare.", "info")
            return False
        if kind == "clip" and not m.slot("clip").ready:
            m.post("Load a CLIP model first (Model ▸ Load model…).", "info")
            return False
        return True

    def _params(self, method_ids: list[str]) -> list:
        from explorer.plugin_host.defaults import default_params

        info = self.model.slot("clip").info
        return [self.model.params.get(mid) or default_params(self.engine.host, mid, info) for mid in method_ids]

    def _run_maps(self, method_ids: list[str]) -> None:
        m = self.model
        if not self._ready(method_ids):
            return
        host = self.engine.host
        if any(host.method(mid).requires("text") for mid in method_ids) and not m.prompts:
            m.post("Some of these methods need a text prompt: type one in the Target box.", "info")
            return
        params = self._params(method_ids)
        comparison = m.start_comparison("maps", method_ids)
        spec, image, target = m.slot("clip").spec, m.image, Target(prompts=m.prompts, query=m.query)
        cid = comparison.id

        def prepared(out):
            backend, trace = out
            for mid, p in zip(method_ids, params):
                self.runner.submit(
                    f"compare:{cid}:{mid}",
                    lambda cancel, mid=mid, p=p: self.engine.timed_method_job(mid, trace, p, target, cancel, backend),
                    device=self.engine.needs_model(mid), description=host.method(mid).title,
                    on_done=lambda res, mid=mid: m.comparison_result(cid, mid, res[0], {"seconds": res[1]}),
                    on_error=lambda exc, mid=mid: m.comparison_error(cid, mid, short_error(exc)))

        self.runner.submit("compare:prepare", lambda cancel: self.engine.prepare_job(spec, image, method_ids, params,
                                                                                     target, cancel),
                           description="tracing", on_done=prepared,
                           on_error=lambda exc: [m.comparison_error(cid, mid, short_error(exc)) for mid in method_ids])

    def _run_reduction(self, method_ids: list[str]) -> None:
        from explorer.plugin_host.compare import compare_job
        from explorer.plugin_host.regions import kept_inside

        m = self.model
        if not self._ready(method_ids):
            return
        keep, layer = self.model.compare_keep, self.model.compare_layer
        params = dict(zip(method_ids, self._params(method_ids)))
        comparison = m.start_comparison("reduction", method_ids, keep=keep, layer=layer)
        cid, spec, image = comparison.id, m.slot("clip").spec, m.image

        def done(cmp) -> None:
            region = self.window.regions_controller.selected_mask()
            for mid in method_ids:
                if mid in cmp.selections:
                    values = dict(cmp.metrics[mid].values)
                    if region is not None:
                        values["region_kept"] = kept_inside(cmp.selections[mid], region)
                    m.comparison_result(cid, mid, cmp.selections[mid], values)
                else:
                    m.comparison_error(cid, mid, cmp.errors.get(mid, "failed"))
            m.comparison_agreement(cid, cmp.agreement, cmp.agreement_kind)
            self.window.comparison_shown.emit(cmp)

        self.runner.submit(f"compare:{cid}", lambda cancel: compare_job(self.engine, spec, image, method_ids, params, keep,
                                                                         layer, cancel=cancel),
                           description="token reduction", on_done=done,
                           on_error=lambda exc: [m.comparison_error(cid, mid, short_error(exc)) for mid in method_ids])

    def _run_tokenizers(self, keys: list[str]) -> None:
        """Each tokenizer (or prefix length) of the Compare tab reconstructs the image: side by side,
        with PSNR overall and inside each region of the Regions dock."""
        m = self.model
        configs = self.window.compare.tokenizer_configs()
        if not configs or m.image is None:
            m.post("Open an image and name the tokenizers to compare.", "info")
            return
        comparison = m.start_comparison("tokenizers", [key for key, _, _ in configs])
        cid, image = comparison.id, m.image
        regions = [(r.name, r.mask) for r in (m.regions or []) if r.visible]
        for key, spec, k in configs:
            def job(cancel, spec=spec, k=k):
                return (yield from tokenizer_reconstruction_job(self.engine, spec, image, k, regions, cancel))

            self.runner.submit(f"compare:{cid}:{key}", job, description=f"reconstructing with {spec}",
                               on_done=lambda out, key=key: m.comparison_result(cid, key, out[0], out[1]),
                               on_error=lambda exc, key=key: m.comparison_error(cid, key, short_error(exc)))

    def _run_vlm(self, method_ids: list[str]) -> None:
        from explorer.plugin_host.compare import with_overrides

        m = self.model
        answer = m.vlm_for_image()
        backend = self.backend("vlm")
        if not method_ids or answer is None or backend is None:
            m.post("Ask the VLM about this image first, then tick pruning methods.", "info")
            return
        keep = self.model.compare_keep
        params = {mid: with_overrides(self.engine, mid, m.params.get(mid), keep=keep) for mid in method_ids}
        comparison = m.start_comparison("vlm", method_ids, keep=keep)
        cid, trace = comparison.id, answer.trace
        if "prepared" not in trace.extras:
            trace.extras["prepared"] = backend.prepare(m.image, answer.prompt)
        target = Target(prompts=(answer.prompt,))  # the question (text-guided methods)
        for mid in method_ids:
            self.runner.submit(
                f"compare:{cid}:{mid}",
                lambda cancel, mid=mid: self.engine.method_job(mid, trace, params[mid], target, cancel, backend),
                description=self.engine.host.method(mid).title,
                on_done=lambda sel, mid=mid: (m.comparison_result(cid, mid, sel), self.window.comparison_shown.emit(sel)),
                on_error=lambda exc, mid=mid: m.comparison_error(cid, mid, short_error(exc)))

    def sweep(self, method_ids: list[str]) -> None:
        """Embedding cosine against keep ratio for every ticked reduction method."""
        from explorer.plugin_host.compare import sweep_job

        m = self.model
        if not self._ready(method_ids):
            return
        params = dict(zip(method_ids, self._params(method_ids)))
        layer, keeps = self.model.compare_layer, self.window.compare.SWEEP_KEEPS
        comparison = m.comparison if (m.comparison is not None and m.comparison.mode == "reduction"
                                      and m.comparison.method_ids == method_ids) else None
        if comparison is None:
            comparison = m.start_comparison("reduction", method_ids, layer=layer)
        cid, spec, image = comparison.id, m.slot("clip").spec, m.image
        self.runner.submit(f"compare:sweep:{cid}",
                           lambda cancel: sweep_job(self.engine, spec, image, method_ids, keeps, params, layer, cancel=cancel),
                           description="keep-ratio sweep",
                           on_done=lambda res: (m.comparison_sweep(cid, keeps, res), self.window.comparison_shown.emit(res)),
                           on_error=lambda exc: m.post(short_error(exc), "error"))

    def score(self, method_ids: list[str]) -> None:
        """Faithfulness AUCs (and the box share) of every compared map into the table."""
        m = self.model
        c = m.comparison
        if c is None or c.mode != "maps" or self.window.maps_controller.trace is None:
            m.post("Compare maps first, then score them.", "info")
            return
        for mid in method_ids:
            result = c.results.get(mid)
            if not isinstance(result, Heatmap) or result.token_values is None:
                continue
            extra = {}
            box = self.window.region.box
            if box is not None:
                raster = result.to_image(m.image.size)
                extra = {"mass_inside": region_stats(raster, box_mask(box, raster.shape))["mass_inside"]}
            self.runner.submit(f"compare-score:{c.id}:{mid}", self.window.maps_controller.faithfulness_job(result),
                               description="faithfulness",
                               on_done=lambda out, mid=mid, extra=extra, cid=c.id: m.comparison_metrics(
                                   cid, mid, {**out.metrics.values, **extra}),
                               on_error=lambda exc, mid=mid, cid=c.id: m.comparison_error(cid, mid, short_error(exc)))

    # -- rendering ----------------------------------------------------------------------------------
    def _render(self, comparison: Comparison | None) -> None:
        view = self.window.compare
        if comparison is None:
            view.clear()
            return
        if comparison.mode != view.current_mode:
            self._show_methods(comparison.mode)  # a comparison reopened from a session
        view.prepare(comparison.method_ids, self.model.image.rgb)
        view.set_colormap(self.model.colormap)
        for mid in comparison.method_ids:
            self._render_item(mid)

    def _render_item(self, method_id: str) -> None:
        c, view = self.model.comparison, self.window.compare
        if c is None:
            return
        if not method_id:  # the agreement or the sweep
            if c.agreement is not None:
                view.show_agreement(c.method_ids, *c.agreement)
            if c.sweep is not None:
                view.show_sweep(c.sweep[1], c.sweep[0])
            return
        if method_id in c.errors:
            view.show_error(method_id, c.errors[method_id])
            return
        result, metrics = c.results.get(method_id), c.metrics.get(method_id, {})
        if result is None:
            return
        if c.mode == "maps":
            view.show_result(method_id, result, metrics.get("seconds", 0.0), self.model.colormap)
            if "deletion_auc" in metrics or "mass_inside" in metrics:
                view.show_scores(method_id, metrics)
            self.window.comparison_shown.emit(result)
        elif c.mode == "reduction":
            view.show_reduction(method_id, result, metrics)
        elif c.mode == "tokenizers":
            view.show_reconstruction(method_id, result, metrics)
            self.window.comparison_shown.emit(result)
        else:
            view.show_vlm_pruning(method_id, result)
