"""The session model without Qt: transactions, a canvas that describes one result, state that
belongs to an image, comparisons that cannot mix, and bundles that save and reopen it."""

import zipfile

import numpy as np
import pytest

from explorer.core.bundle import SCHEMA_VERSION, BundleError, apply_bundle, read_bundle, save_session
from explorer.core.image_io import load_image
from explorer.core.layout import Geometry, TokenLayout
from explorer.core.results import Heatmap, Metrics, RegionMask, TokenSelection
from explorer.core.session import SessionModel, VlmAnswer
from explorer.core.trace import ModelInfo
from explorer.testing.images import png_bytes


class Recorder:
    """Every event of a model, in order: ``(name, args)``."""

    def __init__(self, model: SessionModel) -> None:
        self.seen = []
        for name in ("image", "model", "method", "params", "prompts", "query", "display", "view", "message", "regions",
                     "sam_prompt", "vlm", "vlm_tokens", "comparison", "comparison_item"):
            getattr(model.events, name).connect(lambda *args, name=name: self.seen.append((name, args)))

    def names(self):
        return [n for n, _ in self.seen]


def _image(tmp_path, seed=0, name="img.png"):
    path = tmp_path / name
    path.write_bytes(png_bytes(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)))
    return load_image(path), str(path)


def _info(name="tiny"):
    return ModelInfo(kind="clip", spec=f"clip:{name}", name=name, n_layers=3, n_heads=4, width=16)


def _heatmap(image, label="map"):
    layout = TokenLayout.single_grid(Geometry.identity(image.size), 2, 2)
    return Heatmap(layout=layout, token_values=np.arange(4.0), label=label)


class Params:
    """A stand-in parameter model (``model_dump`` and equality, as pydantic models have)."""

    def __init__(self, **values):
        self.values = values

    def model_dump(self, mode="python"):
        return dict(self.values)

    def __eq__(self, other):
        return isinstance(other, Params) and other.values == self.values


def test_a_failed_load_keeps_the_working_model_and_says_so_once():
    m = SessionModel("demo")
    rec = Recorder(m)
    m.begin_load("clip", "demo")
    m.load_succeeded("clip", "demo", _info("demo"))
    assert m.slot("clip").ready and m.model_spec == "demo"
    m.begin_load("clip", "ViT-B-16@openai")
    assert m.slot("clip").spec == "demo" and m.slot("clip").loading == "ViT-B-16@openai"  # still in use meanwhile
    m.load_failed("clip", "ViT-B-16@openai", "could not fetch weights: no network")
    slot = m.slot("clip")
    assert slot.spec == "demo" and slot.info.name == "demo" and slot.loading is None
    assert slot.error.startswith("could not fetch")
    assert m.message.kind == "error" and "demo stays in use" in m.message.text
    assert rec.names().count("message") == 1
    # a late success of a superseded load does not replace a newer one
    m.begin_load("clip", "b")
    m.load_succeeded("clip", "a", _info("a"))
    assert m.slot("clip").spec == "demo"


def test_the_view_describes_one_result_or_says_why_not(tmp_path):
    m = SessionModel()
    img, path = _image(tmp_path)
    m.set_method("attention.raw", Params(layer=-1))
    m.set_image(img, path)
    assert m.view.busy and m.view.result is None
    hm = _heatmap(img)
    assert m.show_result(hm, "attention.raw", img.sha256, "demo")
    assert m.view.result is hm and m.view.current("attention.raw", img.sha256, "demo")
    # a method switch invalidates the shown map at once: no old map under a new title
    m.set_method("similarity.maskclip", Params())
    assert m.view.result is None and m.view.busy and m.view.method_id == "similarity.maskclip"
    # a late result of the previous method is refused
    assert not m.show_result(hm, "attention.raw", img.sha256)
    m.show_note("MaskCLIP needs a text prompt")
    assert m.view.result is None and not m.view.busy and m.view.label == "MaskCLIP needs a text prompt"
    # parameters, prompts and query of the current method invalidate too
    assert m.show_result(hm, "similarity.maskclip", img.sha256)
    m.set_params("similarity.maskclip", Params(mode="softmax"))
    assert m.view.busy
    m.set_params("attention.raw", Params(layer=0))  # another method's parameters: the view stays
    assert m.view.busy and m.view.method_id == "similarity.maskclip"


def test_a_new_image_starts_its_query_regions_prompt_and_comparison_over(tmp_path):
    m = SessionModel()
    a, pa = _image(tmp_path, 0, "a.png")
    b, pb = _image(tmp_path, 1, "b.png")
    m.set_method("attention.raw", Params())
    m.set_image(a, pa)
    m.set_query(7)
    m.add_point(3, 4, True)
    m.set_candidates([RegionMask(mask=np.ones(a.size, bool), score=0.9)])
    region = m.add_region_from_candidate("thing")
    assert region.name == "thing" and m.region_id == region.id and not m.sam_prompt.points
    m.start_comparison("maps", ["attention.raw"])
    layout = TokenLayout.single_grid(Geometry.identity(a.size), 2, 2)
    m.set_vlm_answer(VlmAnswer("vlm:demo", "q", _vlm_trace(layout, a.sha256), tokens=(0,)))
    rec = Recorder(m)
    m.set_image(b, pb)
    assert m.query is None and len(m.regions) == 0 and m.region_id is None and m.comparison is None
    assert m.vlm is not None and m.vlm_for_image() is None  # the answer names the other image
    assert {"image", "query", "regions", "sam_prompt", "comparison", "view"} <= set(rec.names())


def test_comparisons_never_mix(tmp_path):
    m = SessionModel()
    img, path = _image(tmp_path)
    m.set_image(img, path)
    first = m.start_comparison("maps", ["attention.raw", "similarity.maskclip"])
    second = m.start_comparison("reduction", ["pruning.topk"])
    assert not m.comparison_result(first.id, "attention.raw", _heatmap(img))  # late: refused
    assert not m.comparison_result(second.id, "similarity.maskclip", _heatmap(img))  # not one of its methods
    sel = TokenSelection(layout=_heatmap(img).layout, kept=np.array([1, 0, 1, 1], bool))
    assert m.comparison_result(second.id, "pruning.topk", sel, {"cosine": 0.9})
    assert m.comparison.results == {"pruning.topk": sel} and m.comparison.done


def _vlm_trace(layout, sha):
    from explorer.core.generation import Generation
    from explorer.core.trace import CaptureSpec, Trace

    gen = Generation(ids=[5, 6], tokens=[" a", " ring"], text="a ring",
                     attention={0: np.random.default_rng(0).random((2, 2, 4)).astype(np.float32)},
                     image_mass=np.ones((2, 1), np.float32), kept={0: np.arange(4)}, prefill_seconds=0.1, seconds=0.2,
                     prompt_length=9)
    info = ModelInfo(kind="vlm", spec="vlm:demo", name="demo", n_layers=1, n_heads=2, width=8)
    return Trace(layout=layout, model=info, image_sha256=sha, capture=CaptureSpec(),
                 extras={"generation": gen, "prompt": "q"})


def test_a_bundle_reopens_the_same_session(tmp_path):
    m = SessionModel("demo")
    img, path = _image(tmp_path)
    m.begin_load("clip", "demo")
    m.load_succeeded("clip", "demo", _info("demo"))
    m.set_method("attention.raw", Params(layer=-1, head=2))
    m.set_params("attention.rollout", Params(start_layer=1))
    m.set_image(img, path)
    m.set_prompts(("a red ring", "a blue star"))
    m.set_query(3)
    m.set_display(colormap="magma", opacity=0.4, overlay=False)
    hm = _heatmap(img)
    m.show_result(hm, "attention.raw", img.sha256, "demo")
    mask = np.zeros(img.size, bool)
    mask[5:20, 7:30] = True
    r = m.edit_regions("add", mask, "box", score=0.8)
    m.edit_regions("update", r.id, caption="a red ring", labels=(("a red ring", 0.7),))
    m.edit_regions("set_visible", r.id, False)
    m.set_vlm_answer(VlmAnswer("vlm:demo", "q", _vlm_trace(hm.layout, img.sha256), tokens=(1,)))
    c = m.start_comparison("reduction", ["pruning.topk"], keep=0.5, layer=1)
    sel = TokenSelection(layout=hm.layout, kept=np.array([1, 0, 1, 1], bool), meta={"embedding": np.ones(3)})
    m.comparison_result(c.id, "pruning.topk", sel, {"cosine": 0.93, "kept": 3.0})
    m.comparison_agreement(c.id, np.ones((1, 1)), np.array([["iou"]], dtype=object))
    m.comparison_sweep(c.id, (0.5, 0.25), {"pruning.topk": [Metrics(values={"cosine": 0.9}), None]})
    out = save_session(m, tmp_path / "s")
    assert out.name == "s.tesession"

    def make_params(mid, values):
        return Params(**values)

    n = SessionModel()
    rec = Recorder(n)
    apply_bundle(read_bundle(out), n, make_params)
    assert n.image.sha256 == img.sha256 and n.models["clip"].wanted == "demo"
    assert n.method_id == "attention.raw" and n.params["attention.raw"] == Params(layer=-1, head=2)
    assert n.params["attention.rollout"] == Params(start_layer=1)
    assert n.prompts == ("a red ring", "a blue star") and n.query == 3
    assert (n.colormap, n.opacity, n.overlay) == ("magma", 0.4, False)
    np.testing.assert_array_equal(n.view.result.token_values, hm.token_values)
    assert n.view.current("attention.raw", img.sha256, None)  # shown without a model; kept until one is back
    [r2] = list(n.regions)
    assert (r2.id, r2.name, r2.visible, r2.caption, r2.labels) == (r.id, "box", False, "a red ring", (("a red ring", 0.7),))
    np.testing.assert_array_equal(r2.mask, mask)
    assert n.vlm.tokens == (1,) and n.vlm.generation.text == "a ring"
    np.testing.assert_array_equal(n.vlm.generation.attention[0], m.vlm.generation.attention[0])
    assert n.comparison.mode == "reduction" and n.comparison.metrics["pruning.topk"]["cosine"] == 0.93
    np.testing.assert_array_equal(n.comparison.results["pruning.topk"].kept, sel.kept)
    assert n.comparison.sweep[1]["pruning.topk"][0].values["cosine"] == 0.9 and n.comparison.sweep[1]["pruning.topk"][1] is None
    assert "view" in rec.names() and "comparison" in rec.names()


def test_damaged_newer_and_orphaned_bundles_are_refused(tmp_path):
    m = SessionModel()
    img, path = _image(tmp_path)
    m.set_image(img, path)
    good = save_session(m, tmp_path / "good.tesession")
    bad = tmp_path / "bad.tesession"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(BundleError, match="not a readable session bundle"):
        read_bundle(bad)
    newer = tmp_path / "newer.tesession"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(newer, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "session.json":
                data = data.replace(f'"schema_version": {SCHEMA_VERSION}'.encode(),
                                    f'"schema_version": {SCHEMA_VERSION + 1}'.encode())
            zout.writestr(name, data)
    with pytest.raises(BundleError, match="newer version"):
        read_bundle(newer)
    (tmp_path / "img.png").write_bytes(png_bytes(np.zeros((40, 48, 3), np.uint8)))  # the image changed
    with pytest.raises(BundleError, match="changed since"):
        read_bundle(good)
    (tmp_path / "img.png").unlink()
    with pytest.raises(BundleError, match="image is not found"):
        read_bundle(good)
    with pytest.raises(BundleError, match="no such session"):
        read_bundle(tmp_path / "absent.tesession")


def test_saving_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves the earlier bundle whole and no temporary file behind."""
    m = SessionModel()
    img, path = _image(tmp_path)
    m.set_image(img, path)
    dest = save_session(m, tmp_path / "s.tesession")
    before = dest.read_bytes()
    m.set_prompts(("changed",))

    def broken(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("explorer.core.bundle.os.fsync", broken)
    with pytest.raises(BundleError, match="No space left"):
        save_session(m, dest)
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tesession-")] == []
