"""Every file of the hostile corpus through the window: a valid image is opened, anything else is
refused with a one-line message and the image shown stays; the window survives all of them."""

from __future__ import annotations

import pytest

from explorer.testing.hostile_files import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("hostile"))


def test_every_file_through_the_window(corpus, qtbot, bare_window):
    w = bare_window
    problems = []
    for c in corpus:
        before = w.model.image_path
        w.model.clear_message()
        w.open_image(str(c.path))
        qtbot.waitUntil(lambda: w.model.image_path != before and w.model.image_path == str(c.path)
                        or (w.model.message is not None and w.model.message.kind == "error"), timeout=20000)
        if c.loads and w.model.image_path != str(c.path):
            problems.append(f"{c.name}: not opened ({w.model.message.text if w.model.message else ''})")
        if not c.loads:
            if w.model.image_path != before:
                problems.append(f"{c.name}: opened {c.what}")
            elif "\n" in w.model.message.text or "Traceback" in w.model.message.text:
                problems.append(f"{c.name}: message is not one line")
    qtbot.waitUntil(lambda: not w.runner.busy, timeout=60000)
    assert w.isVisible()
    assert not problems, problems
