"""MaskCLIP's prompt templates are the official 85 (``tests/golden/maskclip_templates.npz``, read
from ``chongzhou96/MaskCLIP``'s prompt engineering script), and ``templates=auto`` uses them on a
real model (the other dense methods keep CLIP's 80)."""

import json
from pathlib import Path

import numpy as np

from explorer.core.jobs import run_sync
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "maskclip_templates.npz"


def test_the_template_set_is_the_official_one():
    from explorer.backends.clip import template_strings

    with np.load(GOLDEN) as z:
        official = [str(t) for t in z["templates"]]
        meta = json.loads(str(z["meta"][0]))
    assert meta["repository"].endswith("chongzhou96/MaskCLIP") and len(official) == 85
    ours = template_strings("maskclip-85")
    assert len(ours) == 85 and set(ours) == set(official)  # the ensemble is a mean: order does not matter


def test_auto_templates_follow_the_method(tiny_clip, make_image):
    from explorer.plugin_host.host import PluginHost

    assert not tiny_clip.info.demo
    host = PluginHost()
    image = make_image(64, 64)
    trace = run_sync(tiny_clip.trace(image, CaptureSpec(hidden_layers={tiny_clip.info.n_layers - 1})))
    target = Target(prompts=("a red circle",))
    trace = trace.with_text(tiny_clip.encode_text(target.prompts))

    def run(method_id, templates):
        p = host.make_params(method_id, {"templates": templates})
        return run_sync(host.run(method_id, trace, p, target=target, backend=tiny_clip)).token_values

    np.testing.assert_array_equal(run("similarity.maskclip", "auto"), run("similarity.maskclip", "maskclip-85"))
    assert not np.allclose(run("similarity.maskclip", "auto"), run("similarity.maskclip", "imagenet-80"))
    np.testing.assert_array_equal(run("similarity.sclip", "auto"), run("similarity.sclip", "imagenet-80"))
