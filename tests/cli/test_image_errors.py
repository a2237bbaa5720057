"""``token-explorer run`` on damaged or special image files: one ``error:`` line naming the reason,
a non-zero exit, no model touched (the model spec points nowhere); a JPEG whose EXIF is damaged
still runs."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from explorer.cli.main import main


def _noise(h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bad_crc() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_noise()).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[29] ^= 0xFF  # first byte of the IHDR chunk's CRC (8 signature + 8 header + 13 data)
    return bytes(data)


def _avif_header() -> bytes:
    return b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64)


def _jpeg_bad_exif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_noise()).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    ifd = struct.pack("<H", 2) + struct.pack("<HHII", 0x0128, 2, 2, 3) + struct.pack("<HHII", 0x011A, 7, 1, 3)
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(28)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _run(path, tmp_path, model: str = "local-dir:/nonexistent") -> list[str]:
    return ["run", str(path), "--model", model, "--method", "attention.raw", "--out", str(tmp_path / "x.png")]


@pytest.mark.parametrize("kind, reason", [
    ("crc", "the file is damaged (PNG checksum error)"),
    ("avif", None),
    ("fifo", "not a regular file (a named pipe)"),
    ("zero", "not a regular file (a character device)"),
])
def test_one_error_line_per_file(tmp_path, capsys, kind, reason):
    if kind == "crc":
        path = tmp_path / "crc.png"
        path.write_bytes(_png_bad_crc())
    elif kind == "avif":
        path = tmp_path / "x.avif"
        path.write_bytes(_avif_header())
        reason = ("the file is damaged (AVIF could not be read)" if features.check("avif")
                  else "AVIF is not supported (convert it to PNG or JPEG)")
    elif kind == "fifo":
        path = tmp_path / "pipe.png"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
    code = main(_run(path, tmp_path))
    err = capsys.readouterr().err.splitlines()
    assert code != 0
    assert err == [f"error: cannot read '{path}': {reason}"]


def test_jpeg_with_damaged_exif_still_runs(tmp_path, capsys, tiny_clip_spec):
    path = tmp_path / "exif.jpg"
    path.write_bytes(_jpeg_bad_exif())
    code = main(_run(path, tmp_path, tiny_clip_spec.canonical()) + ["--quiet"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "x.png") as im:
        assert im.size == (64, 48)


def test_the_command_does_not_block_on_a_named_pipe(tmp_path):
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    done = subprocess.run([sys.executable, "-m", "explorer", *_run(pipe, tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.splitlines() == [f"error: cannot read '{pipe}': not a regular file (a named pipe)"]
