"""The Tokenizer dock: encode, click a token for its map, move the prefix slider, compare two
tokenizers side by side."""

import numpy as np
import pytest
from PySide6.QtCore import Qt

from explorer.core.results import Heatmap, Reconstruction


@pytest.fixture(scope="module")
def tok_specs(tmp_path_factory):
    from explorer.testing.tiny_tokenizer import make_tiny_grid, make_tiny_titok

    root = tmp_path_factory.mktemp("tok")
    return make_tiny_titok(root / "t", legacy=False).canonical(), make_tiny_grid(root / "g").canonical()


def test_encode_click_a_token_and_move_the_prefix(qtbot, bare_window, tok_specs, image_file):
    w = bare_window
    spec = tok_specs[0]
    w.open_image(str(image_file(48, 64)))
    qtbot.waitUntil(lambda: w.model.image is not None, timeout=10000)
    w.tokenizer_dock.raise_()
    with qtbot.waitSignal(w.tokens_shown, timeout=60000):
        w.encode_tokens(spec)
    panel = w.tokenizer_panel
    assert len(panel.strip.buttons) == 8 and panel.input_view.rgb.shape == (32, 32, 3)
    assert "PSNR" in panel.recon_caption.text() and panel.prefix.maximum() == 8
    with qtbot.waitSignal(w.map_shown, timeout=30000, check_params_cb=lambda r: isinstance(r, Heatmap)) as b:
        qtbot.mouseClick(panel.strip.buttons[2], Qt.MouseButton.LeftButton)
    assert w.model.method_id == "tok.influence" and b.args[0].meta["tokens"] == [2]
    # the map is drawn over the crop the model encoded: the 48x64 image resized to 32x43 (short side to
    # 32), then columns 5..37 of it kept, i.e. x from 5 * 64/43 over a width of 32 * 64/43 original pixels
    item = w.canvas.overlay_items[0]
    rect = item.mapRectToParent(item.boundingRect())
    sx = 43 / 64
    assert (rect.x(), rect.y(), rect.width(), rect.height()) == pytest.approx((5 / sx, 0, 32 / sx, 48))
    with qtbot.waitSignal(w.map_shown, timeout=30000, check_params_cb=lambda r: isinstance(r, Reconstruction)) as b:
        panel.prefix.setValue(3)
    assert b.args[0].k == 3 and "first 3" in panel.recon_caption.text()
    np.testing.assert_allclose(panel.recon_view.rgb, b.args[0].rgb)
    with qtbot.waitSignal(w.map_shown, timeout=30000, check_params_cb=lambda r: isinstance(r, Heatmap)) as b:
        panel.map_method.setCurrentIndex(1)  # encoder attention of the picked token
    assert w.model.method_id == "tok.attention" and b.args[0].token_values.shape == (16,)


def test_a_new_image_without_tokens_says_what_to_do(qtbot, bare_window, tok_specs, image_file):
    w = bare_window
    w.open_image(str(image_file(40, 40, "a.png")))
    qtbot.waitUntil(lambda: w.model.image is not None, timeout=10000)
    with qtbot.waitSignal(w.tokens_shown, timeout=60000):
        w.encode_tokens(tok_specs[1])
    with qtbot.waitSignal(w.map_shown, timeout=30000):
        w.tokenizer_panel.strip.select((0,))
    w.open_image(str(image_file(40, 48, "b.png")))  # another image (another size: other pixels)
    qtbot.waitUntil(lambda: "Encode the image with a tokenizer" in w.canvas.note_text(), timeout=10000)
    assert not w.tokenizer_panel.strip.buttons and not w.canvas.overlay_items


def test_two_tokenizers_side_by_side(qtbot, bare_window, tok_specs, image_file):
    w = bare_window
    w.open_image(str(image_file(48, 48)))
    qtbot.waitUntil(lambda: w.model.image is not None, timeout=10000)
    mask = np.zeros((48, 48), bool)
    mask[10:30, 10:30] = True
    w.model.edit_regions("add", mask, "square")
    w.tabs.setCurrentWidget(w.compare)
    w.compare_controller.set_mode("tokenizers")
    w.compare.tok_specs[0].setText(tok_specs[0])
    w.compare.tok_ks[0].setValue(4)
    w.compare.tok_specs[1].setText(tok_specs[1])
    w.run_compare(w.compare.checked())
    qtbot.waitUntil(lambda: w.model.comparison is not None and w.model.comparison.done, timeout=60000)
    assert not w.model.comparison.errors and len(w.compare.cells) == 2
    cols = w.compare.COLUMNS
    rows = {w.compare.table.item(r, 0).text(): r for r in range(2)}
    first = rows[f"{tok_specs[0]} · first 4"]
    assert w.compare.table.item(first, cols.index("first k")).text() == "4"
    assert w.compare.table.item(first, cols.index("PSNR per region (dB)")).text().startswith("square:")
    result = w.model.comparison.results[f"{tok_specs[0]} · first 4"]
    assert float(w.compare.table.item(first, cols.index("PSNR (dB)")).text()) == pytest.approx(result.psnr, abs=0.01)


def test_swap_rank_and_codebook_usage_in_the_dock(qtbot, bare_window, tok_specs, image_file):
    """Swap tokens in from another image, rank the tokens by a region, count the codes of the open
    folder: each drawn from the session's result, the histogram in the dock, the code's mean region
    on the canvas."""
    from explorer.core.results import CodebookUsage

    w = bare_window
    a, b = image_file(40, 40, "a.png"), image_file(40, 56, "b.png")
    w.browser.set_folder(a.parent)
    w.open_image(str(a))
    qtbot.waitUntil(lambda: w.model.image is not None, timeout=10000)
    with qtbot.waitSignal(w.tokens_shown, timeout=60000):
        w.encode_tokens(tok_specs[0])
    panel = w.tokenizer_panel
    panel.swap_image.setText(str(b))
    panel.swap_tokens.setText("0-3")
    with qtbot.waitSignal(w.map_shown, timeout=30000, check_params_cb=lambda r: isinstance(r, Reconstruction)) as sig:
        panel.swap_requested.emit(panel.swap_image.text(), panel.swap_tokens.text())
    assert w.model.method_id == "tok.swap" and sig.args[0].meta["swapped"] == [0, 1, 2, 3]
    np.testing.assert_allclose(panel.recon_view.rgb, sig.args[0].rgb)
    mask = np.zeros((40, 40), bool)
    mask[:, :20] = True
    w.model.edit_regions("add", mask, "left half")
    panel.rank_button.click()
    qtbot.waitUntil(lambda: "inside the region" in panel.ranking.text(), timeout=30000)
    scores = w.model.tokens.scores.scores
    assert scores.shape == (8,) and ((scores >= 0) & (scores <= 1)).all()
    with qtbot.waitSignal(w.map_shown, timeout=60000, check_params_cb=lambda r: isinstance(r, CodebookUsage)) as sig:
        panel.codebook_button.click()
    usage = sig.args[0]
    assert usage.images == 2 and usage.counts.sum() == 2 * 8
    assert panel.histogram.isVisible() and panel.histogram.pixmap().width() == 360
    assert f"{len(usage.counts) - len(usage.dead)} of {len(usage.counts)} codes used" in panel.codebook_text.text()
    # another token: the folder is not encoded again; the canvas shows that token's code's region
    backend = w.tokenizer_controller.backend("tokenizer")
    before = backend.forward_count
    with qtbot.waitSignal(w.map_shown, timeout=30000, check_params_cb=lambda r: isinstance(r, CodebookUsage)) as sig:
        qtbot.mouseClick(panel.strip.buttons[5], Qt.MouseButton.LeftButton)
    assert backend.forward_count == before and sig.args[0].meta["token"] == 5
    assert w.model.method_id == "tok.codebook"


def test_the_shipped_demo_tokenizer_by_its_alias(qtbot, bare_window, image_file):
    """``tok:demo`` (an alias of the shipped folder) encodes, and a token click draws its map."""
    w = bare_window
    w.open_image(str(image_file(64, 64)))
    qtbot.waitUntil(lambda: w.model.image is not None, timeout=10000)
    with qtbot.waitSignal(w.tokens_shown, timeout=60000):
        w.encode_tokens("tok:demo")
    assert w.model.slot("tokenizer").ready and w.model.slot("tokenizer").spec.endswith("demo-tok")
    with qtbot.waitSignal(w.map_shown, timeout=30000, check_params_cb=lambda r: isinstance(r, Heatmap)):
        w.tokenizer_panel.strip.select((3,))
    assert w.model.view.method_id == "tok.influence" and len(w.tokenizer_panel.strip.buttons) == 32
