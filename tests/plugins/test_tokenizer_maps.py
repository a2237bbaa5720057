"""The tokenizer methods on tiny tokenizers: maps land in the model's frame, replacements are the
ones named, attention rows are the encoder's, prefixes, swaps and region rankings add up."""

import numpy as np
import pytest
import torch

from explorer.core.image_io import image_from_array
from explorer.core.jobs import run_sync
from explorer.core.results import Heatmap, Reconstruction, TokenScores
from explorer.core.target import Target
from explorer.plugin_host.engine import Engine
from explorer.testing.tiny_tokenizer import make_tiny_grid, make_tiny_titok


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"titok": make_tiny_titok(root / "titok", legacy=False).canonical(),
            "grid": make_tiny_grid(root / "grid").canonical()}


def _image(h=40, w=60, seed=0):
    return image_from_array((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8), "img")


def _run(spec, method, params=None, target=Target(), image=None):
    engine = Engine()
    image = image or _image()
    return engine, run_sync(engine.run_job(spec, image, method, params or {}, target))


@pytest.mark.parametrize("kind", ["titok", "grid"])
def test_influence_maps_live_in_the_crop(specs, kind):
    image = _image()  # 40x60: the centre crop keeps columns 10..50
    engine, hm = _run(specs[kind], "tok.influence", {"replace": "tail"}, Target(tokens=(1,)), image)
    assert isinstance(hm, Heatmap) and hm.token_values.size == 32 * 32 and (hm.token_values >= 0).all()
    raster = hm.to_image(image.size)
    assert np.isnan(raster[:, :10]).all() and np.isnan(raster[:, 50:]).all()
    assert np.isfinite(raster[:, 10:50]).all()
    # by hand: decode with token 1 set aside, |change| averaged over the colours
    from explorer.backends.registry import load_backend

    backend = load_backend(specs[kind])
    prep = backend.prepare(image)
    ids, _ = backend.encode(prep.pixels)
    keep = torch.ones(1, ids.shape[1], dtype=torch.bool)
    keep[0, 1] = False
    expected = (backend.decode_ids(ids, keep)[0] - backend.decode_ids(ids)[0]).abs().mean(0)
    np.testing.assert_allclose(hm.token_values, expected.numpy().reshape(-1), atol=1e-6)


def test_nearest_and_random_replacements(specs):
    from explorer_plugins.tokenizer_maps.method import replaced

    from explorer.backends.registry import load_backend

    backend = load_backend(specs["grid"])
    ids, _ = backend.encode(backend.prepare(_image()).pixels)
    ids = ids[0]
    near, keep = replaced(backend, ids, [3], "nearest")
    codes = backend.codebook()
    sims = codes @ codes[ids[3]]
    sims[ids[3]] = -np.inf
    assert keep is None and int(near[3]) == int(sims.argmax()) and torch.equal(near[:3], ids[:3])
    rnd, _ = replaced(backend, ids, [3], "random", seed=5)
    assert int(rnd[3]) != int(ids[3]) and 0 <= int(rnd[3]) < codes.shape[0]


def test_encoder_attention_rows_and_rollout(specs):
    engine, hm = _run(specs["titok"], "tok.attention", {"layer": 1, "head": -1}, Target(tokens=(2,)))
    assert hm.token_values.shape == (16,)  # the 4x4 patches
    assert 0 < hm.token_values.sum() <= 1 + 1e-5  # the share of the latent's attention paid to patches
    _, roll = _run(specs["titok"], "tok.attention", {"rollout": True}, Target(tokens=(2,)))
    assert roll.token_values.shape == (16,) and 0 < roll.token_values.sum() <= 1 + 1e-5
    assert not np.allclose(roll.token_values, hm.token_values)


def test_prefix_swap_and_region_ranking(specs):
    image = _image(32, 32, 1)
    other = _image(32, 32, 2)
    _, full = _run(specs["titok"], "tok.prefix", {"k": 0}, image=image)
    assert isinstance(full, Reconstruction) and full.k == 8 and full.rgb.shape == (32, 32, 3)
    mse = float(np.mean((full.rgb - image.rgb / 255.0) ** 2))
    assert full.psnr == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)  # the crop is the whole image here
    _, two = _run(specs["titok"], "tok.prefix", {"k": 2}, image=image)
    assert two.k == 2 and list(two.ids[2:]) == [-1] * 6
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        Image.fromarray(other.rgb).save(f"{d}/o.png")
        Image.fromarray(image.rgb).save(f"{d}/same.png")
        _, same = _run(specs["grid"], "tok.swap", {"other": f"{d}/same.png", "tokens": "0-15"}, image=image)
        assert np.abs(same.error.token_values).max() == 0  # the same image's tokens change nothing
        _, swapped = _run(specs["grid"], "tok.swap", {"other": f"{d}/o.png", "tokens": "0-15"}, image=image)
        _, other_full = _run(specs["grid"], "tok.prefix", {"k": 0}, image=other)
        np.testing.assert_allclose(swapped.rgb, other_full.rgb, atol=1e-6)  # every token swapped: the other image
    region = np.ones((32, 32), bool)
    _, scores = _run(specs["grid"], "tok.region", {}, Target(region=region), image)
    assert isinstance(scores, TokenScores) and scores.scores.shape == (16,)
    np.testing.assert_allclose(scores.scores[np.isfinite(scores.scores) & (scores.scores > 0)], 1.0, atol=1e-5)
    half = np.zeros((32, 32), bool)
    half[:, :16] = True
    _, left = _run(specs["grid"], "tok.region", {}, Target(region=half), image)
    assert ((left.scores >= 0) & (left.scores <= 1 + 1e-6)).all()
    with pytest.raises(ValueError, match="region"):
        _run(specs["grid"], "tok.region", {}, Target(), image)


def test_gradient_map_is_in_the_frame(specs):
    _, g = _run(specs["titok"], "tok.gradient", {}, Target(tokens=(0,)))
    assert g.token_values.size == 32 * 32 and (g.token_values >= 0).all() and g.token_values.max() > 0


def test_codebook_usage_counts_every_token_of_the_folder(specs, tmp_path):
    """Counts add up to images x tokens and equal the ids encoded one by one; a code's mean region
    is the mean of the normalised influence maps of the tokens that got it; unreadable files are
    listed, not fatal; the result saves and loads."""
    from PIL import Image

    from explorer.backends.registry import load_backend
    from explorer.core.results import CodebookUsage, load_result, save_result
    from explorer_plugins.tokenizer_maps.method import _influence

    folder = tmp_path / "imgs"
    folder.mkdir()
    arrays = [(np.random.default_rng(10 + i).random((32, 32, 3)) * 255).astype(np.uint8) for i in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    backend = load_backend(specs["grid"])
    engine, usage = _run(specs["grid"], "tok.codebook", {"folder": str(folder), "region_size": 8},
                         Target(tokens=(2,)))
    assert isinstance(usage, CodebookUsage) and usage.images == 3 and len(usage.skipped) == 1
    K = backend.codebook().shape[0]
    expected = np.zeros(K, np.int64)
    sums = np.zeros((K, 8, 8))
    for a in arrays:
        ids, _ = backend.encode(backend.prepare(image_from_array(a, "x")).pixels)
        expected += np.bincount(ids[0].numpy(), minlength=K)
        recon = backend.decode_ids(ids)[0]
        stack = _influence(backend, ids[0], recon).numpy()
        for t, c in enumerate(ids[0].numpy()):
            m = stack[t] / stack[t].sum()
            sums[c] += m.reshape(8, 4, 8, 4).mean((1, 3))  # 32x32 frame pooled to 8x8
    np.testing.assert_array_equal(usage.counts, expected)
    assert usage.counts.sum() == 3 * backend.token_count
    used = expected > 0
    np.testing.assert_allclose(usage.regions[used], sums[used] / expected[used, None, None], rtol=1e-4, atol=1e-7)
    assert np.isnan(usage.regions[~used]).all()
    np.testing.assert_array_equal(usage.dead, np.flatnonzero(~used))
    assert 1.0 <= usage.perplexity <= used.sum()
    # another token of the same image: the folder is not encoded again, the map is its code's region
    _, usage2 = _run(specs["grid"], "tok.codebook", {"folder": str(folder), "region_size": 8}, Target(tokens=(5,)))
    np.testing.assert_array_equal(usage2.counts, usage.counts)
    code = int(usage2.ids[5])
    region = usage.regions[code] / usage.regions[code].mean()  # drawn relative to an even spread
    np.testing.assert_allclose(usage2.map.token_values.reshape(32, 32)[::4, ::4], region, rtol=1e-5)
    path = save_result(usage, tmp_path / "usage.npz")
    back = load_result(path)
    np.testing.assert_array_equal(back.counts, usage.counts)
    np.testing.assert_array_equal(back.map.token_values, usage.map.token_values)



@pytest.mark.parametrize("method_id", ["tok.influence", "tok.attention", "tok.gradient", "tok.prefix", "tok.swap",
                                       "tok.region", "tok.codebook"])
def test_every_tokenizer_method_can_be_cancelled(specs, method_id, tmp_path):
    from explorer.backends.registry import load_backend
    from explorer.core.trace import CaptureSpec
    from explorer.plugin_host.host import PluginHost
    from explorer.testing.conformance import check_cancellation

    host = PluginHost()
    backend = load_backend(specs["titok"])
    image = _image()
    trace = run_sync(backend.trace(image, CaptureSpec(attention_layers=frozenset(range(backend.info.n_layers)))))
    region = np.zeros(image.size, bool)
    region[10:30, 20:40] = True
    values = {"tok.swap": {"other": str(_png(tmp_path))}, "tok.codebook": {"folder": str(tmp_path)}}.get(method_id, {})
    check_cancellation(host.load(method_id), trace, host.make_params(method_id, values),
                       Target(tokens=(1,), region=region), backend=backend, name=method_id)


def _png(folder):
    from PIL import Image

    path = folder / "other.png"
    Image.fromarray((np.random.default_rng(3).random((40, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path
