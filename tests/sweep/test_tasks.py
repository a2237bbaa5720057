"""The SPEC is checked before any model loads; the datasets and the three tasks, run in process
(the worker Ray runs, called directly): COCO polygons/RLE/boxes scored by hand, VQA items,
unreadable images recorded, label maps against the categories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explorer.cli.main import main
from explorer.core.image_io import load_image
from explorer.core.jobs import run_sync
from explorer.core.metrics import mass_inside
from explorer.core.target import Target


def _good(model: str, tmp_path: Path) -> dict:
    return {"models": [model], "dataset": {"kind": "synthetic", "count": 2, "size": [64, 64]},
            "methods": [{"id": "pruning.topk", "grid": {"keep": [0.5]}}]}


@pytest.mark.parametrize("change, expected", [
    (lambda s: s["methods"][0].update(grid={"keep": [0.5, 1.5]}), "methods[0]: the setting {\"keep\": 1.5}"),
    (lambda s: s["methods"][0].update(id="pruning.nope"), "methods[0].id: unknown method 'pruning.nope'"),
    (lambda s: s["methods"][0].update(grid={"kep": [0.5]}), "methods[0].grid.kep: not a parameter of pruning.topk"),
    (lambda s: s["dataset"].pop("count"), "dataset.count: a synthetic dataset needs count"),
    (lambda s: s["dataset"].update(kind="folder", path="/no/such/folder"), "dataset.path: /no/such/folder is not a folder"),
    (lambda s: s.update(metrics=["bleu"]), "metrics: 'bleu' is not measured"),
    (lambda s: s["run"].update(batch_size=0) if "run" in s else s.update(run={"batch_size": 0}), "run.batch_size"),
    (lambda s: s.update(models=["ViT-Nope-1@nowhere?device=quantum"]), "models[0]:"),
    (lambda s: s["methods"].append({"id": "vlm.fastv"}), "methods[1].id: vlm.fastv needs a vlm model"),
    (lambda s: s["methods"][0].update(id="region.sam"), "methods[0].id:"),
])
def test_a_wrong_spec_names_the_field_before_any_model_loads(change, expected, tmp_path, monkeypatch, capsys,
                                                            tiny_clip_spec):
    import explorer.backends.registry as registry

    def no(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(registry, "load_backend", no)
    spec = _good(tiny_clip_spec.canonical(), tmp_path)
    change(spec)
    from explorer.sweep.spec import SpecError, load_spec

    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert expected in str(err.value)


def test_the_cli_reports_a_wrong_spec_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('models = ["demo"]\n[dataset]\nkind = "synthetic"\ncount = 3\n[[methods]]\nid = "pruning.topk"\n'
                   'grid = { keep = [2.0] }\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "methods[0]" in err and "keep" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    broken = tmp_path / "broken.toml"
    broken.write_text("models = [\n")
    assert main(["sweep", str(broken), "--out", str(tmp_path / "out")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def _worker(spec_dict: dict, model: str | None = None):
    from explorer.sweep.datasets import categories_of, list_items
    from explorer.sweep.spec import load_spec
    from explorer.sweep.work import SweepWorker

    spec = load_spec(spec_dict)
    worker = SweepWorker(spec.model_dump(mode="json"), model or spec.models[0], categories_of(spec))
    return spec, worker, list_items(spec)


def test_coco_polygons_rle_and_boxes_give_the_hand_computed_pointing_game(tmp_path, tiny_clip_spec):
    from explorer.core.regions import rle_encode
    from explorer.plugin_host.engine import Engine

    rng = np.random.default_rng(3)
    img = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    ring = np.zeros((64, 80), bool)
    ring[30:50, 50:70] = True
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 64, "width": 80}],
            "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "ring"}, {"id": 3, "name": "box"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[4, 4, 30, 4, 30, 30, 4, 30]],
                 "bbox": [4, 4, 26, 26], "iscrowd": 0},
                {"id": 2, "image_id": 7, "category_id": 2, "segmentation": rle_encode(ring), "iscrowd": 0},
                {"id": 3, "image_id": 7, "category_id": 3, "bbox": [10, 40, 20, 15], "iscrowd": 0}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    model = tiny_clip_spec.canonical()
    spec, worker, items = _worker({"models": [model], "dataset": {"kind": "coco", "path": str(tmp_path / "coco.json")},
                                   "methods": [{"id": "similarity.maskclip", "params": {"templates": "none"}}]})
    rows = {r["target"]: r for r in worker.run_item({**items[0], "pending": None})}
    assert set(rows) == {"square", "ring", "box"} and all(r["error"] == "" for r in rows.values())
    # by hand: the polygon's pixels (PIL fills the vertices' columns and rows inclusive), the RLE, the box
    by_hand = {"square": np.zeros((64, 80), bool), "ring": ring, "box": np.zeros((64, 80), bool)}
    by_hand["square"][4:31, 4:31] = True
    by_hand["box"][40:55, 10:30] = True
    engine = Engine()
    image = load_image(tmp_path / "a.png")
    for name, mask in by_hand.items():
        target = Target(prompts=(name,))
        params = engine.host.make_params("similarity.maskclip", {"templates": "none"})
        backend, trace = run_sync(engine.prepare_job(model, image, "similarity.maskclip", params, target))
        raster = run_sync(engine.method_job("similarity.maskclip", trace, params, target, backend=backend)).to_image((64, 80))
        r, c = np.unravel_index(np.nanargmax(raster), raster.shape)
        assert rows[name]["pointing_game"] == float(mask[r, c]), name
        assert rows[name]["mass_inside"] == pytest.approx(mass_inside(raster, mask), rel=1e-6)


def test_unreadable_images_are_rows_with_their_error(tmp_path, tiny_clip_spec):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(folder / "ok.png")
    Image.fromarray(np.full((40, 50, 3), 30, np.uint8)).save(folder / "sub" / "deep.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    spec, worker, items = _worker({"models": [tiny_clip_spec.canonical()],
                                   "dataset": {"kind": "folder", "path": str(folder)},
                                   "methods": [{"id": "pruning.topk", "grid": {"keep": [0.5, 0.25]}}]})
    assert [it["item_id"] for it in items] == ["broken.png", "ok.png", "sub/deep.png"]  # recursive, sorted
    rows = [r for it in items for r in worker.run_item({**it, "pending": None})]
    assert len(rows) == 6
    broken = [r for r in rows if r["item_id"] == "broken.png"]
    assert all("cannot read" in r["error"] and np.isnan(r["cosine"]) for r in broken)
    assert all(r["error"] == "" and 0 < r["cosine"] <= 1.0 + 1e-6 for r in rows if r["item_id"] != "broken.png")


def test_vqa_items_with_a_vlm_pruning_method(tmp_path):
    from explorer.sweep.datasets import normalize_answer
    from explorer.testing.tiny_vlm import make_tiny_vlm

    vlm = make_tiny_vlm(tmp_path / "vlm", "demo").canonical()
    for i in range(2):
        Image.fromarray(np.full((48, 64, 3), 60 + 80 * i, np.uint8)).save(tmp_path / f"q{i}.png")
    lines = [json.dumps({"id": f"q{i}", "image": f"q{i}.png", "question": "<image> what is it?",
                         "answers": ["a red circle", "circle"]}) for i in range(2)]
    (tmp_path / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    spec, worker, items = _worker({"models": [vlm], "dataset": {"kind": "vqa", "path": str(tmp_path / "vqa.jsonl")},
                                   "methods": [{"id": "vlm.random", "grid": {"keep": [1.0, 0.5]}}],
                                   "run": {"max_new_tokens": 3}})
    assert [it["item_id"] for it in items] == ["q0", "q1"]
    rows = [r for it in items for r in worker.run_item({**it, "pending": None})]
    assert len(rows) == 4 and all(r["error"] == "" for r in rows)
    for r in rows:
        full_right = float(normalize_answer(r["answer_full"]) in ("red circle", "circle"))
        assert r["vqa_correct_full"] == full_right
        assert r["target"] == "<image> what is it?"
        if json.loads(r["setting"])["keep"] == 1.0:  # nothing pruned: the same answer
            assert r["same_answer"] == 1.0 and r["answer"] == r["answer_full"]
            assert r["vqa_correct"] == r["vqa_correct_full"]
    assert normalize_answer("The Red, circle!") == "red circle"


def test_label_maps_are_scored_against_the_categories(tmp_path, tiny_clip_spec):
    spec, worker, items = _worker({"models": [tiny_clip_spec.canonical()],
                                   "dataset": {"kind": "synthetic", "count": 2, "size": [64, 64]},
                                   "methods": [{"id": "similarity.maskclip",
                                                "params": {"templates": "none", "output": "labels"}}]})
    assert len(worker.categories) == 35
    rows = [r for it in items for r in worker.run_item({**it, "pending": None})]
    assert len(rows) == 2 and all(r["error"] == "" for r in rows)  # one row per image: every category at once
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["pixel_accuracy"] <= 1.0
        assert np.isnan(r["pointing_game"])
