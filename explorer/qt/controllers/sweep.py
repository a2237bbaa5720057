"""Sweep results in the window: File ▸ Open sweep results reads a results folder (off the GUI
thread) into the session model; picking a row opens that image with that method, setting and
target on the canvas, so the worst cases can be looked at, not just counted.

A row's image is its file (folder, COCO and VQA datasets) or, for a synthetic scene, the scene made
again from the SPEC saved in the folder. CLIP rows set the method, its parameters (the row's
``params``) and the prompt (the row's target); a different model is loaded first. VLM rows open
the image and fill the VLM dock with the model and question (asking runs the model).
"""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from explorer.core.session import SweepResults

from .base import Controller, short_error

__all__ = ["SweepController", "read_sweep"]


def read_sweep(folder: str) -> SweepResults:
    """The rows and SPEC of a results folder (``ValueError`` when it holds none)."""
    from explorer.sweep.results import read_results

    root = Path(folder)
    pinned = root / "spec.json"
    if not pinned.is_file():
        raise ValueError(f"{root} holds no sweep results (no spec.json): pick the folder given to --out")
    try:
        spec = json.loads(pinned.read_text()).get("spec", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{pinned} cannot be read ({exc})") from None
    table = read_results(root)
    if table is None:
        raise ValueError(f"{root} has no result rows yet")
    return SweepResults(folder=str(root), spec=spec, rows=table.to_pandas())


class SweepController(Controller):
    """See the module docstring."""

    def __init__(self, window) -> None:
        super().__init__(window)
        window.sweep_view.row_picked.connect(self.pick)
        self.model.events.sweep.connect(self._render)

    def open_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self.window, "Open sweep results (the folder given to --out)")
        if folder:
            self.open(folder)

    def open(self, folder: str) -> None:
        from explorer.sweep.run import missing_libraries

        missing = [m for m in missing_libraries() if m in ("pyarrow", "pandas")]
        if missing:
            self.model.post(f"Reading sweep results needs {', '.join(missing)}: pip install 'token-explorer[sweep]'",
                            "error")
            return
        self.runner.submit("sweep-open", lambda cancel: read_sweep(folder), device=False,
                           description="reading sweep results", on_done=self.model.set_sweep,
                           on_error=lambda exc: self.model.post(f"Sweep results not opened: {short_error(exc)}", "error"))

    def _render(self, results) -> None:
        w = self.window
        titles = {m.id: m.title for m in self.engine.host.methods()}
        w.sweep_view.show_results(results, titles)
        if results is not None:
            w.tabs.setCurrentWidget(w.sweep_view)
            w.sweep_shown.emit(results)

    # -- a row onto the canvas --------------------------------------------------------------------
    def pick(self, position: int) -> None:
        m, results = self.model, self.model.sweep
        if results is None:
            return
        m.pick_sweep_row(position)
        row = results.rows.iloc[position]
        self.runner.submit("sweep-row", lambda cancel: self._image(row, results.spec), device=False,
                           description="reading the row's image", on_done=lambda image: self._show(row, image),
                           on_error=lambda exc: m.post(f"That row's image cannot be shown: {short_error(exc)}", "error"))

    def _show(self, row, image) -> None:
        m, method = self.model, str(row["method"])
        w = self.window
        w.tabs.setCurrentIndex(0)
        if row["task"] == "vlm":
            m.set_image(image, str(row["image"]) if Path(str(row["image"])).is_file() else None)
            w.vlm_dock.raise_()
            w.vlm_panel.model_edit.setText(str(row["model"]))
            w.vlm_panel.prompt_edit.setText(str(row["target"]))
            m.post(f"{self.engine.host.method(method).title}, {row['setting']}: the pruned answer was "
                   f"{row['answer']!r}, the full one {row['answer_full']!r}. Ask the VLM, then compare pruning "
                   "methods in the Compare tab.", "info")
            return
        try:
            params = self.engine.host.make_params(method, json.loads(row["params"]))
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            m.post(f"That row's parameters do not fit {method} any more: {short_error(exc)}", "error")
            return
        if m.slot("clip").spec != str(row["model"]) and m.slot("clip").loading != str(row["model"]):
            w.maps_controller.load_model(str(row["model"]))
        m.set_image(image, str(row["image"]) if Path(str(row["image"])).is_file() else None)
        target = str(row["target"])
        if target:
            m.set_prompts((target,))
        m.set_method(method, params)
        text = f"sweep row: {self.engine.host.method(method).title}, {row['setting']}"
        if target:
            text += f", target {target!r}"
        if row["error"]:
            text += f" (failed in the sweep: {row['error']})"
        w.status_text.setText(text)

    def _image(self, row, spec: dict):
        """The row's image: its file, or the synthetic scene made again from the saved SPEC."""
        from explorer.core.image_io import load_image

        path = Path(str(row["image"]))
        if path.is_file():
            return load_image(path)
        if spec.get("dataset", {}).get("kind") == "synthetic":
            from explorer.sweep.datasets import load_item
            from explorer.sweep.spec import SweepSpec

            sweep = SweepSpec.model_validate(spec)
            item = {"item_id": str(row["item_id"]), "index": int(row["index"]), "path": "", "question": "",
                    "answers": "[]", "annotations": "[]"}
            return load_item(item, sweep).image
        raise ValueError(f"{path} is not there any more")
