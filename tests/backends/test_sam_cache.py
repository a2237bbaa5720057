"""The SAM disk cache is a cache, never a source of truth: entries are read whole into memory
(a file changed under a loaded embedding cannot touch it), verified (content hash, shape, sizes,
finite values) and recomputed when bad, written atomically, and a failed write never fails a click.
A tiny real SAM (segment_anything classes built from a config) is used throughout."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import safetensors
import torch

from explorer.backends.sam import SamBackend
from explorer.core.jobs import Progress, run_sync
from explorer.testing.tiny import make_tiny_sam

LOGGER = "explorer.backends.sam"


@pytest.fixture(scope="module")
def sam_spec(tmp_path_factory):
    return make_tiny_sam(tmp_path_factory.mktemp("tiny-sam-cache"))


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "emb"


@pytest.fixture
def new_sam(sam_spec, cache):
    """``new_sam()`` -> a freshly loaded backend (empty memory cache) on the shared disk cache."""
    return lambda: SamBackend.load(sam_spec, disk_cache=cache)


def entries(cache):
    return sorted(cache.rglob("*.safetensors"))


def leftovers(cache):
    """Everything in the cache folder that is not a finished entry (temporary files)."""
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.suffix != ".safetensors")


def first_click(backend, emb):
    return backend.predict(emb, points=[[20, 30]])


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_loaded_embedding_is_independent_of_its_file(new_sam, cache, make_image):
    img = make_image(64, 48, seed=11)
    ref = run_sync(new_sam().embedding_job(img))
    (path,) = entries(cache)
    sam = new_sam()
    emb = run_sync(sam.embedding_job(img))
    assert emb.source == "disk" and sam.encoder_calls == 0
    expected = ref.features.clone()
    before = first_click(sam, emb)

    # another process rewrites the file in place (same size, zeros), then truncates it
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\0" * (size - size // 2))
        fh.flush()
        os.fsync(fh.fileno())
    assert torch.equal(emb.features, expected)
    os.truncate(path, 0)
    assert torch.equal(emb.features, expected)  # reading it would SIGBUS if it were still mapped
    after = first_click(sam, emb)
    np.testing.assert_array_equal(before[0].mask, after[0].mask)
    again = run_sync(sam.embedding_job(img))  # the next access is served from memory
    assert again.source == "memory" and sam.encoder_calls == 0
    assert torch.equal(again.features, expected)

    # a new session finds the truncated file, drops it and recomputes (then rewrites it)
    other = new_sam()
    fresh = run_sync(other.embedding_job(img))
    assert fresh.source == "computed" and other.encoder_calls == 1 and "damaged" in fresh.note
    torch.testing.assert_close(fresh.features, expected)
    assert run_sync(new_sam().embedding_job(img)).source == "disk"


def _flip_data(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data), 3):  # bytes inside the tensor data (at the end)
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_metadata(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    key = b'"input_size":"['
    i = header.index(key) + len(key)
    digit = header[i:i + 1]
    assert digit.isdigit()
    changed = header[:i] + (b"1" if digit != b"1" else b"2") + header[i + 1:]
    path.write_bytes(data[:8] + changed + data[8 + n:])


@pytest.mark.parametrize("flip", [_flip_data, _flip_metadata], ids=["tensor-bytes", "metadata"])
def test_flipped_bytes_are_deleted_and_recomputed(new_sam, cache, make_image, caplog, flip):
    img = make_image(40, 72, seed=12)
    ref = run_sync(new_sam().embedding_job(img))
    (path,) = entries(cache)
    flip(path)

    sam = new_sam()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert sam.cached_embedding(img) is None
    assert not path.exists()  # deleted, never trusted
    assert any("damaged" in m for m in warnings(caplog))
    emb = run_sync(sam.embedding_job(img))
    assert emb.source == "computed" and sam.encoder_calls == 1
    torch.testing.assert_close(emb.features, ref.features, rtol=0, atol=0)
    np.testing.assert_array_equal(first_click(sam, emb)[0].mask, first_click(sam, ref)[0].mask)
    reloaded = run_sync(new_sam().embedding_job(img))  # rewritten as a valid entry
    assert reloaded.source == "disk"
    torch.testing.assert_close(reloaded.features, ref.features, rtol=0, atol=0)


def _nan_bytes_in_place(sam, path, emb):
    """NaNs written over the tensor data; the header (and its hash) is left as it was."""
    data = bytearray(path.read_bytes())
    nan = np.full(8, np.nan, dtype=np.float32).tobytes()
    data[-len(nan):] = nan
    path.write_bytes(bytes(data))
    return "content hash mismatch"


def _forged_nan_entry(sam, path, emb):
    """A well-formed entry whose hash is consistent with its NaN values."""
    features = emb.features.clone()
    features[0, 0, 0, :3] = float("nan")
    path.write_bytes(sam._serialize(replace(emb, features=features)))
    return "non-finite"


def _forged_other_image(sam, path, emb):
    """A consistent entry of another image, copied under this image's name."""
    path.write_bytes(sam._serialize(replace(emb, sha256="0" * 64)))
    return "another image"


@pytest.mark.parametrize("corrupt", [_nan_bytes_in_place, _forged_nan_entry, _forged_other_image],
                         ids=["nan-hash-mismatch", "nan-consistent-hash", "other-image"])
def test_bad_values_are_rejected_and_recomputed(new_sam, cache, make_image, caplog, corrupt):
    img = make_image(64, 64, seed=13)
    writer = new_sam()
    ref = run_sync(writer.embedding_job(img))
    (path,) = entries(cache)
    why = corrupt(writer, path, ref)

    sam = new_sam()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        emb = run_sync(sam.embedding_job(img))
    assert emb.source == "computed" and sam.encoder_calls == 1
    assert torch.isfinite(emb.features).all()
    torch.testing.assert_close(emb.features, ref.features, rtol=0, atol=0)
    assert any(why in m for m in warnings(caplog)), warnings(caplog)
    assert why in emb.note
    masks = first_click(sam, emb)
    assert any(m.mask.any() for m in masks)
    assert run_sync(new_sam().embedding_job(img)).source == "disk"


class _FullDiskFile:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _fail_write(monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDiskFile(real(*a, **k)))


def _fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_replace(monkeypatch):
    def replace_(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", replace_)


def _fail_serialize(monkeypatch):
    import safetensors.torch

    def save(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save", save)


FAILURES = [_fail_write, _fail_fsync, _fail_replace, _fail_serialize]
FAILURE_IDS = ["write-enospc", "fsync-enospc", "replace-enospc", "safetensor-error"]


@pytest.mark.parametrize("fail", FAILURES, ids=FAILURE_IDS)
def test_a_failed_cache_write_is_a_warning_not_a_failed_click(new_sam, cache, make_image, caplog, monkeypatch,
                                                              fail):
    img = make_image(50, 64, seed=14)
    sam = new_sam()
    progress: list[Progress] = []
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger=LOGGER):
        fail(m)
        emb = run_sync(sam.embedding_job(img), on_progress=progress.append)
        masks = first_click(sam, emb)  # the click itself succeeds
    assert emb.source == "computed" and len(masks) == 3
    assert "not saved" in emb.note and "not saved" in progress[-1].message
    assert any("not saved" in m for m in warnings(caplog))
    assert entries(cache) == [] and leftovers(cache) == []
    assert run_sync(sam.embedding_job(img)).source == "memory" and sam.encoder_calls == 1
    # with the disk back, the next session computes and caches it
    assert run_sync(new_sam().embedding_job(img)).note == ""
    assert run_sync(new_sam().embedding_job(img)).source == "disk"


@pytest.mark.parametrize("fail", FAILURES, ids=FAILURE_IDS)
def test_a_failed_rewrite_keeps_the_earlier_entry(new_sam, cache, make_image, caplog, monkeypatch, fail):
    img = make_image(48, 48, seed=15)
    sam = new_sam()
    emb = run_sync(sam.embedding_job(img))
    (path,) = entries(cache)
    good = path.read_bytes()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger=LOGGER):
        fail(m)
        note = sam._save(emb)
    assert "not saved" in note and warnings(caplog)
    assert path.read_bytes() == good and leftovers(cache) == []
    assert run_sync(new_sam().embedding_job(img)).source == "disk"


def test_concurrent_writers_leave_a_complete_entry(new_sam, cache, make_image, caplog):
    img = make_image(64, 40, seed=16)
    a, b, reader = new_sam(), new_sam(), new_sam()
    ea = run_sync(a.embedding_job(img))
    assert run_sync(b.embedding_job(img)).source == "disk"  # b finds a's entry
    eb = replace(ea, features=ea.features.clone())  # each writer has its own tensor
    start = threading.Barrier(3)
    errors: list[BaseException] = []
    reads: list[str] = []
    stop = threading.Event()

    def write(backend, emb):
        try:
            start.wait()
            for _ in range(15):
                assert backend._save(emb) == ""
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def read():
        start.wait()
        while not stop.is_set():
            reader._memory.clear()
            got = reader.cached_embedding(img)
            reads.append("missing" if got is None else got.source)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        threads = [threading.Thread(target=write, args=(a, ea)), threading.Thread(target=write, args=(b, eb))]
        rt = threading.Thread(target=read)
        for t in threads + [rt]:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
        rt.join(60)
    assert not errors, errors
    assert reads and set(reads) == {"disk"}  # readers only ever saw a complete entry
    assert warnings(caplog) == []
    assert len(entries(cache)) == 1 and leftovers(cache) == []
    final = run_sync(new_sam().embedding_job(img))
    assert final.source == "disk"
    torch.testing.assert_close(final.features, ea.features, rtol=0, atol=0)


def test_stale_temporary_files_are_swept(new_sam, cache, make_image):
    sam = new_sam()
    sam.disk_cache.mkdir(parents=True)
    old, recent = sam.disk_cache / ".abc.old.tmp", sam.disk_cache / ".abc.recent.tmp"
    for p in (old, recent):
        p.write_bytes(b"partial")
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    run_sync(sam.embedding_job(make_image(32, 32, seed=17)))
    assert not old.exists() and recent.exists()  # a recent one may belong to a live writer


def test_entry_metadata_describes_the_entry(new_sam, cache, make_image):
    img = make_image(30, 60, seed=18)
    sam = new_sam()
    emb = run_sync(sam.embedding_job(img))
    (path,) = entries(cache)
    assert path.parent == sam.disk_cache and path.name == f"{img.sha256}.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        assert list(fh.keys()) == ["features"]
    assert meta["image_sha256"] == img.sha256 and meta["model"] == sam.model_key
    assert meta["shape"] == "[1, 32, 8, 8]" and meta["dtype"] == "torch.float32"
    assert meta["original_size"] == "[30, 60]" and meta["input_size"] == str(list(emb.input_size))
    assert len(meta["sha256"]) == 64
