"""The regions controller: SAM prompts on the canvas, candidate masks, the region layers and what
falls inside the selected region (the map's mass, the [CLS] attention per layer and head, the
generated words), CLIP labels and VLM captions of regions, and their export.

SAM's image encoder runs once per image (on the device thread, cached on disk); a click then
runs only the prompt encoder and the mask decoder. Regions live in the session model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtWidgets import QFileDialog

from explorer.core.jobs import Progress
from explorer.core.results import Heatmap, TokenSelection

from .base import Controller, short_error

__all__ = ["RegionsController"]


class RegionsController(Controller):
    """See the module docstring."""

    def __init__(self, window) -> None:
        super().__init__(window)
        rp = window.regions_panel
        rp.load_requested.connect(self.load_sam)
        rp.segment_toggled.connect(self.set_segmenting)
        rp.clear_prompt.connect(self.model.clear_sam_prompt)
        rp.box_requested.connect(self.box_prompt)
        rp.candidate_chosen.connect(self.model.choose_candidate)
        rp.add_requested.connect(self.add_region)
        rp.union_requested.connect(self.union_regions)
        rp.subtract_requested.connect(self.subtract_regions)
        rp.delete_requested.connect(self.delete_regions)
        rp.renamed.connect(self.rename_region)
        rp.visibility_changed.connect(self.set_region_visible)
        rp.selected.connect(self.model.select_region)
        rp.label_requested.connect(self.label_regions)
        rp.caption_requested.connect(self.caption_regions)
        rp.export_requested.connect(self.export_regions_dialog)
        window.canvas.prompt_clicked.connect(self._on_prompt_click)
        ev = self.model.events
        ev.model.connect(self._on_model)
        ev.image.connect(lambda _: self._on_image())
        ev.regions.connect(self._render)
        ev.sam_prompt.connect(self._render_prompt)
        ev.vlm.connect(lambda _: self.analyse())

    # -- model ----------------------------------------------------------------------------------
    def load_sam(self, spec: str, then=None) -> None:
        self.load("sam", spec, then=then)

    def _on_model(self, kind: str) -> None:
        if kind != "sam":
            return
        self.window.regions_panel.status.setText(self.slot_text("sam", "no SAM model"))
        if self.model.slot("sam").ready and not self.model.slot("sam").loading:
            self.embed_current()

    def _on_image(self) -> None:
        if self.model.segmenting:
            self.embed_current()

    def embed_current(self) -> None:
        """Compute (or fetch from the caches) the SAM embedding of the current image in the background."""
        backend, image = self.backend("sam"), self.model.image
        if backend is None or image is None:
            return
        status = self.window.regions_panel.status
        def done(emb) -> None:
            status.setText(f"{backend.info.name}: embedding {emb.source}" + (f" in {emb.seconds:.1f} s" if emb.seconds else ""))
            if getattr(emb, "note", ""):  # the disk cache could not be written or held a bad entry: not an error
                self.model.post(emb.note, "warning")

        self.runner.submit("sam-embed", lambda cancel: backend.embedding_job(image, cancel), description="SAM image encoder",
                           on_done=done, on_error=lambda exc: self.model.post(short_error(exc), "error"))

    def set_segmenting(self, on: bool) -> None:
        self.model.set_segmenting(on)
        if on and not self.model.slot("sam").ready:
            slot = self.model.slot("sam")
            if slot.loading is None:
                self.load_sam(self.window.regions_panel.model_edit.text().strip() or slot.wanted)
        elif on:
            self.embed_current()

    # -- prompts --------------------------------------------------------------------------------
    def box_prompt(self) -> None:
        """A box prompt: the first press places a box to adjust, the second segments inside it."""
        w = self.window
        if self.model.image is None:
            return
        if w.region.box is None:
            w.box_action.setChecked(True)
            self.model.post("Adjust the box, then press 'Box prompt' again.", "info")
            return
        b = w.region.box
        self.model.set_box_prompt([b.x0, b.y0, b.x1, b.y1])
        if not self.model.segmenting:
            w.regions_panel.segment_button.setChecked(True)
        self.run_sam()

    def _on_prompt_click(self, x: float, y: float, positive: bool) -> None:
        if not self.model.segmenting or self.model.image is None:
            return
        self.model.add_point(x, y, positive)
        self.run_sam()

    def run_sam(self) -> None:
        """Masks for the current prompt: after the first click the embedding comes from the cache,
        so a click runs only SAM's prompt encoder and mask decoder (device thread)."""
        backend = self.backend("sam")
        if backend is None:
            slot = self.model.slot("sam")
            if slot.loading is None:
                self.load_sam(self.window.regions_panel.model_edit.text().strip() or slot.wanted,
                              then=lambda _b: self.run_sam())
            return
        m, image = self.model, self.model.image
        prompt = m.sam_prompt
        pts = np.array([[x, y] for x, y, _ in prompt.points], dtype=np.float32) if prompt.points else None
        labels = np.array([lab for _, _, lab in prompt.points], dtype=np.int64) if prompt.points else None
        box = None if prompt.box is None else np.asarray(prompt.box, dtype=np.float32)
        n = 0 if pts is None else len(pts)
        previous = prompt.candidates[prompt.candidate].meta.get("logits") if prompt.candidates and n > 1 else None
        multimask = (n == 1 and box is None) or (n == 0 and box is not None)
        sha = image.sha256

        def job(cancel):
            emb = yield from backend.embedding_job(image, cancel)
            return backend.predict(emb, pts, labels, box=box, mask_input=previous, multimask=multimask)

        def done(masks):
            if self.model.image is not None and self.model.image.sha256 == sha:
                self.model.set_candidates(masks)
                self.window.regions_shown.emit(masks)

        self.runner.submit("sam-click", job, description="SAM", on_done=done,
                           on_error=lambda exc: self.model.post(short_error(exc), "error"))

    def _render_prompt(self) -> None:
        w, m = self.window, self.model
        prompt = m.sam_prompt
        w.canvas.set_points(prompt.points)
        if m.image is not None:
            w.regions_panel.show_candidates(m.image.rgb, [c.mask for c in prompt.candidates],
                                            [c.score for c in prompt.candidates], prompt.candidate)
        if w.regions_panel.segment_button.isChecked() != m.segmenting:
            w.regions_panel.segment_button.setChecked(m.segmenting)
        self._paint_layer()

    # -- regions ----------------------------------------------------------------------------------
    def add_region(self, name: str | None = None) -> None:
        self.model.add_region_from_candidate(name)

    def _edit(self, op: str, *args: Any, hint: str = "") -> Any:
        try:
            return self.model.edit_regions(op, *args)
        except (ValueError, KeyError) as exc:
            self.model.post(f"{short_error(exc)}{hint}", "info")
            self._render()
            return None

    def rename_region(self, rid: int, name: str) -> None:
        region = self.model.regions.get(rid) if self.model.regions is not None else None
        if region is not None and region.name != name.strip():
            self._edit("rename", rid, name)

    def set_region_visible(self, rid: int, visible: bool) -> None:
        region = self.model.regions.get(rid) if self.model.regions is not None else None
        if region is not None and region.visible != visible:
            self._edit("set_visible", rid, visible)

    def union_regions(self, ids: list[int]) -> None:
        self._edit("union", ids, hint=" (select two or more regions)")

    def subtract_regions(self, ids: list[int]) -> None:
        if len(ids) < 2:
            self.model.post("Subtract: select the region to keep first, then the ones to remove.", "info")
            return
        self._edit("subtract", ids[0], ids[1:])

    def delete_regions(self, ids: list[int]) -> None:
        for i in ids:
            self._edit("remove", i)

    def select_region(self, rid: int) -> None:
        self.model.select_region(rid)

    def _render(self) -> None:
        m = self.model
        self._paint_layer()
        rgb = m.image.rgb if m.image is not None else None
        self.window.regions_panel.set_regions(rgb, list(m.regions) if m.regions is not None else [], m.region_id)
        self.analyse()

    def _paint_layer(self) -> None:
        """Visible regions (and the chosen candidate) over the image."""
        from explorer.core.render import regions_rgba

        m, canvas = self.model, self.window.canvas
        if m.image is None or m.regions is None:
            canvas.set_region_layer(None)
            return
        candidate = m.sam_prompt.candidates[m.sam_prompt.candidate].mask if m.sam_prompt.candidates else None
        rgba = regions_rgba(m.image.size, m.regions, m.region_id, candidate)
        canvas.set_region_layer(rgba if rgba[..., 3].any() else None)

    def selected_mask(self) -> np.ndarray | None:
        r = self.model.selected_region
        return None if r is None else r.mask

    def analyse(self) -> None:
        """Labels, caption, and what falls inside the selected region: the current map's mass and
        peak, the [CLS] attention share per layer and head, each generated word's share."""
        from explorer.plugin_host.regions import attention_share, kept_inside, map_stats, word_shares

        w, m = self.window, self.model
        r = m.selected_region
        if r is None:
            w.regions_panel.info.setText("")
            w.regions_panel.show_share(None)
            return
        lines = [f"<b>{r.name}</b>: {r.area} px" + (f", SAM score {r.score:.2f}" if r.score is not None else "")]
        if r.caption:
            lines.append(f"caption: <i>{r.caption}</i>")
        if r.labels:
            lines.append("labels: " + ", ".join(f"{n} ({p:.2f})" for n, p in r.labels))
        result = m.view.result
        if isinstance(result, Heatmap):
            st = map_stats(result, r.mask)
            lines.append(f"map: {100 * st['mass_inside']:.1f}% of the mass inside (region is {100 * st['area_share']:.1f}% "
                         f"of the image), peak {'inside' if st['peak_inside'] else 'outside'}")
        if isinstance(result, TokenSelection):
            kept, total = kept_inside(result, r.mask)
            lines.append(f"selection keeps {kept} of the region's {total} tokens")
        share = None
        trace = w.maps_controller.trace
        if trace is not None and trace.attentions and trace.attention_rows is None:
            try:
                share = attention_share(trace, r.mask)
            except ValueError:
                share = None
        w.regions_panel.show_share(share)
        answer = m.vlm_for_image()
        if answer is not None:
            gen = answer.generation
            shares = word_shares(answer.trace, r.mask)
            grounded = [f"{gen.tokens[t].strip()} ({v:.2f})" for t, v in enumerate(shares) if v >= 0.5]
            lines.append("words grounding inside: " + (", ".join(grounded) if grounded else "none above 50%"))
            for t, b in enumerate(w.vlm_panel.strip.buttons):
                if t < len(shares):
                    b.setToolTip(f"{100 * shares[t]:.0f}% of its image attention inside '{r.name}'")
        w.regions_panel.info.setText("<br>".join(lines))

    # -- labels and captions ------------------------------------------------------------------------
    def label_regions(self, ids: list[int]) -> None:
        """CLIP labels of each region over the chosen vocabulary (device thread)."""
        from explorer.plugin_host.regions import region_labels

        backend = self.backend("clip")
        if not ids or backend is None or self.model.regions is None:
            self.model.post("Labels need regions and a CLIP model.", "info")
            return
        rp = self.window.regions_panel
        which = rp.vocabulary.currentText()
        custom = [t for t in rp.custom_vocabulary.text().split(",") if t.strip()]
        image, sha = self.model.image, self.model.image.sha256
        masks = {i: self.model.regions.get(i).mask for i in ids}

        def job(cancel):
            out = {}
            for k, (i, mask) in enumerate(masks.items()):
                cancel.raise_if_cancelled()
                yield Progress(k / len(masks), f"labelling region {k + 1}/{len(masks)}")
                out[i] = region_labels(backend, image, mask, which, custom)
            return out

        def done(out):
            if self.model.image is None or self.model.image.sha256 != sha:
                return
            for i, labels in out.items():
                self.model.edit_regions("update", i, labels=tuple(labels))
            self.window.regions_shown.emit(out)

        self.runner.submit("labels", job, description="labels", on_done=done,
                           on_error=lambda exc: self.model.post(short_error(exc), "error"))

    def caption_regions(self, ids: list[int]) -> None:
        """VLM captions of each region (crop with context, or the region highlighted)."""
        from explorer.plugin_host.regions import caption_region_job

        if not ids or self.model.regions is None:
            return
        w = self.window
        spec = w.vlm_panel.model_edit.text().strip() or self.model.slot("vlm").wanted
        prompt = w.regions_panel.caption_prompt.text().strip() or "describe"
        mode = w.regions_panel.caption_mode.currentText()
        image, sha = self.model.image, self.model.image.sha256
        masks = {i: self.model.regions.get(i).mask for i in ids}
        if self.model.slot("vlm").spec != spec:
            self.model.begin_load("vlm", spec)  # the captioning job loads it first

        def job(cancel):
            backend = yield from self.engine.backend_job(spec)
            out = {}
            for k, (i, mask) in enumerate(masks.items()):
                cancel.raise_if_cancelled()
                yield Progress(k / len(masks), f"captioning region {k + 1}/{len(masks)}")
                out[i] = yield from caption_region_job(backend, image, mask, prompt, mode=mode, cancel=cancel)
            return backend, out

        def done(res):
            backend, out = res
            if self.model.slot("vlm").spec != spec:
                self.model.load_succeeded("vlm", spec, backend.info)
            if self.model.image is None or self.model.image.sha256 != sha:
                return
            for i, text in out.items():
                self.model.edit_regions("update", i, caption=text)
            self.window.regions_shown.emit(out)

        def failed(exc):
            if self.model.slot("vlm").loading == spec:
                self.model.load_failed("vlm", spec, short_error(exc))
            else:
                self.model.post(short_error(exc), "error")

        self.runner.submit("captions", job, description="captions", on_done=done, on_error=failed)

    # -- export ---------------------------------------------------------------------------------------
    def export_regions_dialog(self, kind: str) -> None:
        if self.model.regions is None or not len(self.model.regions):
            self.model.post("No regions to export yet.", "info")
            return
        if kind == "coco":
            path, _ = QFileDialog.getSaveFileName(self.window, "Export regions (COCO RLE)", "regions.json", "JSON (*.json)")
        else:
            path, _ = QFileDialog.getSaveFileName(self.window, "Export region masks", "regions.zip", "ZIP (*.zip)")
        if path:
            if kind == "coco" and not Path(path).suffix:
                path += ".json"
            self.export_regions(kind, path)

    def export_regions(self, kind: str, path: str) -> bool:
        """Write the regions as COCO JSON (``kind`` 'coco') or as PNG masks (a ``.zip``, or a folder
        for a path without it), atomically; a failure is one line in the message bar and leaves an
        earlier file untouched. Returns whether it was written."""
        from explorer.core.atomic import OutputError, check_output_dir, check_output_path

        if self.model.regions is None or not len(self.model.regions):
            self.model.post("No regions to export yet.", "info")
            return False
        name = Path(self.model.image_path).name if self.model.image_path else ""
        try:
            if kind == "coco":
                check_output_path(path, (".json",))
                self.model.regions.save_coco(path, file_name=name)
            elif Path(path).suffix.lower() == ".zip":
                check_output_path(path, (".zip",))
                self.model.regions.save_pngs(path)
            else:
                check_output_dir(path)
                self.model.regions.save_pngs(path)
        except (OutputError, ValueError) as exc:  # OutputError: the path or the disk, one line naming the path
            self.model.post(f"Regions not exported: {short_error(exc)}", "error")
            return False
        self.window.status_text.setText(f"regions exported to {Path(path).name}")
        return True
