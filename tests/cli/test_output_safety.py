"""The CLI's outputs: a bad destination fails before any model loads, a failed write is one
``error:`` line with a non-zero exit, never a partial file, never the loss of an earlier output,
and two runs writing one path leave one complete file."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from explorer.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "resources" / "samples" / "scene-01.png"


@pytest.fixture
def spec(tiny_clip_spec):
    return tiny_clip_spec.canonical()


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    loads = []

    def refuse(spec, *args, **kw):
        loads.append(spec)
        raise AssertionError(f"a model was loaded ({spec}) before the output was checked")

    monkeypatch.setattr("explorer.backends.registry.load_backend", refuse)
    return loads


def _no_space(*args, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _bad_paths(tmp_path: Path) -> dict[str, tuple[Path | str, str]]:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    (tmp_path / "folder.png").mkdir()
    return {
        "file as parent": (tmp_path / "notes.txt" / "sub" / "o.png", "is a file, not a folder"),
        "directory": (tmp_path / "folder.png", "it is a folder"),
        "long name": (tmp_path / ("x" * 300 + ".png"), "too long"),
        "unknown extension": (tmp_path / "o.jpg", "unknown extension .jpg"),
        "trailing slash": (str(tmp_path / "new") + "/", "names a folder"),
    }


@pytest.mark.parametrize("case", ["file as parent", "directory", "long name", "unknown extension", "trailing slash"])
def test_run_refuses_a_bad_out_before_the_model_loads(tmp_path, image_file, spec, no_model, capsys, case):
    path, needle = _bad_paths(tmp_path)[case]
    code = main(["run", str(image_file(64, 64)), "--model", spec, "--method", "attention.rollout", "--out", str(path)])
    line = _one_error_line(capsys)
    assert code == 2 and no_model == []
    assert line.startswith("error: --out: cannot write '") and needle in line
    assert _leftovers(tmp_path) == []


def test_run_refuses_a_read_only_folder_before_the_model_loads(tmp_path, image_file, spec, no_model, capsys,
                                                               monkeypatch):
    img = image_file(64, 64)

    def read_only(*args, **kw):  # what a read-only mount answers (chmod does not stop root)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("explorer.core.atomic.tempfile.mkstemp", read_only)
    code = main(["run", str(img), "--model", spec, "--method", "attention.rollout", "--out", str(tmp_path / "o.png")])
    line = _one_error_line(capsys)
    assert code == 2 and no_model == [] and "Read-only file system" in line and str(tmp_path) in line


@pytest.mark.parametrize("suffix", [".png", ".npz"])
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_run_on_a_full_disk_keeps_the_earlier_output(tmp_path, image_file, spec, capsys, monkeypatch, suffix, where):
    img = str(image_file(64, 80))
    out = tmp_path / f"o{suffix}"
    argv = ["run", img, "--model", spec, "--method", "attention.rollout", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    good = out.read_bytes()
    monkeypatch.setattr(f"explorer.core.atomic.os.{where}", _no_space)
    code = main(argv + ["--opacity", "0.3"])
    line = _one_error_line(capsys)
    monkeypatch.undo()
    assert code == 1
    assert line == f"error: cannot write '{out}': No space left on device"
    assert out.read_bytes() == good  # the earlier output is whole
    assert _leftovers(tmp_path) == []  # and no partial file is left


def test_run_into_a_new_folder_leaves_no_folder_when_the_write_fails(tmp_path, image_file, spec, capsys, monkeypatch):
    out = tmp_path / "new" / "deeper" / "o.png"
    monkeypatch.setattr("explorer.core.atomic.os.replace", _no_space)
    code = main(["run", str(image_file(64, 64)), "--model", spec, "--method", "attention.rollout", "--out", str(out)])
    assert code == 1 and "No space left on device" in _one_error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_two_runs_writing_one_out_leave_one_complete_png(tmp_path, image_file, spec):
    img = str(image_file(96, 128))
    out = tmp_path / "same.png"
    codes = []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait(30)
        codes.append(main(["run", img, "--model", spec, "--method", "attention.rollout", "--out", str(out), "--quiet"]))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert codes == [0, 0]
    with Image.open(out) as im:
        im.load()  # a complete, decodable PNG
        assert im.format == "PNG" and im.size == (128, 96)
    assert _leftovers(tmp_path) == []


def test_compare_checks_out_and_json_first_and_keeps_old_files(tmp_path, spec, no_model, capsys, monkeypatch):
    (tmp_path / "d.json").mkdir()
    code = main(["compare", str(SAMPLE), "--model", spec, "--methods", "topk", "--json", str(tmp_path / "d.json")])
    assert code == 2 and no_model == [] and "error: --json: cannot write" in _one_error_line(capsys)
    code = main(["compare", str(SAMPLE), "--model", spec, "--methods", "topk", "--out", str(tmp_path / "g.jpg")])
    assert code == 2 and no_model == [] and "unknown extension .jpg: use .png" in _one_error_line(capsys)
    monkeypatch.undo()
    # a full disk at the end: one line, the earlier metrics untouched
    metrics = tmp_path / "m.json"
    metrics.write_text('{"earlier": true}')
    monkeypatch.setattr("explorer.core.atomic.os.replace", _no_space)
    code = main(["compare", str(SAMPLE), "--model", spec, "--methods", "topk", "--keep", "0.5", "--json", str(metrics),
                 "--quiet"])
    assert code == 1 and "No space left on device" in _one_error_line(capsys)
    assert metrics.read_text() == '{"earlier": true}' and _leftovers(tmp_path) == []


def test_eval_table_out_is_checked_before_the_evaluation(tmp_path, spec, capsys, monkeypatch):
    def never(*args, **kw):
        raise AssertionError("evaluated before --out was checked")

    monkeypatch.setattr("explorer.sweep.presets.evaluate_maps", never)
    (tmp_path / "docs").mkdir()
    code = main(["eval-maps", "--model", spec, "--scenes", "1", "--out", str(tmp_path / "docs")])
    assert code == 2 and "error: --out: cannot write" in _one_error_line(capsys)


def test_output_folders_of_tokenize_and_replay_are_checked_first(tmp_path, no_model, session_bundle, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["tokenize", str(SAMPLE), "--model", "tok:demo", "--out", str(blocker / "sub")])
    assert code == 2 and no_model == [] and "is a file, not a folder" in _one_error_line(capsys)
    path, _ = session_bundle
    code = main(["replay", str(path), "--out", str(blocker)])
    assert code == 2 and "error: --out: cannot write" in _one_error_line(capsys)
    assert blocker.read_text() == "x"


def test_replay_on_a_full_disk_is_one_line(tmp_path, session_bundle, capsys, monkeypatch):
    path, _ = session_bundle
    out = tmp_path / "replay"
    monkeypatch.setattr("explorer.core.atomic.os.fsync", _no_space)
    code = main(["replay", str(path), "--out", str(out)])
    line = _one_error_line(capsys)
    assert code == 1 and "No space left on device" in line and str(out) in line
    assert not out.exists() or _leftovers(out) == []
