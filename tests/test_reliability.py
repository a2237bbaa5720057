"""Every file of the hostile corpus (:mod:`explorer.testing.hostile_files`, 45 files) through the
command line: a valid image is opened and its output written, anything else is refused with one
``error:`` line; nothing crashes or destroys an earlier output (the window: tests/qt/test_reliability_window.py).
"""

from __future__ import annotations

import pytest

from explorer.testing.hostile_files import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("hostile"))


def test_the_corpus_is_large_enough(corpus):
    assert len(corpus) >= 40 and sum(not c.loads for c in corpus) >= 25


def test_every_file_through_the_command_line(corpus, tmp_path, capsys):
    from PIL import Image

    from explorer.cli.main import main

    out = tmp_path / "out.png"
    earlier = tmp_path / "earlier.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(earlier)
    problems = []
    for c in corpus:
        out.write_bytes(earlier.read_bytes())  # an earlier good output at the same path
        code = main(["run", str(c.path), "--method", "attention.raw", "--out", str(out)])
        captured = capsys.readouterr()
        err_lines = [line for line in captured.err.splitlines() if line.strip()]
        if "Traceback" in captured.err:
            problems.append(f"{c.name}: traceback")
        elif c.loads:
            if code != 0:
                problems.append(f"{c.name}: refused a valid image ({captured.err.strip()})")
            else:
                with Image.open(out) as im:
                    im.verify()
        else:
            if code == 0:
                problems.append(f"{c.name}: accepted {c.what}")
            elif len(err_lines) != 1 or not err_lines[0].startswith("error: "):
                problems.append(f"{c.name}: {len(err_lines)} lines on stderr")
            if out.read_bytes() != earlier.read_bytes():
                problems.append(f"{c.name}: the earlier output was changed")
    assert not problems, problems
