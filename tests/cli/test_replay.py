"""``token-explorer replay``: a saved session drawn headless from its stored results."""

import json
import zipfile

import numpy as np
from PIL import Image

from explorer.cli.main import main


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_replay_draws_the_view_regions_and_comparison(session_bundle, tmp_path, capsys):
    path, model = session_bundle
    out = tmp_path / "replay"
    assert main(["replay", str(path), "--out", str(out)]) == 0
    assert "session.json" in capsys.readouterr().out
    summary = json.loads((out / "session.json").read_text())
    assert summary["method"] == "attention.rollout" and summary["image_sha256"] == model.image.sha256
    assert summary["models"]["clip"] == model.slot("clip").spec
    assert set(summary["files"]) == {"view", "regions", "compare"}  # no VLM answer in this session
    rgb = model.image.rgb
    # the view: at the image's size, and the stored result unchanged
    view = _png(out / "view.png")
    assert view.shape == rgb.shape and not np.array_equal(view, rgb)
    from explorer.core.results import load_result

    np.testing.assert_array_equal(load_result(out / "view.npz").token_values, model.view.result.token_values)
    # the regions land on their pixels: inside differs from the image, outside is untouched
    regions = _png(out / "regions.png")
    inside = np.zeros(rgb.shape[:2], bool)
    for r in model.regions:
        inside |= r.mask
    assert np.array_equal(regions[~inside], rgb[~inside])
    assert (regions[inside] != rgb[inside]).any(axis=-1).mean() > 0.9
    coco = json.loads((out / "regions.json").read_text())
    assert sorted(c["name"] for c in coco["categories"]) == ["left box", "right box"]
    from explorer.core.regions import rle_decode

    np.testing.assert_array_equal(rle_decode(coco["annotations"][0]["segmentation"]), list(model.regions)[0].mask)
    # the comparison: one tile per method, the stored metrics
    data = json.loads((out / "compare.json").read_text())
    assert data["methods"] == ["pruning.topk", "merging.tome"]
    for mid in data["methods"]:
        assert data["metrics"][mid]["cosine"] == model.comparison.metrics[mid]["cosine"]
    assert _png(out / "compare.png").shape[1] == 2 * 320


def test_replay_refuses_a_damaged_session(session_bundle, tmp_path, capsys):
    path, _ = session_bundle
    broken = tmp_path / "broken.tesession"
    broken.write_bytes(path.read_bytes()[:200])
    assert main(["replay", str(broken), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "not a readable session" in err
    newer = tmp_path / "newer.tesession"
    with zipfile.ZipFile(path) as zf, zipfile.ZipFile(newer, "w") as out:
        for name in zf.namelist():
            blob = zf.read(name)
            if name == "session.json":
                meta = json.loads(blob)
                meta["schema_version"] += 1
                blob = json.dumps(meta).encode()
            out.writestr(name, blob)
    assert main(["replay", str(newer), "--out", str(tmp_path / "o")]) == 1
    assert "newer version" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a refused session
