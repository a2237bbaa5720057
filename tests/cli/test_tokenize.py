"""``token-explorer tokenize``: ids, reconstruction, every token's influence, PSNR per prefix."""

import json

import numpy as np
import pytest
from PIL import Image

from explorer.cli.main import main
from explorer.core.results import load_result


@pytest.fixture(scope="module")
def tok_spec(tmp_path_factory):
    from explorer.testing.tiny_tokenizer import make_tiny_titok

    return make_tiny_titok(tmp_path_factory.mktemp("tok") / "t", legacy=True).canonical()


def test_tokenize_writes_ids_reconstruction_and_every_influence(tok_spec, image_file, tmp_path, capsys):
    img = image_file(48, 64)
    out = tmp_path / "out"
    assert main(["tokenize", str(img), "--model", tok_spec, "--out", str(out), "--quiet"]) == 0
    assert "8 tokens (1D)" in capsys.readouterr().out
    info = json.loads((out / "tokens.json").read_text())
    assert len(info["ids"]) == 8 and info["frame"] == [32, 32] and set(info["prefix_psnr"]) == {str(k) for k in range(1, 9)}
    assert info["prefix_psnr"]["8"] == pytest.approx(info["psnr"], abs=1e-4)  # the whole prefix is the reconstruction
    with np.load(out / "influence.npz") as z:
        assert z["maps"].shape == (8, 32, 32) and (z["maps"] >= 0).all() and list(z["ids"]) == info["ids"]
    assert len(list((out / "influence").glob("token-*.png"))) == 8
    with Image.open(out / "reconstruction.png") as im:
        assert im.size == (32, 32)


def test_tokenize_runs_one_method(tok_spec, image_file, tmp_path, capsys):
    img = image_file(40, 40)
    out = tmp_path / "m"
    assert main(["tokenize", str(img), "--model", tok_spec, "--out", str(out), "--method", "tok.prefix",
                 "--param", "k=3"]) == 0
    result = load_result(out / "tok.prefix.npz")
    assert result.k == 3 and result.rgb.shape == (32, 32, 3) and list(result.ids[3:]) == [-1] * 5
    assert (out / "tok.prefix.png").is_file()
    assert main(["tokenize", str(img), "--model", tok_spec, "--out", str(out), "--method", "attention.raw"]) == 1
    assert "not a tokenizer method" in capsys.readouterr().err
    assert main(["tokenize", str(img), "--model", "clip:demo", "--out", str(out)]) == 2
    assert "give a tokenizer" in capsys.readouterr().err


def test_tokenize_counts_the_codes_of_a_folder(tok_spec, image_file, tmp_path):
    img = image_file(40, 40, "a.png")
    image_file(40, 52, "b.png")
    out = tmp_path / "cb"
    assert main(["tokenize", str(img), "--model", tok_spec, "--out", str(out), "--method", "tok.codebook",
                 "--param", f"folder={img.parent}", "--token", "1", "--quiet"]) == 0
    info = json.loads((out / "tok.codebook.json").read_text())
    assert info["images"] == 2 and info["tokens"] == 16 and sum(info["counts"]) == 16
    assert info["used"] == sum(c > 0 for c in info["counts"]) and len(info["dead"]) == info["codes"] - info["used"]
    result = load_result(out / "tok.codebook.npz")
    assert result.meta["token"] == 1 and result.regions.shape == (info["codes"], 32, 32)
    with Image.open(out / "tok.codebook-histogram.png") as im:
        assert im.size == (640, 160)
    assert (out / "tok.codebook-regions.png").is_file()
