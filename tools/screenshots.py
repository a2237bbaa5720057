"""Retake the screenshots in docs/ with the demo models: every dock of the window at 1280x800.

Run it under a display (a desktop, or ``xvfb-run -s "-screen 0 1400x900x24" python
tools/screenshots.py``); with ``QT_QPA_PLATFORM=offscreen`` it also works, with Qt's offscreen
fonts. The window is driven through the same calls a user's clicks make, and each picture is the
window as drawn (``QWidget.grab``):

* ``window.png``: MaskCLIP similarity to "a red ring" on the first sample scene (Method dock);
* ``compare-maps.png``: four map methods side by side (Compare tab, metrics table);
* ``compare-reduction.png``: four pruning/merging methods executed at keep 0.5 with the sweep;
* ``vlm-word-map.png``: the demo VLM's answer and the map of one of its words (Ask a VLM dock);
* ``compare-vlm.png``: FastV, SparseVLM, DART (keep 0.25) and MustDrop (its 64-token preset) pruning
  the demo VLM, each with its answer, kept tokens and image tokens per layer (Compare tab, VLM mode);
* ``region.png``: a SAM region with its candidates, labels, caption and map share (Regions dock);
* ``faithfulness.png``: deletion and insertion curves of the map of "a white star" (Faithfulness dock);
* ``tokenizer.png``: the demo 1D tokenizer on a sample scene: the token strip, a token's influence
  map on the canvas, the reconstruction from the first 8 tokens beside the input (Tokenizer dock);
* ``tokenizer-codebook.png``: the codebook usage over the samples folder, one code's mean region;
* ``compare-tokenizers.png``: the 1D tokenizer's first 8 tokens and the grid VQ tokenizer
  side by side, PSNR per region (Compare tab, Tokenizers mode);
* ``sweep.png``: a sweep's rows in the Sweep tab, sorted by mass inside (the sweep, 24 scenes, runs
  in this process first).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "resources" / "samples" / "scene-01.png"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs (default docs/)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="explorer-shots-"))
    os.environ.setdefault("EXPLORER_CACHE_DIR", str(tmp / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setStyle("Fusion")
    from explorer.qt.app import create_window

    w = create_window("demo", settings=QSettings(str(tmp / "s.ini"), QSettings.Format.IniFormat))
    w.browser.set_folder(SCENE.parent)
    w.resize(1280, 800)
    w.show()

    def wait(cond, timeout=180.0, what=""):
        t = time.monotonic()
        while not cond():
            app.processEvents()
            time.sleep(0.01)
            if time.monotonic() - t > timeout:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        for _ in range(20):  # let layouts and repaints settle
            app.processEvents()
            time.sleep(0.01)

    def idle():
        return not w.runner.busy

    def shot(name: str):
        wait(idle, what="idle")
        path = out / name
        w.grab().save(str(path))
        print(f"wrote {path}")

    w.load_model("demo")
    wait(lambda: w.model.slot("clip").ready, what="the demo CLIP")
    w.set_method("similarity.maskclip")
    w.set_prompts(("a red ring", "a white star", "an orange triangle"))
    w.open_image(str(SCENE))
    wait(lambda: w.result is not None and w.model.view.method_id == "similarity.maskclip", what="MaskCLIP")
    w.method_dock.raise_()
    shot("window.png")

    # compare: maps
    w.tabs.setCurrentWidget(w.compare)
    w.compare.set_mode("maps")
    maps = ["attention.raw", "attention.rollout", "similarity.maskclip", "similarity.sclip"]
    w.compare.set_checked(maps)
    w.run_compare(maps)
    wait(lambda: w.model.comparison is not None and w.model.comparison.done, what="the map comparison")
    shot("compare-maps.png")

    # compare: token reduction, executed, with the keep-ratio sweep
    w.compare.set_mode("reduction")
    reductions = ["pruning.topk", "pruning.evit", "merging.tome", "pruning.divprune"]
    w.compare.set_checked(reductions)
    w.compare.keep.setValue(0.5)
    w.run_compare(reductions)
    wait(lambda: w.model.comparison is not None and w.model.comparison.done, what="the reduction comparison")
    w.run_sweep(reductions)
    wait(lambda: w.model.comparison.sweep is not None, what="the sweep")
    w.compare.bottom.setCurrentWidget(w.compare.table)
    shot("compare-reduction.png")

    # the VLM: an answer and one word's map
    w.tabs.setCurrentIndex(0)
    w.vlm_dock.raise_()
    w.vlm_panel.model_edit.setText("vlm:demo")
    w.vlm_panel.prompt_edit.setText("<image> describe the scene")
    w.vlm_panel.max_tokens.setValue(12)
    w.vlm_panel.generate_button.click()
    wait(lambda: w.model.vlm is not None and w.model.method_id == "vlm.attention" and w.result is not None,
         what="the VLM answer")
    tokens = w.vlm_panel.strip.token_texts()
    pick = next((i for i, t in enumerate(tokens) if "ring" in t or "star" in t), 0)
    w.vlm_panel.strip.select((pick,))
    wait(lambda: w.result is not None and w.result.meta.get("tokens") == [pick], what="the word's map")
    shot("vlm-word-map.png")

    # compare: VLM pruning inside the language model; MustDrop with its three stages
    w.tabs.setCurrentWidget(w.compare)
    w.compare.set_mode("vlm")
    pruners = ["vlm.fastv", "vlm.sparsevlm", "vlm.dart", "vlm.mustdrop"]
    w.compare.set_checked(pruners)
    w.compare.keep.setValue(0.25)
    w.model.set_params("vlm.mustdrop", w.engine.host.make_params("vlm.mustdrop", {"preset": "64"}))
    w.run_compare(pruners)
    wait(lambda: w.model.comparison is not None and w.model.comparison.done, what="the VLM pruning comparison")
    w.compare.bottom.setCurrentWidget(w.compare.table)
    shot("compare-vlm.png")
    w.tabs.setCurrentIndex(0)

    # regions: a SAM click on the star, labels and a caption
    w.set_method("similarity.maskclip")
    wait(lambda: w.model.view.method_id == "similarity.maskclip" and w.result is not None, what="MaskCLIP again")
    w.regions_dock.raise_()
    w.regions_panel.model_edit.setText("sam:demo")
    w.regions_panel.segment_button.setChecked(True)
    wait(lambda: w.sam_backend is not None, what="the demo SAM")
    w.regions_controller._on_prompt_click(292.0, 245.0, True)  # as a click on the canvas
    wait(lambda: bool(w.model.sam_prompt.candidates), what="SAM's candidates")
    w.add_region("star")
    w.regions_panel.segment_button.setChecked(False)
    rid = w.model.region_id
    w.regions_panel.vocabulary.setCurrentText("scenes")
    w.label_regions([rid])
    wait(lambda: bool(w.regions.get(rid).labels), what="labels")
    w.caption_regions([rid])
    wait(lambda: bool(w.regions.get(rid).caption), what="a caption")
    w.select_region(rid)
    shot("region.png")

    # faithfulness of the map of "a white star"
    w.set_params(prompt_index=1)
    wait(lambda: w.result is not None and "white star" in w.result.label, what="the star's map")
    w.run_faithfulness()
    wait(lambda: w.faithfulness.metrics is not None, what="faithfulness")
    w.method_dock.raise_()
    shot("faithfulness.png")

    # the tokenizer dock: encode, one token's influence, the first 8 tokens
    w.faithfulness_dock.hide()
    w.tokenizer_dock.raise_()
    w.encode_tokens("tok:demo")
    wait(lambda: w.model.tokens_for_image() is not None, what="the tokens")
    w.tokenizer_panel.strip.select((3,))
    wait(lambda: w.result is not None and w.model.view.method_id == "tok.influence", what="a token's influence")
    w.tokenizer_panel.prefix.setValue(8)
    wait(lambda: w.result is not None and w.model.view.method_id == "tok.prefix", what="the first 8 tokens")
    w.tokenizer_panel.strip.select((3,))
    wait(lambda: w.result is not None and w.model.view.method_id == "tok.influence", what="the influence again")
    shot("tokenizer.png")
    w.tokenizer_panel.codebook_button.click()
    wait(lambda: w.result is not None and w.model.view.method_id == "tok.codebook", what="the codebook usage")
    bar = w.tokenizer_dock.widget().verticalScrollBar()  # the histogram is at the bottom of the dock
    bar.setValue(bar.maximum())
    shot("tokenizer-codebook.png")

    # compare: two tokenizers (and two prefix lengths), PSNR in the star's region
    w.tabs.setCurrentWidget(w.compare)
    w.compare_controller.set_mode("tokenizers")
    w.compare.tok_specs[0].setText("tok:demo")
    w.compare.tok_ks[0].setValue(8)
    w.compare.tok_specs[1].setText("tok:demo-grid")
    w.run_compare(w.compare.checked())
    wait(lambda: w.model.comparison is not None and w.model.comparison.done, what="the tokenizer comparison")
    shot("compare-tokenizers.png")
    w.tabs.setCurrentIndex(0)

    # sweep results: the rows, and the worst case on the canvas
    from explorer.sweep.run import run_sweep
    from explorer.sweep.spec import load_spec

    sweep = load_spec({"models": ["demo"], "dataset": {"kind": "synthetic", "count": 24, "objects": 2},
                       "methods": [{"id": "similarity.maskclip", "params": {"templates": "none"}},
                                   {"id": "pruning.topk", "grid": {"keep": [0.25, 0.5]}}]})
    run_sweep(sweep, tmp / "sweep", plain=True)
    w.faithfulness_dock.hide()
    w.open_sweep(str(tmp / "sweep"))
    wait(lambda: w.model.sweep is not None, what="the sweep results")
    w.sweep_view.sort_by("mass_inside")
    shot("sweep.png")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
