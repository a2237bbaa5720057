"""The headless CLI, in process: outputs at the original size, bad input fails fast and clearly."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from explorer.cli.main import main


@pytest.fixture
def spec(tiny_clip_spec):
    return tiny_clip_spec.canonical()


def test_run_writes_overlay_png_at_original_size(tmp_path, image_file, spec, capsys):
    img = image_file(123, 211)
    out = tmp_path / "overlay.png"
    assert main(["run", str(img), "--model", spec, "--method", "attention.rollout", "--out", str(out), "--quiet"]) == 0
    with Image.open(out) as im:
        assert im.size == (211, 123)
        arr = np.asarray(im)
    original = np.asarray(Image.open(img))
    # the tiny model sees the centred 123x123 crop: outside it the image is untouched
    assert np.array_equal(arr[:, :40], original[:, :40])
    assert not np.array_equal(arr[:, 60:150], original[:, 60:150])


def test_run_writes_raw_npz(tmp_path, image_file, spec):
    out = tmp_path / "r.npz"
    code = main(["run", str(image_file(64, 96)), "--model", spec, "--method", "similarity.maskclip",
                 "--text", "a red circle", "--text", "a blue square", "--param", "mode=softmax", "--out", str(out), "--quiet"])
    assert code == 0
    data = np.load(out)
    meta = json.loads(str(data["meta"]))
    assert meta["type"] == "Heatmap" and meta["method"] == "similarity.maskclip"
    assert data["token_values"].shape == (64,)
    assert data["pixels"].shape == (64, 96)


def test_query_by_pixel(tmp_path, image_file, spec):
    out = tmp_path / "q.npz"
    assert main(["run", str(image_file(64, 64)), "--model", spec, "--method", "attention.raw", "--query-xy", "20,44",
                 "--out", str(out), "--quiet"]) == 0
    meta = json.loads(str(np.load(out)["meta"]))
    # pixel (20, 44) is in patch row 5, col 2 of the 8x8 grid -> sequence index 1 + 5*8 + 2
    assert meta["meta"]["query"] == 43


def test_methods_and_plugins_lists(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "attention.rollout" in out and "Abnar" in out and "similarity.maskclip" in out
    assert main(["methods", "-v"]) == 0
    assert "--param discard_ratio=0.0" in capsys.readouterr().out
    assert main(["plugins"]) == 0
    assert "ok     attention-rollout" in capsys.readouterr().out


def _png_header_only(path, w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    jpg = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:3000])
    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(tiny)
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 30000, 30000)
    return {"text": text, "truncated": jpg, "1x1": tiny, "30000x30000": huge}


@pytest.mark.parametrize("kind", ["text", "truncated", "1x1", "30000x30000"])
def test_bad_images_fail_fast_with_one_line(tmp_path, kind, capsys):
    path = _bad_inputs(tmp_path)[kind]
    # the model spec points nowhere: the image must be refused before any model is touched
    code = main(["run", str(path), "--model", "local-dir:/nonexistent", "--method", "attention.rollout",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert path.name in err
    assert not (tmp_path / "o.png").exists()


def test_bad_method_param_and_model(tmp_path, image_file, spec, capsys):
    img = str(image_file())
    assert main(["run", img, "--model", spec, "--method", "nope", "--out", str(tmp_path / "o.png")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["run", img, "--model", spec, "--method", "attention.rollout", "--param", "discard_ratio=2",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "discard_ratio" in capsys.readouterr().err
    assert main(["run", img, "--model", spec, "--method", "similarity.maskclip", "--out", str(tmp_path / "o.png")]) == 2
    assert "--text" in capsys.readouterr().err
    assert main(["run", img, "--model", "ViT-Nope-1", "--method", "attention.rollout", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown open_clip architecture" in err[0]
    assert main(["run", img, "--model", spec, "--method", "attention.raw", "--out", str(tmp_path / "o.jpg")]) == 2


def test_eval_commands_write_their_table_and_refuse_bad_input(tmp_path, spec, capsys):
    out = tmp_path / "docs" / "maps.md"
    assert main(["eval-maps", "--model", spec, "--scenes", "1", "--method", "attention.raw",
                 "--deletion-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() in printed and "`attention.raw`" in out.read_text()
    assert main(["eval-reduction", "--model", spec, "--scenes", "0"]) != 0
    assert "--scenes must be at least 1" in capsys.readouterr().err
    assert main(["eval-maps", "--model", spec, "--scenes", "1", "--method", "no.such"]) != 0
    assert "unknown map method" in capsys.readouterr().err
