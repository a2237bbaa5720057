"""CLI ``compare`` and ``run`` reduce at the window's default block (a third of the depth), not at a
block where reducing leaves the output unchanged, and say which block they used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from explorer.cli.main import main
from explorer.core.trace import ModelInfo
from explorer.plugin_host.defaults import compare_layer, default_params
from explorer.plugin_host.host import PluginHost
from explorer.plugin_host.reduction import default_layer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "resources" / "samples" / "scene-01.png"


def _info(n_layers: int) -> ModelInfo:
    return ModelInfo(kind="clip", spec="clip:test", name="test", n_layers=n_layers, n_heads=4, width=64)


def test_compare_without_layer_reduces_at_a_third_of_the_depth(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    code = main(["compare", str(SAMPLE), "--model", "demo", "--methods", "topk,divprune", "--keep", "0.25",
                 "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads(out.read_text())
    assert data["layer"] == default_layer(5) == 1 and data["n_layers"] == 5
    methods = data["methods"]
    assert set(methods) == {"pruning.topk", "pruning.divprune"}
    assert all(m["layer"] == 1 and m["stages"][0] == 1 for m in methods.values())
    # reducing before the last block changes the [CLS] output: pruning is not free
    assert min(m["cosine"] for m in methods.values()) < 0.9999
    assert "reduction from block 1 of 5" in printed.out


def test_compare_layer_flag_still_wins(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["compare", str(SAMPLE), "--methods", "topk", "--keep", "0.25", "--layer", "-2", "--json", str(out),
                 "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["layer"] == 3 and data["methods"]["pruning.topk"]["stages"] == [3]


def test_run_of_a_reduction_method_starts_at_the_default_block(tmp_path):
    out = tmp_path / "sel.npz"
    assert main(["run", str(SAMPLE), "--method", "pruning.topk", "--out", str(out), "--quiet"]) == 0
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["layer"] == 1 and meta["meta"]["stages"] == [1]
    assert main(["run", str(SAMPLE), "--method", "pruning.topk", "--param", "layer=2", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads(str(np.load(out)["meta"]))["layer"] == 2


def test_default_params_and_compare_layer():
    host = PluginHost()
    assert default_params(host, "pruning.topk", _info(12)).layer == 4
    assert default_params(host, "pruning.topk", _info(5)).layer == 1
    assert default_params(host, "merging.tome", _info(5)).layer == 1  # ToMe's own default is block 0
    assert default_params(host, "pruning.topk", _info(5), {"layer": "3", "keep": "0.3"}).model_dump()["layer"] == 3
    assert default_params(host, "pruning.topk", _info(5), {"keep": 0.3}).keep == 0.3
    # maps and VLM pruning keep the plugin's defaults
    assert default_params(host, "attention.raw", _info(5)) == host.make_params("attention.raw")
    vlm = [m.id for m in host.methods(family="pruning", backend="vlm")]
    assert vlm and all(default_params(host, m, _info(5)) == host.make_params(m) for m in vlm)
    assert compare_layer(_info(5)) == 1 and compare_layer(_info(12)) == 4
    assert compare_layer(_info(5), -1) == 4 and compare_layer(_info(5), 9) == 4 and compare_layer(_info(5), 2) == 2
    with pytest.raises(ValueError, match="out of range"):
        compare_layer(_info(5), -9)


def test_compare_job_uses_the_loaded_models_default_block(tiny_clip, make_image):
    from explorer.core.jobs import run_sync
    from explorer.plugin_host.compare import compare_job, sweep_job
    from explorer.plugin_host.engine import Engine

    engine = Engine()
    engine.adopt(tiny_clip)
    image = make_image(64, 64, 3)
    ids = ["pruning.topk", "merging.tome"]
    cmp = run_sync(compare_job(engine, tiny_clip.spec, image, ids, keep=0.5, labels="scenes"))
    block = default_layer(tiny_clip.info.n_layers)
    assert cmp.layer == block and cmp.to_json()["layer"] == block
    assert cmp.selections["pruning.topk"].meta["stages"] == [block]
    assert cmp.selections["merging.tome"].meta["stages"][0] == block
    sweep = run_sync(sweep_job(engine, tiny_clip.spec, image, ["pruning.topk"], keeps=(0.5,), labels="scenes"))
    assert sweep["pruning.topk"][0] is not None
