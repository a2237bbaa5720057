"""Output files: checked before the work, written whole or not at all, never half of two writers."""

import errno
import os
import stat
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from explorer.core.atomic import (OutputError, atomic_write, check_output_dir, check_output_path, save_image_atomic,
                                  write_bytes_atomic, write_text_atomic)


def _leftovers(folder):
    """Temporary or probe files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _no_space(*args, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_output_error_is_one_line_and_both_kinds_of_error():
    err = OutputError("out/x.png", "No space left on device", errno.ENOSPC)
    assert isinstance(err, ValueError) and isinstance(err, OSError)
    assert str(err) == "cannot write 'out/x.png': No space left on device" and err.errno == errno.ENOSPC


def test_writes_create_folders_and_replace_whole_files(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "b" / "t.txt", "hello")
    assert path.read_text() == "hello"
    write_bytes_atomic(path, b"again")
    assert path.read_bytes() == b"again"
    # a new file gets the umask's permissions, an existing one keeps its own
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    os.chmod(path, 0o640)
    write_text_atomic(path, "third")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "third"
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_full_disk_keeps_the_earlier_file_and_leaves_nothing(tmp_path, monkeypatch, where):
    path = tmp_path / "r.npz"
    write_bytes_atomic(path, b"earlier good output")
    if where == "fsync":
        monkeypatch.setattr("explorer.core.atomic.os.fsync", _no_space)
    elif where == "replace":
        monkeypatch.setattr("explorer.core.atomic.os.replace", _no_space)
    with pytest.raises(OutputError) as info:
        with atomic_write(path) as fh:
            fh.write(b"new bytes")
            if where == "write":
                _no_space()
    monkeypatch.undo()
    assert str(info.value) == f"cannot write '{path}': No space left on device"
    assert path.read_bytes() == b"earlier good output"
    assert _leftovers(tmp_path) == []


def test_an_exception_while_writing_keeps_the_earlier_file_and_removes_new_folders(tmp_path):
    path = tmp_path / "x.json"
    write_text_atomic(path, "{}")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path, "w") as fh:
            fh.write('{"half":')
            raise RuntimeError("boom")
    assert path.read_text() == "{}" and _leftovers(tmp_path) == []
    deep = tmp_path / "new" / "deeper" / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_write(deep, "w"):
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()


def test_npz_zip_and_images_go_through_the_open_file(tmp_path):
    with atomic_write(tmp_path / "a.npz") as fh:
        np.savez_compressed(fh, x=np.arange(5))
    assert np.load(tmp_path / "a.npz")["x"].tolist() == [0, 1, 2, 3, 4]
    with atomic_write(tmp_path / "a.zip") as fh, zipfile.ZipFile(fh, "w") as zf:
        zf.writestr("m.txt", "mask")
    assert zipfile.ZipFile(tmp_path / "a.zip").read("m.txt") == b"mask"
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    save_image_atomic(tmp_path / "i.png", rgb)
    save_image_atomic(tmp_path / "j.png", Image.fromarray(rgb), "PNG")
    for name in ("i.png", "j.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im), rgb)


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    write_bytes_atomic(fifo, b"streamed")
    reader.join(10)
    assert got == [b"streamed"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_two_writers_of_one_path_leave_one_complete_file(tmp_path):
    path = tmp_path / "same.png"
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors = []

    def writer(rgb):
        try:
            for _ in range(8):
                barrier.wait(10)
                save_image_atomic(path, rgb, "PNG")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(im,)) for im in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with Image.open(path) as im:
        im.load()
        final = np.asarray(im)
    assert any(np.array_equal(final, rgb) for rgb in images)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing folder", "file as parent", "directory", "trailing slash", "long name",
                                  "extension", "no extension", "nul"])
def test_check_output_path_refuses_with_one_line(tmp_path, case):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir()
    path, needle = {
        "missing folder": (tmp_path / "nope" / "x.png", "does not exist"),
        "file as parent": (tmp_path / "f.txt" / "x.png", "is a file, not a folder"),
        "directory": (tmp_path / "d", "it is a folder"),
        "trailing slash": (str(tmp_path / "new") + "/", "names a folder"),
        "long name": (tmp_path / ("n" * 300 + ".png"), "too long"),
        "extension": (tmp_path / "x.jpg", "unknown extension .jpg: use .png or .npz"),
        "no extension": (tmp_path / "x", "unknown extension (none)"),
        "nul": (str(tmp_path / "x\0.png"), "NUL"),
    }[case]
    with pytest.raises(OutputError) as info:
        check_output_path(path, (".png", ".npz"), create_parents=False)
    text = str(info.value)
    assert isinstance(info.value, ValueError) and len(text.splitlines()) == 1
    assert text.startswith("cannot write '") and needle in text
    assert _leftovers(tmp_path) == []


def test_check_output_path_accepts_new_folders_and_existing_files(tmp_path):
    assert check_output_path(tmp_path / "new" / "deeper" / "x.png", (".png",)) == tmp_path / "new" / "deeper" / "x.png"
    assert not (tmp_path / "new").exists()
    (tmp_path / "old.PNG").write_bytes(b"x")
    check_output_path(tmp_path / "old.PNG", (".png",))
    check_output_path(tmp_path / "any.thing")
    assert _leftovers(tmp_path) == []


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    def read_only(*args, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("explorer.core.atomic.tempfile.mkstemp", read_only)
    with pytest.raises(OutputError, match="is not writable \\(Read-only file system\\)"):
        check_output_path(tmp_path / "x.png", (".png",))
    with pytest.raises(OutputError, match="Read-only file system"):
        write_text_atomic(tmp_path / "x.txt", "x")
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permissions")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(ro / "x.png")
        with pytest.raises(OutputError, match="Permission denied"):
            write_text_atomic(ro / "x.txt", "x")
    finally:
        ro.chmod(0o755)


def test_check_output_dir(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    check_output_dir(tmp_path)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f.txt")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f.txt" / "sub")
    with pytest.raises(OutputError, match="too long"):
        check_output_dir(tmp_path / ("d" * 300))
    with pytest.raises(OutputError, match="does not exist"):
        check_output_dir(tmp_path / "absent" / "x", create=False)
