"""Sweeps on a local Ray (2 CPUs): the rows equal what `run` and `compare` give on the same images,
a rerun computes only what is missing, a killed worker loses nothing, a second sweep on the same
folder is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from explorer.cli.main import main
from explorer.core.metrics import mass_inside, pointing_game
from explorer.core.results import load_result

from .conftest import masks_of

KEYS = ["item_id", "model", "method", "setting", "target"]
VALUES = ["pointing_game", "mass_inside", "kept", "cosine", "top1_agree", "kl", "macs_ratio", "object_share",
          "object_chance", "error"]


def _spec(model: str, coco: Path, **run) -> dict:
    return {"models": [model], "dataset": {"kind": "coco", "path": str(coco), "images": str(coco.parent / "images")},
            "methods": [{"id": "pruning.topk", "params": {"layer": 1}, "grid": {"keep": [0.25, 0.5]}},
                        {"id": "similarity.maskclip", "params": {"templates": "none"},
                         "grid": {"mode": ["cosine", "softmax"]}}],
            "run": {"batch_size": 2, "actors": 2, **run}}


def _table(out: Path):
    import pandas as pd

    df = pd.read_parquet(out / "results")
    return df.sort_values(KEYS).reset_index(drop=True)


@pytest.fixture(scope="module")
def swept(ray_local, tiny_clip_spec, coco12, tmp_path_factory):
    from explorer.sweep.run import run_sweep
    from explorer.sweep.spec import load_spec

    spec = load_spec(_spec(tiny_clip_spec.canonical(), coco12))
    out = tmp_path_factory.mktemp("sweep") / "out"
    report = run_sweep(spec, out)
    return spec, out, report


def test_rows_equal_run_and_compare_on_the_same_images(swept, coco12, tmp_path, capsys):
    spec, out, report = swept
    df = _table(out)
    model = spec.models[0]
    assert report.items == 12 and report.rows_written == len(df)
    # 12 images x (2 reduction settings + 2 map settings x 2 categories)
    assert len(df) == 12 * (2 + 2 * 2) and (df["error"] == "").all()
    assert not df.duplicated(KEYS).any()
    masks = masks_of(coco12)
    data = json.loads(coco12.read_text())
    files = {str(im["id"]): coco12.parent / "images" / im["file_name"] for im in data["images"]}
    for item_id, path in files.items():
        for keep in (0.25, 0.5):
            js = tmp_path / f"{item_id}-{keep}.json"
            assert main(["compare", str(path), "--model", model, "--methods", "topk", "--keep", str(keep),
                         "--layer", "1", "--json", str(js), "--quiet"]) == 0
            ref = json.loads(js.read_text())["methods"]["pruning.topk"]
            row = df[(df.item_id == item_id) & (df.method == "pruning.topk") & (df.setting == json.dumps({"keep": keep}))]
            assert len(row) == 1
            for k in ("kept", "cosine", "top1_agree", "kl", "macs_ratio"):
                assert row[k].iloc[0] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), (item_id, keep, k)
        cats = [c for (i, c) in masks if i == item_id]
        assert len(cats) == 2
        categories = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
        for mode in ("cosine", "softmax"):
            for cat in cats:
                npz = tmp_path / f"{item_id}-{mode}.npz"
                # softmax: the category's probability against every category (the sweep's prompts)
                texts = [a for c in categories for a in ("--text", c)] if mode == "softmax" else ["--text", cat]
                index = categories.index(cat) if mode == "softmax" else 0
                assert main(["run", str(path), "--model", model, "--method", "similarity.maskclip", *texts,
                             "--param", "templates=none", "--param", f"mode={mode}", "--param", f"prompt_index={index}",
                             "--out", str(npz), "--quiet"]) == 0
                raster = load_result(npz).to_image(masks[(item_id, cat)].shape)
                row = df[(df.item_id == item_id) & (df.method == "similarity.maskclip")
                         & (df.setting == json.dumps({"mode": mode})) & (df.target == cat)]
                assert len(row) == 1
                assert row["pointing_game"].iloc[0] == float(pointing_game(raster, masks[(item_id, cat)]))
                assert row["mass_inside"].iloc[0] == pytest.approx(mass_inside(raster, masks[(item_id, cat)]), rel=1e-6)
    capsys.readouterr()
    summary = (out / "summary.md").read_text()
    assert "Top-K [CLS] attention" in summary and "keep=0.25" in summary and "[" in summary
    assert (out / "reduction-cosine-vs-keep.png").is_file()


def test_a_rerun_computes_only_what_is_missing(swept, tmp_path):
    from explorer.sweep.run import run_sweep

    spec, out, _ = swept
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert run_sweep(spec, again).rows_written == 0  # all there: nothing recomputed
    parts = sorted((again / "results").glob("part-*.parquet"))
    import pyarrow.parquet as pq

    lost = sum(pq.read_metadata(p).num_rows for p in parts[:2])
    for p in parts[:2]:  # as if the sweep had stopped before writing these
        p.unlink()
    report = run_sweep(spec, again)
    assert report.rows_written == lost and report.rows_before == len(_table(out)) - lost
    a, b = _table(out), _table(again)
    assert len(b) == len(a) and not b.duplicated(KEYS).any()
    assert a[KEYS + VALUES].equals(b[KEYS + VALUES])


def _sweep_workers() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "SweepWorker" in cmd and int(d.name) != os.getpid():
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_a_killed_worker_loses_nothing(swept, tmp_path):
    from explorer.sweep.run import run_sweep
    from explorer.sweep.spec import load_spec

    spec0, out, _ = swept
    spec = load_spec({**_spec(spec0.models[0], Path(spec0.dataset.path)), "run": {"batch_size": 1, "actors": 2}})
    assert spec.fingerprint() == spec0.fingerprint()  # batch size and workers do not change the results
    target = tmp_path / "killed"
    killed: list[int] = []

    def assassin() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if list((target / "results").glob("part-*.parquet")):
                for pid in _sweep_workers()[:1]:
                    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
                    killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=assassin, daemon=True)
    thread.start()
    run_sweep(spec, target)
    thread.join(5)
    assert killed, "no worker was killed mid-sweep"
    a, b = _table(out), _table(target)
    assert not b.duplicated(KEYS).any()
    assert a[KEYS + VALUES].equals(b[KEYS + VALUES])


def test_a_second_sweep_on_the_same_folder_is_refused(swept, tmp_path, capsys):
    from explorer.sweep.results import ResultStore

    spec, _, _ = swept
    busy = tmp_path / "busy"
    holder = ResultStore(busy, spec.fingerprint())
    holder.open()  # a sweep running in this (live) process
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(_toml(spec))
    try:
        assert main(["sweep", str(spec_file), "--out", str(busy), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "another sweep" in err and str(os.getpid()) in err
    finally:
        holder.close()
    other = tmp_path / "other.toml"
    other.write_text(_toml(spec).replace("keep = [0.25, 0.5]", "keep = [0.75]"))
    (busy / "spec.json").write_text(json.dumps({"fingerprint": spec.fingerprint()}))
    assert main(["sweep", str(other), "--out", str(busy), "--quiet"]) == 1
    assert "holds the results of another SPEC" in capsys.readouterr().err


def _toml(spec) -> str:
    m = spec.models[0].replace("\\", "\\\\")
    return (f'models = ["{m}"]\n[dataset]\nkind = "coco"\npath = "{spec.dataset.path}"\nimages = "{spec.dataset.images}"\n'
            '[[methods]]\nid = "pruning.topk"\nparams = { layer = 1 }\ngrid = { keep = [0.25, 0.5] }\n'
            '[[methods]]\nid = "similarity.maskclip"\nparams = { templates = "none" }\n'
            'grid = { mode = ["cosine", "softmax"] }\n[run]\nbatch_size = 2\nactors = 2\n')


def test_the_same_spec_from_toml_has_the_same_fingerprint(swept, tmp_path):
    from explorer.sweep.spec import load_spec

    spec, _, _ = swept
    path = tmp_path / "spec.toml"
    path.write_text(_toml(spec))
    assert load_spec(path).fingerprint() == spec.fingerprint()
    np.testing.assert_equal(load_spec(path).model_dump(exclude={"base"}), spec.model_dump(exclude={"base"}))
