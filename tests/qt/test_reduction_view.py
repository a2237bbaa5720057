"""Token reduction in the window: a selection on the canvas, the compare grid, agreement, sweep."""

import numpy as np

from explorer.core.results import TokenSelection


def test_selection_on_the_canvas(qtbot, window, image_file):
    window.set_method("pruning.topk")
    with qtbot.waitSignal(window.map_shown, timeout=60000) as blocker:
        window.open_image(str(image_file(64, 64)))
        window.set_params(keep=0.25, layer=1)
    sel = blocker.args[0]
    while not (isinstance(sel, TokenSelection) and sel.n_kept == 16):
        with qtbot.waitSignal(window.map_shown, timeout=60000) as blocker:
            pass
        sel = blocker.args[0]
    rgba = window.canvas.overlay_items[0].image
    assert rgba.shape == (64, 64, 4)
    alpha = rgba[::8, ::8, 3]  # one sample per token cell
    np.testing.assert_array_equal(alpha == 0, sel.kept.reshape(8, 8))


def test_reduction_compare_agreement_and_sweep(qtbot, window, image_file):
    window.set_method("attention.rollout")
    with qtbot.waitSignal(window.map_shown, timeout=60000):
        window.open_image(str(image_file(64, 80)))
    window.compare.set_mode("reduction")
    ids = ["pruning.topk", "pruning.evit"]
    window.compare.set_checked(ids)
    window.compare.keep.setValue(0.5)
    window.compare.layer.setValue(1)
    with qtbot.waitSignal(window.comparison_shown, timeout=120000) as blocker:
        window.run_compare(window.compare.checked())
    cmp = blocker.args[0]
    assert set(cmp.selections) == set(ids)
    assert all(cell.canvas.overlay_items for cell in window.compare.cells.values())
    cols = window.compare.COLUMNS
    kept = window.compare.table.item(0, cols.index("kept")).text()
    assert kept == "32"
    assert float(window.compare.table.item(0, cols.index("cosine")).text()) > 0.5
    assert window.compare.agreement.rowCount() == 2
    # Top-K and EViT keep the same tokens at one stage: IoU 1
    assert window.compare.agreement.item(0, 1).text().startswith("1.00")
    with qtbot.waitSignal(window.comparison_shown, timeout=240000) as blocker:
        window.run_sweep(ids)
    res = blocker.args[0]
    assert [len(v) for v in res.values()] == [4, 4]
    assert len(window.compare.sweep_plot.listDataItems()) == 2


def test_a_methods_own_warning_reaches_the_message_bar(qtbot, window, image_file):
    """Zero-TPrune capped at one plain PageRank step damps every head and says so in its result;
    the window shows that warning (the result is still drawn)."""
    window.set_method("pruning.zerotprune")
    window.set_params(max_iterations=1, layer=1)
    window.open_image(str(image_file(64, 64)))
    qtbot.waitUntil(lambda: window.result is not None and "damped" in " ".join(window.result.meta.get("warnings", [])),
                    timeout=60000)
    qtbot.waitUntil(lambda: window.model.message is not None and window.model.message.kind == "warning", timeout=10000)
    assert "Zero-TPrune" in window.message.text() and "damped PageRank" in window.message.text()
